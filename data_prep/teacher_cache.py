"""Offline teacher: run the teacher once over an imitation data set and store its top-k log-probs.

For every response token of every record: the teacher's ``top_k`` most likely token ids and their log-probs at
the KD temperature (fp16 by default), and the log of the probability mass outside them (the tail bucket).
The imitation stages then distil from the cache (``teacher: {cache: DIR}``) without the teacher in memory;
with ``top_k`` = vocabulary size the loss equals the live teacher's.

Layout of ``--out`` (read by distill/training/kd.py ``TeacherCache``)::

    plan.json                   the settings, written first; a rerun with other settings is refused
    shard-00000.safetensors     ``records_per_shard`` records each, written to a .tmp file and renamed
    manifest.json               k, vocabulary, temperature, data files (bytes + SHA-256), shards (SHA-256);
                                written last: a folder without it is unfinished

Resumable: a rerun skips the shards that exist. Deterministic: records in file order, fixed batches within a
shard, fixed dtypes, no timestamps, so an interrupted and resumed run gives the same bytes as an uninterrupted
one (on the same machine and device). The temperature is applied before the top-k (the tail mass at another
temperature cannot be recovered from a top-k), so the cache holds one temperature and training refuses another.

Run::

    python -m data_prep.teacher_cache --teacher runs/demo/teacher/model --data data/shapes/instruct.json \\
        --image-root data/shapes/images --out runs/demo/teacher_cache --top-k 64

Several GPUs: launch it with torchrun (or any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK). Rank r writes
the shards i with i % WORLD_SIZE == r on ``cuda:LOCAL_RANK``; rank 0 writes the plan first and the manifest once
every shard exists. Shards depend only on their records, so the files are the same for any number of processes.

    torchrun --nproc-per-node 8 -m data_prep.teacher_cache --teacher ... --data ... --out ...
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig

from distill.data.collate import ConversationEncoder, SupervisedCollator, check_fit
from distill.data.templates import get_template
from distill.losses.kd import _log1mexp, shifted_response_mask
from distill.models.processors import load_processor
from distill.models.teacher import load_teacher
from distill.training.config import DataConfig
from distill.training.kd import CACHE_FORMAT, MANIFEST, last_hidden, split_inputs
from distill.training.supervised import load_conversations

log = logging.getLogger(__name__)

PLAN = "plan.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TeacherCacheConfig:
    teacher: str
    """The teacher checkpoint folder."""
    data: list[str]
    """LLaVA conversation JSON file(s), as in the stage's ``data.train``."""
    out: str
    image_root: str | None = None
    template: str = "chatml"
    max_length: int = 2048
    """Must equal the stage's ``data.max_length`` (checked at training)."""
    top_k: int = 64
    temperature: float = 1.0
    """Must equal the stage's ``kd.temperature`` (checked at training)."""
    dtype: str = "float16"
    """Storage dtype of the log-probs: ``float16``, ``bfloat16`` or ``float32``."""
    train_on: str = "responses"
    """``responses``, or ``all`` for a stage with ``kd.distill_all_tokens``."""
    records_per_shard: int = 256
    batch_size: int = 8
    limit: int | None = None
    """Read at most this many records per file."""
    teacher_dtype: str = "float32"
    """The teacher's compute dtype."""
    data_cache: str | None = field(default=None, metadata={"plan": False})
    """A folder to keep the checked records in (``data.cache_dir``: the training run's ``<run.dir>/cache/data``
    shares the work with its stages); None: read and checked in memory. Not part of the plan."""
    device: str = field(default="auto", metadata={"plan": False})
    """``auto`` (cuda if available), ``cpu`` or ``cuda``; not part of the plan."""

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.top_k < 1 or self.records_per_shard < 1 or self.batch_size < 1:
            raise ValueError("top_k, records_per_shard and batch_size must be >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.dtype not in DTYPES or self.teacher_dtype not in DTYPES:
            raise ValueError(f"dtype / teacher_dtype: expected one of {sorted(DTYPES)}")
        if self.train_on not in ("responses", "all"):
            raise ValueError(f"train_on={self.train_on!r}: expected 'responses' or 'all'")

    def plan(self) -> dict[str, Any]:
        """The settings that decide the bytes of the cache (not where it is written nor on which device)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "out" and f.metadata.get("plan", True)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _wait_for(path: Path, poll_s: float = 1.0) -> None:
    while not path.is_file():
        time.sleep(poll_s)


def _write_json(path: Path, obj: Any) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _record_ids(dataset) -> list[str]:
    ids = [str(i) for i in dataset["id"]]
    if any(not i for i in ids):
        raise ValueError("every record needs a non-empty \"id\": the cache is looked up by record id")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"record ids must be unique across the data files; repeated: {dup}")
    return ids


@torch.no_grad()
def _teacher_targets(teacher, batch: dict[str, torch.Tensor], cfg: TeacherCacheConfig, device: torch.device):
    """Per batch: top-k ids and log-probs, tail log-mass, targets over the response tokens, tokens per record.

    The same operations as the live KD loss on the teacher side (last hidden states, LM head, fp32 softmax of
    logits / T), so that k = vocabulary reproduces it.
    """
    inputs = {k: v.to(device) for k, v in split_inputs(batch, dtype=teacher.dtype).items()}
    labels = batch["labels"].to(device)
    mask = shifted_response_mask(labels)
    hidden = last_hidden(teacher, inputs)[mask]
    head = teacher.get_output_embeddings().weight
    logp = F.log_softmax((hidden @ head.t()).float() / cfg.temperature, dim=-1)
    top_logp, top_ids = logp.topk(min(cfg.top_k, logp.size(-1)), dim=-1)
    tail = _log1mexp(torch.logsumexp(top_logp, -1))
    targets = labels[:, 1:][mask[:, :-1]]
    return top_ids, top_logp, tail, targets, mask.sum(1)


def build_teacher_cache(cfg: TeacherCacheConfig, max_new_shards: int | None = None) -> Path | None:
    """Write (or complete) the cache; returns the manifest path, or None when stopped after ``max_new_shards``
    new shards (a time-boxed job; rerun to go on)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = cfg.plan()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if rank != 0:
        _wait_for(out / PLAN)  # written by rank 0 only: ranks racing on one rename would fail
    if (out / PLAN).is_file():
        old = json.loads((out / PLAN).read_text())
        if old != json.loads(json.dumps(plan)):
            raise ValueError(f"{out} holds a cache written with other settings ({out / PLAN}); use a new folder")
    else:
        _write_json(out / PLAN, plan)

    data = DataConfig(train=cfg.data, image_root=cfg.image_root, template=cfg.template, max_length=cfg.max_length,
                      limit=cfg.limit, cache_dir=cfg.data_cache)
    dataset, _ = load_conversations(data, cache_base=None)
    # Records the teacher cannot take at this max_length (image tokens cut, replies cut away) are left out, as the
    # imitation stage's own check leaves them out of training (the same processor and max_length, checked there).
    encoder = ConversationEncoder(load_processor(cfg.teacher), get_template(cfg.template), cfg.max_length,
                                  train_on=cfg.train_on)
    dataset, _ = check_fit(dataset, {"teacher": encoder}, cfg.image_root, "skip", ", ".join(cfg.data),
                           cache_dir=cfg.data_cache)
    ids = _record_ids(dataset)
    n_shards = (len(ids) + cfg.records_per_shard - 1) // cfg.records_per_shard
    names = [f"shard-{i:05d}.safetensors" for i in range(n_shards)]
    todo = [i for i in range(n_shards) if i % world == rank and not (out / names[i]).is_file()]
    if todo:
        _write_shards(cfg, out, dataset, ids, names, todo, max_new_shards)
    if rank != 0:
        return None
    if world > 1 and max_new_shards is None:
        for name in names:  # the other ranks' shards (a launcher stops every rank if one fails)
            _wait_for(out / name)
    if any(not (out / name).is_file() for name in names):
        return None

    vocab = AutoConfig.from_pretrained(cfg.teacher).get_text_config().vocab_size
    shards, tokens = [], 0
    for i, name in enumerate(names):
        count = min(cfg.records_per_shard, len(ids) - i * cfg.records_per_shard)
        with safe_open(out / name, framework="pt") as f:
            n_tok = int(f.get_slice("tail").get_shape()[0])
        shards.append({"file": name, "records": count, "tokens": n_tok, "sha256": _sha256(out / name)})
        tokens += n_tok
    manifest = {
        "format": CACHE_FORMAT, "teacher": cfg.teacher, "top_k": min(cfg.top_k, vocab), "vocab_size": vocab,
        "temperature": cfg.temperature, "dtype": cfg.dtype, "template": cfg.template, "max_length": cfg.max_length,
        "train_on": cfg.train_on, "records_per_shard": cfg.records_per_shard, "records": len(ids), "tokens": tokens,
        "datasets": [{"path": p, "bytes": Path(p).stat().st_size, "sha256": _sha256(Path(p))} for p in cfg.data],
        "shards": shards,
    }
    _write_json(out / MANIFEST, manifest)
    log.info("teacher cache: %d records, %d tokens, %d shards in %s", len(ids), tokens, n_shards, out)
    return out / MANIFEST


def _write_shards(cfg: TeacherCacheConfig, out: Path, dataset, ids: list[str], names: list[str], todo: list[int],
                  max_new_shards: int | None) -> None:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    teacher, processor = load_teacher(cfg.teacher, DTYPES[cfg.teacher_dtype])
    teacher.to(device)
    encoder = ConversationEncoder(processor, get_template(cfg.template), cfg.max_length, train_on=cfg.train_on)
    collator = SupervisedCollator(encoder, cfg.image_root)
    per = cfg.records_per_shard
    done = (len(names) - len(todo)) * per
    with tqdm(total=len(ids), initial=min(done, len(ids)), desc="teacher cache", unit="rec",
              disable=int(os.environ.get("RANK", "0")) != 0) as bar:
        for written, shard_no in enumerate(todo):
            if max_new_shards is not None and written >= max_new_shards:
                return
            lo, hi = shard_no * per, min((shard_no + 1) * per, len(ids))
            parts: dict[str, list[torch.Tensor]] = {"ids": [], "logp": [], "tail": [], "targets": []}
            lengths = []
            for start in range(lo, hi, cfg.batch_size):
                records = [dataset[i] for i in range(start, min(start + cfg.batch_size, hi))]
                top_ids, top_logp, tail, targets, n = _teacher_targets(teacher, collator(records), cfg, device)
                parts["ids"].append(top_ids.to(torch.int32).cpu())
                parts["logp"].append(top_logp.to(DTYPES[cfg.dtype]).cpu())
                parts["tail"].append(tail.float().cpu())
                parts["targets"].append(targets.to(torch.int32).cpu())
                lengths.extend(n.tolist())
                bar.update(len(records))
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            tensors["offsets"] = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
            metadata = {"record_ids": json.dumps(ids[lo:hi])}
            _write_atomic(out / names[shard_no], functools.partial(save_file, tensors, metadata=metadata))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--image-root")
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    parser.add_argument("--train-on", default="responses", choices=["responses", "all"])
    parser.add_argument("--records-per-shard", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--teacher-dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-cache", help="keep the checked records here (e.g. the run's <run.dir>/cache/data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TeacherCacheConfig(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    build_teacher_cache(cfg)


if __name__ == "__main__":
    main()
