"""The flex-attention block mask of a packed row, built from its records' boundaries without compiling anything.

Given a packed row (``data.packing``: ``position_ids`` restart at 0 for each record, no attention mask),
transformers builds the mask itself in every forward: ``create_block_mask(..., _compile=True)``, a
``torch.compile`` of a function that evaluates the mask for every (query, key) pair of the row. On an H200 the first
such compile for a 10k-token row (D2S at micro-batch 12) was still in Triton's code generation after 250 s
(BENCHMARKS.md). A causal mask inside each record needs none of that: whether a 128 x 128 block is empty, full or
partial follows from the records that the block's queries and keys belong to, a few operations on ``[blocks]``
tensors. transformers uses a given ``BlockMask`` as it is.

    from distill.training.blockmask import packed_block_mask, use_packed_block_masks
    llm(input_ids=ids, position_ids=pos, attention_mask=packed_block_mask(pos))  # a text model, by hand
    use_packed_block_masks(vlm)  # or for every packed row a model's text decoder sees (data.packing_block_mask)

The same blocks and mask function as ``create_block_mask`` (test: equal block layouts, equal logits).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

BLOCK_SIZE = 128
"""flex attention's default block size (both sides)."""


def record_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[tokens]``: the record of each token of one packed row (a new record wherever the position does not
    follow the previous one by 1, as transformers reads packed rows)."""
    pos = position_ids.reshape(-1)
    step = torch.diff(pos, prepend=pos[:1] - 1)
    return (step != 1).cumsum(0)


def packed_block_mask(position_ids: torch.Tensor, block_size: int = BLOCK_SIZE) -> BlockMask:
    """Causal attention inside each record of one packed row (``position_ids`` of shape ``[1, tokens]``)."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(f"packed_block_mask: position_ids of one packed row, [1, tokens]; got "
                         f"{tuple(position_ids.shape)}")
    doc = record_ids(position_ids)
    n = doc.numel()
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    # Each block's first and last record (records are contiguous and numbered in order, so a block holds every
    # record between them); padding repeats the last token, which is never a full block's.
    padded = torch.cat([doc, doc[-1:].expand(pad)]).view(blocks, block_size)
    first, last = padded[:, 0], padded[:, -1]
    q_first, q_last = first[:, None], last[:, None]
    k_first, k_last = first[None, :], last[None, :]
    index = torch.arange(blocks, device=doc.device)
    below = index[None, :] < index[:, None]  # key block before the query block: every pair is causal
    diagonal = index[None, :] == index[:, None]
    shares_record = (k_first <= q_last) & (k_last >= q_first)
    complete = torch.ones(blocks, dtype=torch.bool, device=doc.device)
    if pad:
        complete[-1] = False  # the padded block is never full (its padded keys and queries are masked)
    one_record = (q_first == q_last) & (k_first == k_last) & (k_first == q_first)
    full = below & one_record & complete[:, None] & complete[None, :]
    partial = (below | diagonal) & shares_record & ~full

    row = doc[None]  # indexed by the batch index too: inductor's CPU code for flex fails on a 1-D lookup

    def mask_mod(b, h, q, k):
        return (k <= q) & (row[b, q] == row[b, k])

    def as_kv(blocks_on: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = blocks_on.sum(-1, dtype=torch.int32)
        indices = torch.argsort((~blocks_on).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    kv_num, kv_idx = as_kv(partial)
    full_num, full_idx = as_kv(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def _add_block_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    pos = kwargs.get("position_ids")
    if kwargs.get("attention_mask") is not None or pos is None or pos.dim() != 2 or pos.shape[0] != 1:
        return None
    return args, {**kwargs, "attention_mask": packed_block_mask(pos)}


def block_mask_refusal(model: torch.nn.Module) -> str | None:
    """Why ``packed_block_mask`` cannot stand in for the mask ``model``'s text layers would build (None: it can).
    It is a causal mask inside each record, so every text layer must attend that way, through flex attention."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config()
    if text._attn_implementation != "flex_attention":
        return f"it attends with {text._attn_implementation!r}; packed block masks are flex attention's"
    kinds = getattr(text, "layer_types", None)  # where a config has them, they decide (Qwen2-MoE keeps a window of 0)
    if kinds is not None and set(kinds) != {"full_attention"}:
        return f"its text layers attend as {sorted(set(kinds))}"
    if kinds is None and getattr(text, "sliding_window", None):
        return f"its text layers attend through a sliding window ({text.sliding_window} tokens)"
    if getattr(text, "attention_chunk_size", None) or getattr(text, "use_bidirectional_attention", False):
        return "its text layers do not attend causally over the whole record"
    return None


def use_packed_block_masks(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Give ``model``'s text decoder ``packed_block_mask`` for every packed row it is called with and no mask, in
    place of the mask transformers would compile; returns the hook's handle. The hook sits on the decoder
    (``get_decoder()``), not on the whole model: a model that builds a mask of its own for its text layers (an
    image's tokens attending to each other, a prefix) hands that mask down, and the hook leaves it alone."""
    refusal = block_mask_refusal(model)
    if refusal is not None:
        raise ValueError(f"packed block masks: {type(model).__name__} cannot use them: {refusal}")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return decoder.register_forward_pre_hook(_add_block_mask, with_kwargs=True)
