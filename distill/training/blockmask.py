"""The flex-attention block mask of a packed row, built from its records' boundaries without compiling anything.

Given a packed row (``data.packing``: ``position_ids`` restart at 0 for each record, no attention mask),
transformers builds the mask itself in every forward: ``create_block_mask(..., _compile=True)``, a
``torch.compile`` of a function that evaluates the mask for every (query, key) pair of the row. On an H200 the first
such compile for a 10k-token row (D2S at micro-batch 12) was still in Triton's code generation after 250 s
(BENCHMARKS.md). A causal mask inside each record needs none of that: whether a 128 x 128 block is empty, full or
partial follows from the records that the block's queries and keys belong to, a few operations on ``[blocks]``
tensors. Pass the result as the model's ``attention_mask`` (transformers uses a given ``BlockMask`` as it is).

    from distill.training.blockmask import packed_block_mask
    model(input_ids=ids, position_ids=pos, attention_mask=packed_block_mask(pos))

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


def use_packed_block_masks(model: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """Give ``model`` (a flex-attention model fed packed rows) ``packed_block_mask`` for every packed row it is
    called with, in place of the mask transformers would compile; returns the hook's handle."""
    config = getattr(model, "config", None)
    attn = config.get_text_config()._attn_implementation if config is not None else "flex_attention"
    if attn != "flex_attention":
        raise ValueError(f"packed block masks are flex attention's; this model attends with {attn!r}")
    return model.register_forward_pre_hook(_add_block_mask, with_kwargs=True)
