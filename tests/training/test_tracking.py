"""Tracking: wandb mode and per-stage run ids, the perf/* and moe/* log keys, and a real offline wandb run
decoded from its .wandb file, then resumed into the same run."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from distill.losses.router import expert_load
from distill.models.upcycle import UpcycleConfig, moe_blocks, parameter_counts, upcycle
from distill.training import tracking
from distill.training.context import StageContext
from distill.training.moe import RouterRecorder


@pytest.fixture(autouse=True)
def clean_wandb_env(monkeypatch, tmp_path):
    """No real ~/.netrc, no key, and every WANDB_* variable the module sets is restored after the test."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (*tracking.STAGE_ENV, "WANDB_API_KEY", "WANDB_BASE_URL", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking, "_owned", {})
    yield
    tracking.finish_wandb()


def _ctx(tmp_path: Path, stage: str = "d2s") -> StageContext:
    return StageContext(name=stage, run_dir=tmp_path / "runs" / "demo")


WANDB = {"report_to": "wandb"}


# ---- mode, environment, run ids ----


@pytest.mark.parametrize("report_to", ["none", ["tensorboard"], None])
def test_wandb_is_off_unless_reported_to(tmp_path, report_to):
    ctx = _ctx(tmp_path)
    assert tracking.configure_wandb(ctx, {"report_to": report_to}) == {}
    assert not [name for name in tracking.STAGE_ENV if name in os.environ]
    assert not ctx.dir.exists()
    # Token counting for perf/* is wanted with or without wandb; a user's own choice stays.
    counting = {"include_num_input_tokens_seen": "non_padding"}
    assert tracking.tracking_arguments(ctx, {"report_to": report_to}) == counting
    assert tracking.tracking_arguments(ctx, {"include_num_input_tokens_seen": "all"}) == {}


def test_offline_without_key_under_the_run_dir(tmp_path):
    ctx = _ctx(tmp_path)
    assert tracking.configure_wandb(ctx, WANDB) == {"run_name": "demo/d2s"}
    run_id = (ctx.dir / tracking.RUN_ID_FILE).read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum()
    assert {name: os.environ[name] for name in tracking.STAGE_ENV} == {
        "WANDB_PROJECT": "distill", "WANDB_MODE": "offline", "WANDB_DIR": str(ctx.run_dir.resolve()),
        "WANDB_RUN_GROUP": "demo", "WANDB_JOB_TYPE": "d2s", "WANDB_RUN_ID": run_id, "WANDB_RESUME": "allow"}
    assert tracking.configure_wandb(ctx, {**WANDB, "run_name": "mine"}) == {}


@pytest.mark.parametrize(("key", "mode"), [("env", "online"), ("netrc", "online"), ("netrc_other_host", "offline")])
def test_online_with_an_api_key(tmp_path, monkeypatch, key, mode):
    if key == "env":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    else:
        host = "api.wandb.ai" if key == "netrc" else "example.org"
        netrc = Path(os.environ["HOME"]) / ".netrc"
        netrc.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
        netrc.chmod(0o600)
    tracking.configure_wandb(_ctx(tmp_path), WANDB)
    assert os.environ["WANDB_MODE"] == mode


def test_run_id_is_kept_per_stage(tmp_path, monkeypatch):
    first = _ctx(tmp_path, "d2s")
    tracking.configure_wandb(first, WANDB)
    run_id = os.environ["WANDB_RUN_ID"]
    monkeypatch.setattr(tracking, "_owned", {})  # as in a new process resuming the stage
    tracking.configure_wandb(first, WANDB)
    assert os.environ["WANDB_RUN_ID"] == run_id
    tracking.configure_wandb(_ctx(tmp_path, "d2d"), WANDB)
    assert os.environ["WANDB_RUN_ID"] != run_id
    assert os.environ["WANDB_JOB_TYPE"] == "d2d"
    # Only the main process draws an id: another rank writes no file and sets no id.
    monkeypatch.setenv("RANK", "1")
    tracking.configure_wandb(_ctx(tmp_path, "dpo"), WANDB)
    assert "WANDB_RUN_ID" not in os.environ and not (tmp_path / "runs" / "demo" / "dpo").exists()
    assert os.environ["WANDB_JOB_TYPE"] == "dpo"


def test_user_settings_win_and_stage_settings_do_not_leak(tmp_path, monkeypatch):
    tracking.configure_wandb(_ctx(tmp_path, "d2d"), WANDB)
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # our own "offline" is not mistaken for the user's choice
    tracking.configure_wandb(_ctx(tmp_path, "d2s"), WANDB)
    assert os.environ["WANDB_MODE"] == "online"

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    for stage in ("d2s", "dpo"):
        tracking.configure_wandb(_ctx(tmp_path, stage), WANDB)
        assert (os.environ["WANDB_MODE"], os.environ["WANDB_PROJECT"]) == ("disabled", "mine")
    tracking.configure_wandb(_ctx(tmp_path, "eval"), {"report_to": "none"})
    assert [name for name in tracking.STAGE_ENV if name in os.environ] == ["WANDB_PROJECT", "WANDB_MODE"]


