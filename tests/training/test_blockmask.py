"""packed_block_mask gives the blocks and mask that transformers' create_block_mask gives a packed row."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from distill.training.blockmask import packed_block_mask, record_ids


def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def _layout(mask) -> tuple[torch.Tensor, torch.Tensor]:
    """[q blocks, kv blocks] booleans: partial blocks, full blocks."""
    def dense(num, idx):
        num, idx = num[0, 0], idx[0, 0]
        out = torch.zeros(idx.shape[0], idx.shape[1], dtype=torch.bool)
        for row in range(idx.shape[0]):
            out[row, idx[row, :num[row]].long()] = True
        return out
    return dense(mask.kv_num_blocks, mask.kv_indices), dense(mask.full_kv_num_blocks, mask.full_kv_indices)


LENGTHS = [[300], [128, 128, 256], [5, 7, 200, 1, 90, 400], [1000, 24], [127, 129, 50], [64] * 9, [256]]


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("block", [128, 64])
def test_same_blocks_as_create_block_mask(lengths, block):
    pos = _positions(lengths)
    doc = record_ids(pos)
    assert doc.tolist() == [i for i, n in enumerate(lengths) for _ in range(n)]

    def reference_mod(b, h, q, k):
        return (k <= q) & (doc[q] == doc[k])

    n = pos.shape[1]
    want = create_block_mask(reference_mod, 1, None, n, n, device="cpu", BLOCK_SIZE=block)
    got = packed_block_mask(pos, block_size=block)
    for mine, ref in zip(_layout(got), _layout(want), strict=True):
        assert torch.equal(mine, ref)
    assert got.seq_lengths == (n, n)
    assert torch.equal(got.to_dense(), want.to_dense())


def test_rejects_a_padded_batch():
    with pytest.raises(ValueError, match="one packed row"):
        packed_block_mask(torch.arange(6).view(2, 3))


def test_same_logits_as_transformers_own_mask():
    """A packed row through a flex-attention LLM: the given mask, the one transformers builds (no cache: with one
    it would build a plain causal mask) and each record on its own agree."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = Qwen2ForCausalLM(cfg).eval()
    lengths = [40, 150, 3, 70]
    pos = _positions(lengths)
    ids = torch.randint(0, 64, pos.shape)
    with torch.no_grad():
        model.set_attn_implementation("flex_attention")
        own = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        given = model(input_ids=ids, position_ids=pos, attention_mask=packed_block_mask(pos), use_cache=False).logits
        model.set_attn_implementation("sdpa")
        alone = torch.cat([model(input_ids=part, use_cache=False).logits
                           for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(given, own)
    torch.testing.assert_close(given, alone, atol=1e-5, rtol=1e-4)


def test_the_hook_masks_packed_rows_only():
    from distill.training.blockmask import use_packed_block_masks

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, input_ids, position_ids=None, attention_mask=None):
            seen.append(attention_mask)
            return input_ids

    probe = Probe()
    handle = use_packed_block_masks(probe)
    pos = _positions([3, 200])
    probe(input_ids=torch.zeros_like(pos), position_ids=pos)
    padded_mask = torch.ones(2, 5)
    probe(input_ids=torch.zeros(2, 5), attention_mask=padded_mask)
    probe(input_ids=torch.zeros(1, 5))
    handle.remove()
    probe(input_ids=torch.zeros_like(pos), position_ids=pos)
    assert torch.equal(seen[0].to_dense(), packed_block_mask(pos).to_dense())
    assert seen[1] is padded_mask and seen[2] is None and seen[3] is None

    from transformers import Qwen2Config, Qwen2ForCausalLM

    sdpa = Qwen2ForCausalLM(Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))
    sdpa.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="flex attention's"):
        use_packed_block_masks(sdpa)


def _hooks(model) -> int:
    return len(model.get_decoder()._forward_pre_hooks)


def test_prepare_packing_hooks_the_flex_models_that_take_it(tiny_artifacts):
    """The stages' entry (``prepare_packing``): flex-attention models get the hook on their text decoder, the
    upcycled MoE student included (its Qwen2-MoE config keeps a sliding window of 0 with full-attention layers);
    SDPA models, a sliding-window LLM, a teacher cache and ``packing_block_mask=false`` do not."""
    from types import SimpleNamespace

    from transformers import MistralConfig, MistralForCausalLM

    from distill.models.student import load_vlm
    from distill.models.upcycle import UpcycleConfig, upcycle
    from distill.training.blockmask import block_mask_refusal
    from distill.training.supervised import prepare_packing

    on, off = SimpleNamespace(packing=True, packing_block_mask=True), SimpleNamespace(packing=True,
                                                                                       packing_block_mask=False)
    dense, _ = load_vlm(tiny_artifacts / "student")
    moe = upcycle(load_vlm(tiny_artifacts / "student")[0], UpcycleConfig(num_experts=4, top_k=2, layers="all"))
    sdpa, _ = load_vlm(tiny_artifacts / "teacher")
    sliding = MistralForCausalLM(MistralConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, sliding_window=16))
    for model in (dense, moe, sliding):
        model.set_attn_implementation("flex_attention")
    sdpa.set_attn_implementation("sdpa")
    assert block_mask_refusal(moe) is None and "sliding window" in block_mask_refusal(sliding)

    prepare_packing(off, dense)
    assert _hooks(dense) == 0
    prepare_packing(on, dense, moe, sdpa, sliding, object())  # object(): a teacher cache is no model
    assert (_hooks(dense), _hooks(moe), _hooks(sdpa), _hooks(sliding)) == (1, 1, 0, 0)
    prepare_packing(SimpleNamespace(packing=False), sdpa)
    assert _hooks(sdpa) == 0


def test_with_the_hook_transformers_builds_no_mask(monkeypatch):
    """The point of the hook: transformers' ``create_block_mask`` (compiled, minutes for a long row's first compile
    on a GPU) is never called for a packed row; without the hook it is."""
    import transformers.masking_utils as masking
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.training.blockmask import use_packed_block_masks

    def refuse(*args, **kwargs):
        raise AssertionError("transformers built the block mask")

    monkeypatch.setattr(masking, "create_block_mask", refuse)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    model.set_attn_implementation("flex_attention")
    pos = _positions([30, 50])
    ids = torch.randint(0, 32, pos.shape)
    with torch.no_grad(), pytest.raises(AssertionError, match="transformers built"):
        model(input_ids=ids, position_ids=pos, use_cache=False)
    use_packed_block_masks(model)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, position_ids=pos, use_cache=False).logits).all()
