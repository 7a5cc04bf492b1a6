"""The opt-in kernel settings (``model.kernels`` / ``teacher.kernels``): validation, and the clear error where they
cannot run (no GPU, no liger-kernel). The kernels themselves need a GPU: eval/bench/kd_throughput.py --kernels."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from distill.models.tiny import LLMSize, VisionSize
from distill.training import kernels as kernels_module
from distill.training.kernels import KERNELS, apply_kernels, check_kernels, decoder_layers


def tiny_llava() -> LlavaForConditionalGeneration:
    text = LLMSize().qwen2_config(vocab_size=96)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=VisionSize().clip_vision_config(),
                                                     text_config=text, image_token_index=95))


def test_check_kernels_accepts_known_names_and_strings():
    assert check_kernels([], "model.kernels") == []
    assert check_kernels(("liger", "compile"), "model.kernels") == ["liger", "compile"]
    assert check_kernels("liger", "model.kernels") == ["liger"]
    assert check_kernels("", "model.kernels") == []
    assert set(KERNELS) == {"liger", "compile"}


@pytest.mark.parametrize("bad", [["triton"], ["liger", "liger"], ["fused_linear_cross_entropy"]])
def test_check_kernels_rejects_unknown_or_repeated(bad):
    with pytest.raises(ValueError, match="teacher.kernels"):
        check_kernels(bad, "teacher.kernels")


def test_empty_kernels_change_nothing():
    model = tiny_llava()
    before = {n: type(m) for n, m in model.named_modules()}
    assert apply_kernels(model, []) == {}
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_decoder_layers_are_the_llms():
    model = tiny_llava()
    layers = decoder_layers(model)
    assert layers and all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)
    assert len(layers) == model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("kind", KERNELS)
def test_without_gpu_each_kernel_raises_a_clear_error(kind, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        apply_kernels(tiny_llava(), [kind])


def test_liger_missing_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = kernels_module.importlib.util.find_spec
    monkeypatch.setattr(kernels_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="liger-kernel package"):
        apply_kernels(tiny_llava(), ["liger"])


def test_model_and_teacher_configs_validate_kernels(tmp_path):
    from distill.training.config import ModelInit
    from distill.training.kd import TeacherConfig

    (tmp_path / "config.json").write_text("{}")
    assert ModelInit(artifact=str(tmp_path)).kernels == []
    assert ModelInit(artifact=str(tmp_path), kernels=["liger"]).kernels == ["liger"]
    with pytest.raises(ValueError, match="model.kernels"):
        ModelInit(artifact=str(tmp_path), kernels=["nope"])
    assert TeacherConfig(path=str(tmp_path), kernels=["liger", "compile"]).kernels == ["liger", "compile"]
    with pytest.raises(ValueError, match="teacher.kernels"):
        TeacherConfig(path=str(tmp_path), kernels=["compile", "compile"])


def test_stages_apply_the_configured_kernels(tiny_artifacts, monkeypatch):
    """The student's ``model.kernels`` reach the model the stages load (``load_model``), on top of its attention."""
    from distill.training import supervised
    from distill.training.config import ModelInit

    calls = []
    monkeypatch.setattr(supervised, "apply_kernels", lambda model, kernels: calls.append((type(model), kernels)))
    model, _ = supervised.load_model(ModelInit(artifact=str(tiny_artifacts / "student"), kernels=["compile"]))
    assert calls == [(type(model), ["compile"])]


def _compile_counting(layers: list[torch.nn.Module]) -> list:
    """Compile ``layers`` as ``kernels: [compile]`` does (``dynamic=True``), on CPU with a backend that only records
    the graphs Dynamo hands it (no inductor); returns that list, filled as the layers first run."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting(gm, _example_inputs):
        graphs.append(gm)
        return gm.forward

    for layer in layers:
        layer.compile(backend=counting, dynamic=True)
    return graphs


def _compiled_graphs(model, inputs, recorder=None) -> tuple[int, list[torch.Tensor], torch.Tensor]:
    """Compile each decoder layer (``_compile_counting``), run a forward and backward; the number of graphs, the
    recorded router logits, a router's grad."""
    graphs = _compile_counting(decoder_layers(model))
    out = model(**inputs, use_cache=False).logits
    logits = recorder.take() if recorder is not None else []
    (out.float().pow(2).mean() + sum(x.float().pow(2).mean() for x in logits)).backward()
    gate = decoder_layers(model)[-1].mlp.gate
    return len(graphs), logits, gate.weight.grad