# ---- log keys ----


def _log(cb, state, logs, args):
    state.log_history.append({**logs, "step": state.global_step})  # as Trainer.log does before on_log
    cb.on_log(args, state, TrainerControl(), logs=logs)
    return logs


def test_throughput_is_token_increase_over_wall_time():
    now = [10.0]
    cb = tracking.ThroughputCallback(n_params=1000, peak_flops=1e6, clock=lambda: now[0])
    args = SimpleNamespace(include_num_input_tokens_seen="non_padding", world_size=2)
    state = TrainerState()
    cb.on_train_begin(args, state, TrainerControl())
    now[0], state.num_input_tokens_seen, state.global_step = 12.0, 300, 1
    logs = _log(cb, state, {"loss": 1.0}, args)
    assert logs["perf/tokens_per_s"] == pytest.approx(150.0)
    assert logs["perf/mfu"] == pytest.approx(6 * 1000 * 150 / (1e6 * 2))
    assert state.log_history[-1]["perf/tokens_per_s"] == logs["perf/tokens_per_s"]
    # Evaluation restarts the window and its own log gets no perf keys.
    now[0] = 20.0
    cb.on_evaluate(args, state, TrainerControl())
    assert _log(cb, state, {"eval_loss": 1.0}, args) == {"eval_loss": 1.0}
    now[0], state.num_input_tokens_seen, state.global_step = 25.0, 400, 2
    assert _log(cb, state, {"loss": 1.0}, args)["perf/tokens_per_s"] == pytest.approx(20.0)
    # No peak FLOP/s (CPU): no MFU.
    cb = tracking.ThroughputCallback(n_params=1000, clock=lambda: now[0])
    cb.on_train_begin(args, state, TrainerControl())
    now[0], state.num_input_tokens_seen, state.global_step = 26.0, 500, 3
    assert set(_log(cb, state, {"loss": 1.0}, args)) == {"loss", "perf/tokens_per_s"}


def _tiny_moe() -> LlavaForConditionalGeneration:
    text = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    torch.manual_seed(0)
    dense = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=95))
    return upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, layers="all", router_std=1.0))


def _moe_inputs(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 90, (2, 12), generator=g)
    ids[:, 1:5] = 95  # 4 image tokens
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # the second row is padded
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def test_expert_load_counts_non_padding_tokens_of_training_passes():
    model = _tiny_moe()
    throughput, load_cb = tracking.tracking_callbacks(model)
    assert [type(cb) for cb in tracking.tracking_callbacks(model, moe=False)] == [tracking.ThroughputCallback]
    total, active = parameter_counts(model, 2)
    assert throughput.n_params == active < total
    assert throughput.peak_flops is None or torch.cuda.is_available()
    args, state, control = SimpleNamespace(), TrainerState(), TrainerControl()
    load_cb.on_train_begin(args, state, control)
    reference = RouterRecorder(model)
    per_pass = []
    with torch.no_grad():
        for seed in (1, 2):
            inputs = _moe_inputs(seed)
            model.train()(**inputs)
            logits = reference.take()
            per_pass.append(expert_load(logits, 2, inputs["attention_mask"]))
        unmasked = expert_load(logits, 2)
        model.eval()(**_moe_inputs(3))  # not a training pass: not counted
    reference.remove()
    expected = (per_pass[0] + per_pass[1]) / 2
    logs = _log(load_cb, state, {"loss": 1.0}, args)
    got = torch.tensor([[logs[f"moe/load_L{layer}_e{e}"] for e in range(4)] for layer, _ in moe_blocks(model)])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(1), torch.ones(2))
    assert not torch.allclose(per_pass[1], unmasked)  # counting the padding would give other shares
    assert "moe/load_L0_e0" not in _log(load_cb, state, {"loss": 1.0}, args)  # nothing new since the last log
    load_cb.on_train_end(args, state, control)
    assert not model._forward_hooks and not any(block.gate._forward_hooks for _, block in moe_blocks(model))


# ---- a real offline wandb run ----


def read_wandb(path: Path) -> list:
    """The records of a ``.wandb`` transaction log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    chunks in 32 KiB blocks (crc32 of type + data, length, type: 1 full, 2 first, 3 middle, 4 last), each
    reassembled record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        assert crc == zlib.crc32(bytes([kind]) + chunk), f"bad crc at {pos}"
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _offline_runs(ctx: StageContext, run_id: str) -> list[Path]:
    return sorted((ctx.run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def _finished_records(path: Path, timeout: float = 30.0) -> list:
    """wandb.finish() returns before wandb-core has written the log out: wait for its closing ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb(path)
        if records and records[-1].WhichOneof("record_type") == "exit" or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _summary(records) -> tuple[object, list[dict]]:
    """The run record, and the history rows (key -> JSON-decoded value)."""
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    rows = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    return run, rows


