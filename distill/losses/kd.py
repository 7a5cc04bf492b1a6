"""Knowledge-distillation losses: forward / reverse KL, generalized JSD, total variation; plain and chunked.

Plain, on aligned logits (the reference implementation, and what tests compare against):

    loss = kd_loss(student_logits, teacher_logits, mask, KDOptions(divergence="forward_kl"))

Chunked, from the last hidden states through both LM heads, a chunk of tokens at a time, never holding
[tokens, vocab] logits of both models at once (same values and gradients as the plain version):

    loss, kd, ce = chunked_kd_loss(h_student, lm_head_s, h_teacher, lm_head_t, targets, options, alpha=1.0)

Conventions: softmax in fp32; temperature tau divides both models' logits and the loss is scaled by tau^2;
vocabularies that differ by padding are cut to the common range; the sum over tokens is divided by
``num_items_in_batch`` when given (exact under gradient accumulation), else by the number of tokens; zero
tokens give 0, not NaN.

Teacher top-k (``top_k``): both distributions are reduced to the teacher's k most likely tokens, either
renormalised over them (``tail_bucket=False``) or with one extra bucket holding the rest of the mass
(``tail_bucket=True``); the divergence is then taken between the reduced distributions.

Per-reply weights (``reply_weights``): each response token weighted 1 / its reply's length, so that every reply
counts once whatever its length (a one-token "yes" as much as a 30-token caption); the weighted sum is then divided
by the number of replies (``num_items_in_batch`` counts replies instead of tokens).

``paired_positions`` pairs the teacher's and the student's response positions through their label masks, so
the two models may see different numbers of image tokens.

Sparse (cached) teacher targets: ``sparse_token_divergence`` / ``chunked_sparse_kd_loss`` take, per token, the
teacher's top-k token ids and log-probs (already at the KD temperature) plus the log of the remaining mass, as
written by ``data_prep/teacher_cache.py``. The student is reduced to the same k tokens (+ tail bucket, or
renormalised over them) exactly as in the top-k option above, so with k = vocabulary size the result equals the
live teacher's full-vocabulary loss, and with the same k it equals the live ``top_k`` loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.losses.ce import IGNORE_INDEX, normalise

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
_LOG_FLOOR = -1e30  # keeps 0 * log 0 at 0 instead of NaN


@dataclass(frozen=True)
class KDOptions:
    divergence: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    """JSD mixing weight: the mixture is beta * teacher + (1 - beta) * student (TRL's convention)."""
    top_k: int | None = None
    tail_bucket: bool = False

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"kd.divergence={self.divergence!r}: expected one of {DIVERGENCES}")
        if self.temperature <= 0:
            raise ValueError("kd.temperature must be positive")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError("kd.beta must lie in [0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("kd.top_k must be at least 1 (or null for the full vocabulary)")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, floored instead of -inf."""
    return torch.log((-torch.expm1(x.clamp(max=0.0))).clamp_min(1e-30))


def _reduce_top_k(s_logp: torch.Tensor, t_logp: torch.Tensor, k: int, tail: bool):
    t_top, idx = t_logp.topk(min(k, t_logp.size(-1)), dim=-1)
    s_top = s_logp.gather(-1, idx)
    if tail:
        t_rest = _log1mexp(torch.logsumexp(t_top, -1, keepdim=True))
        s_rest = _log1mexp(torch.logsumexp(s_top, -1, keepdim=True))
        return torch.cat([s_top, s_rest], -1), torch.cat([t_top, t_rest], -1)
    return s_top - torch.logsumexp(s_top, -1, keepdim=True), t_top - torch.logsumexp(t_top, -1, keepdim=True)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """Per-token divergence, shape [N], from [N, V] logits of both models (fp32 inside)."""
    vocab = min(student_logits.size(-1), teacher_logits.size(-1))
    tau = opts.temperature
    s_logp = F.log_softmax(student_logits[..., :vocab].float() / tau, dim=-1)
    t_logp = F.log_softmax(teacher_logits[..., :vocab].float() / tau, dim=-1)
    if opts.top_k is not None:
        s_logp, t_logp = _reduce_top_k(s_logp, t_logp, opts.top_k, opts.tail_bucket)
    return _divergence(s_logp, t_logp, opts) * tau**2


def _divergence(s_logp: torch.Tensor, t_logp: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    """The divergence between two (possibly reduced) log-distributions over the last dim, unscaled."""
    s_logp, t_logp = s_logp.clamp_min(_LOG_FLOOR), t_logp.clamp_min(_LOG_FLOOR)
    if opts.divergence == "forward_kl":
        div = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    elif opts.divergence == "reverse_kl":
        div = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    elif opts.divergence == "tvd":
        div = 0.5 * (s_logp.exp() - t_logp.exp()).abs().sum(-1)
    else:
        beta = opts.beta
        if beta == 0.0:
            div = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        elif beta == 1.0:
            div = (s_logp.exp() * (s_logp - t_logp)).sum(-1)
        else:
            mix = torch.logsumexp(torch.stack([s_logp + math.log1p(-beta), t_logp + math.log(beta)]), dim=0)
            kl_t = (t_logp.exp() * (t_logp - mix)).sum(-1)
            kl_s = (s_logp.exp() * (s_logp - mix)).sum(-1)
            div = beta * kl_t + (1 - beta) * kl_s
    return div


def sparse_token_divergence(
    student_logits: torch.Tensor,
    target_ids: torch.Tensor,
    target_logp: torch.Tensor,
    target_tail: torch.Tensor,
    opts: KDOptions,
) -> torch.Tensor:
    """Per-token divergence, shape [N], from [N, V] student logits to cached sparse teacher targets.

    ``target_ids`` / ``target_logp`` [N, k]: the teacher's k most likely tokens (most likely first) and their
    log-probs at temperature ``opts.temperature``; ``target_tail`` [N]: log of the mass outside them. With
    ``opts.tail_bucket`` the divergence is taken over k + 1 buckets (forward KL:
    ``sum_k p_k (log p_k - s_k) + m (log m - log(1 - sum_k exp s_k))``), else over the k tokens renormalised.
    ``opts.top_k`` smaller than k keeps the first ``top_k`` targets (their tail is recomputed).
    """
    tau = opts.temperature
    s_logp = F.log_softmax(student_logits.float() / tau, dim=-1)
    ids, t_top, t_rest = target_ids.long(), target_logp.float(), target_tail.float().unsqueeze(-1)
    if opts.top_k is not None and opts.top_k < ids.size(-1):
        ids, t_top = ids[:, : opts.top_k], t_top[:, : opts.top_k]
        t_rest = _log1mexp(torch.logsumexp(t_top, -1, keepdim=True))
    s_top = s_logp.gather(-1, ids)
    if opts.tail_bucket:
        s_rest = _log1mexp(torch.logsumexp(s_top, -1, keepdim=True))
        s_red, t_red = torch.cat([s_top, s_rest], -1), torch.cat([t_top, t_rest], -1)
    else:
        s_red = s_top - torch.logsumexp(s_top, -1, keepdim=True)
        t_red = t_top - torch.logsumexp(t_top, -1, keepdim=True)
    return _divergence(s_red, t_red, opts) * tau**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    opts: KDOptions | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Divergence summed over the positions in ``mask`` (all if None), then normalised."""
    opts = opts or KDOptions()
    if mask is not None:
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    s = student_logits.reshape(-1, student_logits.size(-1))
    t = teacher_logits.reshape(-1, teacher_logits.size(-1))
    total = token_divergence(s, t, opts).sum()
    return normalise(total, s.size(0), num_items_in_batch)


def shifted_response_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions whose logits predict a labelled next token (the last position never does)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def _run_starts(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the first position of each run of consecutive True positions in a row of ``mask``."""
    starts = mask.clone()
    starts[:, 1:] &= ~mask[:, :-1]
    return starts


def reply_weights(mask: torch.Tensor) -> torch.Tensor:
    """[N] weights of the positions ``mask`` [B, T] selects (in its row-major order): 1 / the length of the run of
    consecutive selected positions in the row that holds each one. With a response mask a run is one reply (replies
    are separated by the unlabelled user turn, and a packed row's records by their prompts), so each reply's
    weights sum to 1."""
    run = torch.cumsum(_run_starts(mask).flatten().long(), 0)[mask.flatten()] - 1
    lengths = torch.bincount(run)
    return 1.0 / lengths[run].float()


def reply_starts(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with every response token but the first of each reply set to the ignore index: counting its
    labels counts replies (what ``num_items_in_batch`` holds under per-reply normalisation)."""
    return labels.masked_fill(~_run_starts(labels != IGNORE_INDEX), IGNORE_INDEX)


def flat_positions(mask: torch.Tensor) -> torch.Tensor:
    """The flat indices of ``mask``'s True positions (row-major, the order boolean indexing gives). Computed on the
    host from the collator's labels and sent ahead, they let ``select_positions`` run on the GPU without a host
    synchronisation (boolean indexing there needs one, to size its result)."""
    return mask.flatten().nonzero().squeeze(1)


def select_positions(x: torch.Tensor, index: torch.Tensor, mask_shape: torch.Size) -> torch.Tensor:
    """``x[mask]`` for ``index = flat_positions(mask)``: rows of ``x`` [B, T, ...] at the flat positions; ``x``'s
    first two dims must be the mask's (a check on shapes, not values: no synchronisation)."""
    if x.shape[:2] != mask_shape:
        raise ValueError(f"hidden states {tuple(x.shape[:2])} do not line up with the labels {tuple(mask_shape)}")
    return x.reshape(-1, *x.shape[2:]).index_select(0, index)


def paired_positions(student_labels: torch.Tensor, teacher_labels: torch.Tensor):
    """Matching (row, position) index pairs of the student's and the teacher's response predictions.

    Returns ``(student_mask, teacher_mask, targets)``: boolean [B, T_s] and [B, T_t] masks selecting the same
    response tokens in the same order, and the target token ids [N]. Raises if the response tokens differ. Cheapest
    on the host (labels as the collator made them): on a GPU its checks synchronise.
    """
    s_mask, t_mask = shifted_response_mask(student_labels), shifted_response_mask(teacher_labels)
    s_rows, t_rows = s_mask.sum(1), t_mask.sum(1)
    if not torch.equal(s_rows.cpu(), t_rows.cpu()):
        raise ValueError(
            f"teacher and student have different response lengths per sample ({t_rows.tolist()} vs "
            f"{s_rows.tolist()}): their tokenizers must give the same ids on the response"
        )
    s_targets = student_labels[:, 1:][s_mask[:, :-1]]
    t_targets = teacher_labels[:, 1:][t_mask[:, :-1]]
    if not torch.equal(s_targets.cpu(), t_targets.to(s_targets.device).cpu()):
        raise ValueError("teacher and student response token ids differ: KD needs a shared tokenizer on the response")
    return s_mask, t_mask, s_targets


def _chunk_loop(ctx, h_s, w_s, vocab, targets, alpha, chunk_size, denom, kd_of, matmul_dtype=None, weights=None):
    """Loss and its gradients chunk by chunk; ``kd_of(start, end, s_logits)`` gives a chunk's per-token KD [n].
    ``weights`` [N] (``reply_weights``) scale each token's KD and CE before the sum; None: 1 each.

    The three LM-head matrix products (logits, grad of the hidden states, grad of the head) run in
    ``matmul_dtype`` (default: the hidden states' dtype); the head's gradient is still accumulated in its own dtype.
    The gradients are stored on ``ctx`` for ``_stored_grads``; returns ``(loss, kd, ce)`` already normalised.
    """
    want_w = w_s.requires_grad
    mm = matmul_dtype or h_s.dtype
    ws = w_s.detach()[:vocab].to(mm)
    grad_h = torch.empty_like(h_s)
    # Accumulated in place chunk by chunk: no per-chunk [V, H] gradient is allocated (one reused buffer when the
    # products run in a narrower dtype than the head's, as addmm_ cannot mix dtypes).
    grad_w = torch.zeros_like(w_s) if want_w else None
    buf = torch.empty_like(ws) if want_w and mm != w_s.dtype else None
    kd_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=h_s.device)
    for start in range(0, h_s.size(0), chunk_size):
        end = min(start + chunk_size, h_s.size(0))
        hs = h_s.detach()[start:end].to(mm)
        s_logits = (hs @ ws.t()).requires_grad_(True)
        with torch.enable_grad():
            w = None if weights is None else weights[start:end]
            kd = _weighted_sum(kd_of(start, end, s_logits), w)
            loss = alpha * kd
            if alpha < 1.0:
                ce = _weighted_sum(F.cross_entropy(s_logits.float(), targets[start:end], reduction="none"), w)
                loss = loss + (1.0 - alpha) * ce
                ce_sum += ce.detach()
            (g_logits,) = torch.autograd.grad(loss, [s_logits])
        del s_logits
        g_logits = g_logits.to(mm)
        grad_h[start:end] = g_logits @ ws
        if buf is not None:
            torch.mm(g_logits.t(), hs, out=buf)
            grad_w[:vocab] += buf
        elif want_w:
            grad_w[:vocab].addmm_(g_logits.t(), hs)
        kd_sum += kd.detach()
    ctx.save_for_backward(grad_h, grad_w if want_w else torch.empty(0))
    ctx.want_w = want_w
    ctx.denom = denom
    loss = (alpha * kd_sum + (1.0 - alpha) * ce_sum) / denom
    ctx.mark_non_differentiable(kd_sum, ce_sum)
    return loss, kd_sum / denom, ce_sum / denom


def _weighted_sum(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values.sum() if weights is None else (values * weights).sum()


def _stored_grads(ctx, grad_loss):
    grad_h, grad_w = ctx.saved_tensors
    scale = grad_loss / ctx.denom
    return grad_h * scale.to(grad_h.dtype), grad_w * scale.to(grad_w.dtype) if ctx.want_w else None


class _ChunkedKD(torch.autograd.Function):
    """Loss and its gradients computed chunk by chunk in forward; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, targets, opts, alpha, chunk_size, denom, matmul_dtype, weights):
        vocab = min(w_s.size(0), w_t.size(0))
        wt = w_t.detach()[:vocab]

        def kd_of(start: int, end: int, s_logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_logits = h_t[start:end] @ wt.t()
            return token_divergence(s_logits, t_logits, opts)

        return _chunk_loop(ctx, h_s, w_s, vocab, targets, alpha, chunk_size, denom, kd_of, matmul_dtype, weights)

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        return (*_stored_grads(ctx, grad_loss), None, None, None, None, None, None, None, None, None)


class _ChunkedSparseKD(torch.autograd.Function):
    """As ``_ChunkedKD``, against cached sparse teacher targets instead of the teacher's hidden states."""

    @staticmethod
    def forward(ctx, h_s, w_s, t_ids, t_logp, t_tail, targets, opts, alpha, chunk_size, denom, vocab, matmul_dtype,
                weights):
        def kd_of(start: int, end: int, s_logits: torch.Tensor) -> torch.Tensor:
            return sparse_token_divergence(s_logits, t_ids[start:end], t_logp[start:end], t_tail[start:end], opts)

        return _chunk_loop(ctx, h_s, w_s, vocab, targets, alpha, chunk_size, denom, kd_of, matmul_dtype, weights)

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        return (*_stored_grads(ctx, grad_loss), None, None, None, None, None, None, None, None, None, None, None)


def _items(n: int, weights: torch.Tensor | None) -> torch.Tensor | int:
    """What the loss is divided by when the Trainer gives no count: the tokens, or the weights' sum (replies)."""
    return n if weights is None else weights.sum()


def _denominator(n: torch.Tensor | int, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float:
    """The divisor, at least 1. A tensor count stays a tensor on its device: reading it on the host would stop the
    host from queueing the step's work ahead of the GPU."""
    denom = num_items_in_batch if num_items_in_batch is not None else n
    if isinstance(denom, torch.Tensor):
        if denom.numel() != 1:
            raise ValueError(f"num_items_in_batch must be one count, got shape {tuple(denom.shape)}")
        return denom.detach().float().reshape(()).clamp_min(1.0)
    return max(float(denom), 1.0)


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_head: torch.Tensor,
    targets: torch.Tensor,
    opts: KDOptions | None = None,
    alpha: float = 1.0,
    chunk_size: int = 1024,
    num_items_in_batch: torch.Tensor | int | None = None,
    matmul_dtype: torch.dtype | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``alpha * KD + (1 - alpha) * CE`` from paired hidden states [N, H] and LM-head weights [V, H].

    Returns ``(loss, kd, ce)``; only ``loss`` carries gradients (into ``student_hidden`` and, if it requires
    grad, ``student_head``). ``targets`` are the response token ids, used by the CE term. ``matmul_dtype``
    (e.g. bf16 under mixed precision, where the hidden states and master weights are fp32): the dtype of the
    student's LM-head products; the softmaxes and divergences stay in fp32 either way. ``weights`` [N]: per-token
    weights of both terms (``reply_weights``); the default divisor is then their sum.
    """
    opts = opts or KDOptions()
    denom = _denominator(_items(student_hidden.size(0), weights), num_items_in_batch)
    return _ChunkedKD.apply(student_hidden, student_head, teacher_hidden.detach(), teacher_head.detach(), targets,
                            opts, float(alpha), int(chunk_size), denom, matmul_dtype, weights)


def chunked_sparse_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    target_ids: torch.Tensor,
    target_logp: torch.Tensor,
    target_tail: torch.Tensor,
    targets: torch.Tensor,
    opts: KDOptions | None = None,
    alpha: float = 1.0,
    chunk_size: int = 1024,
    num_items_in_batch: torch.Tensor | int | None = None,
    vocab_size: int | None = None,
    matmul_dtype: torch.dtype | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``chunked_kd_loss`` against cached sparse teacher targets ([N, k] ids and log-probs, [N] tail log-mass).

    ``vocab_size``: the teacher's vocabulary (the cache's); the student's logits are cut to it, as the live loss
    cuts both models to their common range. It must not exceed the student's.
    """
    opts = opts or KDOptions()
    vocab = student_head.size(0) if vocab_size is None else int(vocab_size)
    if vocab > student_head.size(0):
        raise ValueError(f"teacher cache vocabulary ({vocab}) is larger than the student's ({student_head.size(0)})")
    denom = _denominator(_items(student_hidden.size(0), weights), num_items_in_batch)
    return _ChunkedSparseKD.apply(student_hidden, student_head, target_ids, target_logp, target_tail, targets, opts,
                                  float(alpha), int(chunk_size), denom, vocab, matmul_dtype, weights)