def test_compiled_moe_layers_record_router_logits_without_a_graph_per_layer():
    """The router-logit hooks run inside the compiled layers: they must not make dynamo compile each layer apart
    (it guards on what a hook reads; past its recompile limit the layers ran uncompiled), and what they record
    (values and gradients) is what the uncompiled model records."""
    import copy

    from distill.models.upcycle import UpcycleConfig, upcycle
    from distill.training.moe import RouterRecorder

    text = LLMSize(num_hidden_layers=10).qwen2_config(vocab_size=96)
    base = LlavaForConditionalGeneration(LlavaConfig(vision_config=VisionSize().clip_vision_config(),
                                                     text_config=text, image_token_index=95))
    torch.manual_seed(0)
    moe = upcycle(base, UpcycleConfig(num_experts=4, top_k=2, layers="all"))
    inputs = {"input_ids": torch.randint(0, 90, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}

    eager = copy.deepcopy(moe)
    recorder = RouterRecorder(eager)
    out = eager(**inputs, use_cache=False).logits  # the reference, uncompiled
    ref_logits = recorder.take()
    (out.float().pow(2).mean() + sum(x.float().pow(2).mean() for x in ref_logits)).backward()
    ref_grad = decoder_layers(eager)[-1].mlp.gate.weight.grad
    with torch.no_grad():
        eager(**inputs, use_cache=False)
    recorder.remove()  # the recorder's entries go with it: nothing of it is left on the model
    assert not any(recorder.slot in vars(layer.mlp.gate) for layer in decoder_layers(eager))
    assert not any(layer.mlp.gate._forward_hooks for layer in decoder_layers(eager))

    bare_graphs, _, _ = _compiled_graphs(copy.deepcopy(moe), inputs)
    compiled = copy.deepcopy(moe)
    graphs, logits, grad = _compiled_graphs(compiled, inputs, RouterRecorder(compiled))
    assert graphs == bare_graphs < len(decoder_layers(moe))
    assert len(logits) == len(ref_logits) == 10
    for got, want in zip(logits, ref_logits, strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, ref_grad)


def test_liger_with_compile_is_refused_under_flex_attention(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the refusal comes before anything is applied
    model = tiny_llava()
    model.set_attn_implementation({"text_config": "flex_attention"})
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"liger', 'compile'\] with flex attention"):
        apply_kernels(model, ["liger", "compile"])
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(ValueError, match="model.kernels=.* with flex attention"):  # and at the config's start
        check_kernels(["compile", "liger"], "model.kernels", "flex_attention")
    assert check_kernels(["compile", "liger"], "model.kernels", "sdpa") == ["compile", "liger"]


def test_compiled_kd_step_has_no_graph_breaks(tiny_artifacts, tiny_world):
    """The D2D loss with every decoder layer of both models compiled (``kernels: [compile]``; on CPU with a
    counting backend): Dynamo traces each layer whole, in one graph per model and grad mode, and the loss is the
    uncompiled one. (Before: transformers' output-capturing hooks, installed by ``output_hidden_states=True``,
    broke every layer at a ContextVar read.)"""
    from torch._dynamo.utils import counters

    from distill.data.formats import load_llava_json
    from distill.models.student import load_vlm
    from distill.stages.imitation import build_collator
    from distill.training.config import DataConfig
    from distill.training.kd import KDConfig, KDLoss

    student, processor = load_vlm(tiny_artifacts / "student")
    teacher, teacher_processor = load_vlm(tiny_artifacts / "teacher")
    records = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])[0].select(range(3))
    data = DataConfig(train=[str(tiny_world["data"] / "instruct.json")], image_root=str(tiny_world["images"]))
    batch = build_collator(data, KDConfig(), processor, teacher_processor)(list(records))
    loss_fn = KDLoss(teacher.eval(), KDConfig(), alpha=0.5)
    want = loss_fn(student, batch, None)[0].detach()

    counters.clear()
    graphs = _compile_counting(decoder_layers(student) + decoder_layers(teacher))
    loss = loss_fn(student, batch, None)[0]
    loss.backward()
    assert dict(counters["graph_break"]) == {}
    assert len(graphs) == 2  # the student's layer (grad, autocast state) and the teacher's (no_grad)
    torch.testing.assert_close(loss.detach(), want)