def _dataset(n: int = 8) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 11, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(1, 64, (k,), generator=g).tolist()} for k in lengths]


def _collate(records: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in records)
    ids = torch.zeros(len(records), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(records):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _train(ctx: StageContext, max_steps: int, resume: str | None = None) -> Trainer:
    training = {"report_to": ["wandb"], "max_steps": max_steps, "per_device_train_batch_size": 4,
                "logging_steps": 1, "save_strategy": "steps", "save_steps": 4, "use_cpu": True,
                "disable_tqdm": True, "dataloader_num_workers": 0, "learning_rate": 1e-3, "seed": 0}
    args = TrainingArguments(output_dir=str(ctx.checkpoint_dir), remove_unused_columns=False,
                             **training, **tracking.tracking_arguments(ctx, training))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=_collate)
    tracking.add_tracking(trainer)
    tracking.start_wandb_run(ctx, training["report_to"])  # as distill.training.supervised.train does
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_offline_wandb_run_logs_and_resumes(tmp_path, monkeypatch):
    for name, value in {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true",
                        "WANDB_DISABLE_CODE": "true", "WANDB__DISABLE_STATS": "true",
                        "WANDB__DISABLE_META": "true"}.items():
        monkeypatch.setenv(name, value)
    ctx = _ctx(tmp_path)
    tokens_per_epoch = sum(len(r["input_ids"]) for r in _dataset())

    trainer = _train(ctx, max_steps=4)  # 8 records, batch 4: two epochs
    assert trainer.state.num_input_tokens_seen == 2 * tokens_per_epoch  # non-padding tokens, exactly
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 4 and all(h["perf/tokens_per_s"] > 0 for h in train_logs)
    assert all("perf/mfu" not in h for h in train_logs) or torch.cuda.is_available()
    image = tmp_path / "sample.png"
    Image.new("RGB", (8, 8), "red").save(image)
    assert tracking.log_eval_table([{"model": "student", "vqa_acc": 0.5}, {"model": "teacher", "pope_f1": 0.8}])
    assert tracking.log_samples([(image, "What colour?", "red")])
    tracking.finish_wandb()
    assert not tracking.log_eval_table([{"model": "student"}])  # no open run: a no-op

    run_id = (ctx.dir / tracking.RUN_ID_FILE).read_text().strip()
    [first] = _offline_runs(ctx, run_id)
    run, rows = _summary(_finished_records(first))
    assert (run.run_id, run.project, run.run_group, run.job_type, run.display_name) == (
        run_id, "distill", "demo", "d2s", "demo/d2s")
    logged = [row for row in rows if "train/loss" in row]
    assert all({"train/learning_rate", "train/grad_norm", "train/perf/tokens_per_s"} <= set(row) for row in logged)
    assert [row["train/perf/tokens_per_s"] for row in logged] == pytest.approx(
        [h["perf/tokens_per_s"] for h in train_logs])
    assert [row["train/global_step"] for row in logged] == [1, 2, 3, 4]
    [results] = [row for row in rows if "eval/results/_type" in row]
    assert (results["eval/results/_type"], results["eval/results/nrows"], results["eval/results/ncols"]) == (
        "table-file", 2, 3)
    [samples] = [row for row in rows if "samples/_type" in row]
    assert (samples["samples/_type"], samples["samples/nrows"], samples["samples/ncols"]) == ("table-file", 1, 3)

    # The stage is resumed (a new process would do the same): same wandb run id, steps 5-6 appended.
    trainer = _train(ctx, max_steps=6, resume=str(ctx.checkpoint_dir / "checkpoint-4"))
    assert trainer.state.num_input_tokens_seen == 3 * tokens_per_epoch
    tracking.finish_wandb()
    runs = _offline_runs(ctx, run_id)
    assert len(runs) == 2 and runs[0] == first
    run, rows = _summary(_finished_records(runs[1]))
    assert (run.run_id, run.resume, run.job_type) == (run_id, True, "d2s")
    assert [row["train/global_step"] for row in rows if "train/loss" in row] == [5, 6]

    # The next stage in the same process gets its own run (wandb reads its environment once per process, so
    # this needs the explicit wandb.init arguments of start_wandb_run).
    nxt = _ctx(tmp_path, stage="preference")
    _train(nxt, max_steps=2)
    tracking.finish_wandb()
    next_id = (nxt.dir / tracking.RUN_ID_FILE).read_text().strip()
    assert next_id != run_id
    [path] = _offline_runs(nxt, next_id)
    run, _ = _summary(_finished_records(path))
    assert (run.run_id, run.job_type, run.display_name) == (next_id, "preference", "demo/preference")
