"""Sparse (cached top-k) teacher targets: with k = vocabulary the loss and gradients equal the live teacher's;
with a smaller k they equal the live ``top_k`` option; the chunked version equals the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.losses.kd import (
    DIVERGENCES,
    KDOptions,
    _log1mexp,
    chunked_kd_loss,
    chunked_sparse_kd_loss,
    sparse_token_divergence,
    token_divergence,
)

N, V, H = 12, 40, 16


def _cache(teacher_logits: torch.Tensor, k: int, tau: float = 1.0):
    """What data_prep/teacher_cache.py stores: top-k ids and log-probs at temperature tau, tail log-mass."""
    logp = F.log_softmax(teacher_logits.float() / tau, -1)
    top, ids = logp.topk(k, -1)
    return ids, top, _log1mexp(torch.logsumexp(top, -1))


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    value = fn(x).sum()
    value.backward()
    return value.detach(), x.grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [True, False])
def test_full_vocabulary_equals_live(divergence, tail):
    torch.manual_seed(0)
    s, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    opts = KDOptions(divergence=divergence, temperature=2.0, tail_bucket=tail)
    ids, logp, rest = _cache(t, V, tau=2.0)
    live, g_live = _grad(lambda x: token_divergence(x, t, KDOptions(divergence=divergence, temperature=2.0)), s)
    cached, g_cached = _grad(lambda x: sparse_token_divergence(x, ids, logp, rest, opts), s)
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    # An empty tail bucket still passes fp32 rounding of log(1 - sum p) into reverse KL / JSD gradients (~1e-6).
    torch.testing.assert_close(g_cached, g_live, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail", [True, False])
def test_small_k_equals_live_top_k(divergence, tail):
    torch.manual_seed(1)
    s, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    opts = KDOptions(divergence=divergence, top_k=8, tail_bucket=tail)
    live, g_live = _grad(lambda x: token_divergence(x, t, opts), s)
    ids, logp, rest = _cache(t, 8)
    cached, g_cached = _grad(lambda x: sparse_token_divergence(x, ids, logp, rest, opts), s)
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_cached, g_live, rtol=1e-5, atol=1e-7)
    # A cache of 16 read with kd.top_k = 8 keeps its first 8 and recomputes the tail.
    ids16, logp16, rest16 = _cache(t, 16)
    from16 = sparse_token_divergence(s, ids16, logp16, rest16, opts).sum()
    torch.testing.assert_close(from16, live, rtol=1e-5, atol=1e-6)


def test_chunked_sparse_equals_chunked_live():
    torch.manual_seed(2)
    h_s, w_s = torch.randn(N, H), torch.randn(V + 4, H) * 0.5  # the student's vocabulary is padded
    h_t, w_t = torch.randn(N, H), torch.randn(V, H) * 0.5
    targets = torch.randint(0, V, (N,))
    opts = KDOptions(temperature=1.5, tail_bucket=True)
    ids, logp, rest = _cache(h_t @ w_t.t(), V, tau=1.5)
    results = {}
    for name in ("live", "cached"):
        hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
        if name == "live":
            loss, kd, ce = chunked_kd_loss(hs, ws, h_t, w_t, targets, opts, alpha=0.5, chunk_size=5,
                                           num_items_in_batch=20)
        else:
            loss, kd, ce = chunked_sparse_kd_loss(hs, ws, ids, logp, rest, targets, opts, alpha=0.5, chunk_size=5,
                                                  num_items_in_batch=20, vocab_size=V)
        loss.backward()
        results[name] = (loss.detach(), kd, ce, hs.grad, ws.grad)
    for a, b in zip(results["cached"], results["live"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_cache_vocabulary_larger_than_students_is_refused():
    ids, logp, rest = _cache(torch.randn(2, V), 4)
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_sparse_kd_loss(torch.randn(2, H), torch.randn(V - 1, H), ids, logp, rest, torch.zeros(2).long(),
                               vocab_size=V)
