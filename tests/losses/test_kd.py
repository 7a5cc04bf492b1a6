"""KD losses against references: TRL's generalized JSD, a direct TVD, LLaVA-MoD's formula; chunked == plain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from trl.experimental.gkd.gkd_trainer import GKDTrainer

from distill.losses.kd import (
    KDOptions,
    chunked_kd_loss,
    chunked_sparse_kd_loss,
    flat_positions,
    kd_loss,
    paired_positions,
    reply_weights,
    select_positions,
    token_divergence,
)


def _logits(seed: int, shape=(3, 5, 11)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 2


@pytest.mark.parametrize(("divergence", "beta"), [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5),
                                                  ("jsd", 0.2)])
def test_matches_trl_generalized_jsd(divergence, beta):
    s, t = _logits(0), _logits(1)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    ours = kd_loss(s, t, labels != -100, KDOptions(divergence=divergence, beta=beta))
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta, temperature=1.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_tvd_matches_direct_reference():
    s, t = _logits(2), _logits(3)
    ref = 0.5 * (s.softmax(-1) - t.softmax(-1)).abs().sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, opts=KDOptions(divergence="tvd")), ref)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_divergence_of_a_distribution_with_itself_is_zero(divergence):
    s = _logits(4)
    assert float(kd_loss(s, s.clone(), opts=KDOptions(divergence=divergence))) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_fully_masked_batch_gives_zero_not_nan(divergence):
    s = _logits(5).requires_grad_()
    loss = kd_loss(s, _logits(6), torch.zeros(3, 5, dtype=torch.bool), KDOptions(divergence=divergence))
    assert float(loss) == 0.0
    loss.backward()
    assert torch.isfinite(s.grad).all()


def test_forward_kl_equals_llava_mod_formula():
    """LLaVA-MoD: CE against the teacher's soft targets; minus the teacher's entropy it is the KL."""
    s, t = _logits(7), _logits(8)
    p_t = t.softmax(-1)
    soft_ce = -(p_t * s.log_softmax(-1)).sum(-1).mean()
    entropy = -(p_t * t.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t), soft_ce - entropy)


def test_temperature_scales_by_tau_squared():
    s, t = _logits(9), _logits(10)
    tau = 2.0
    ref = F.kl_div((s / tau).log_softmax(-1), (t / tau).log_softmax(-1), log_target=True, reduction="none")
    torch.testing.assert_close(kd_loss(s, t, opts=KDOptions(temperature=tau)), ref.sum(-1).mean() * tau**2)


def test_top_k_full_vocab_equals_plain_and_tail_bucket_is_a_distribution():
    s, t = _logits(11), _logits(12)
    torch.testing.assert_close(kd_loss(s, t, opts=KDOptions(top_k=11)), kd_loss(s, t), rtol=1e-4, atol=1e-5)
    k3 = kd_loss(s, t, opts=KDOptions(top_k=3))
    k3_tail = kd_loss(s, t, opts=KDOptions(top_k=3, tail_bucket=True))
    assert torch.isfinite(k3) and torch.isfinite(k3_tail) and float(k3_tail) >= 0
    # Data-processing inequality: merging buckets cannot increase the KL.
    assert float(k3_tail) <= float(kd_loss(s, t)) + 1e-6


def test_vocab_padding_is_cut_to_the_common_range():
    s, t = _logits(13, (4, 11)), _logits(14, (4, 16))
    torch.testing.assert_close(token_divergence(s, t, KDOptions()), token_divergence(s, t[:, :11], KDOptions()))


def test_num_items_in_batch_normalisation():
    s, t = _logits(15), _logits(16)
    total = kd_loss(s, t) * 15
    torch.testing.assert_close(kd_loss(s, t, num_items_in_batch=torch.tensor(30)), total / 30)


@pytest.mark.parametrize(("divergence", "alpha", "top_k"), [("forward_kl", 1.0, None), ("jsd", 0.7, None),
                                                            ("reverse_kl", 0.5, 4), ("tvd", 1.0, None)])
def test_chunked_equals_plain_values_and_gradients(divergence, alpha, top_k):
    torch.manual_seed(0)
    n, h, v_s, v_t = 37, 8, 50, 56
    hs = torch.randn(n, h, dtype=torch.float32, requires_grad=True)
    ws = torch.randn(v_s, h, requires_grad=True)
    ht, wt = torch.randn(n, h), torch.randn(v_t, h)
    targets = torch.randint(0, v_s, (n,))
    opts = KDOptions(divergence=divergence, top_k=top_k)

    s_logits, t_logits = hs @ ws.t(), ht @ wt.t()
    plain = alpha * token_divergence(s_logits, t_logits, opts).sum()
    plain = plain + (1 - alpha) * F.cross_entropy(s_logits, targets, reduction="sum")
    plain = plain / 40
    g_plain = torch.autograd.grad(plain, [hs, ws])

    loss, kd, ce = chunked_kd_loss(hs, ws, ht, wt, targets, opts, alpha, chunk_size=8, num_items_in_batch=40)
    g_chunk = torch.autograd.grad(loss, [hs, ws])
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_chunk, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alpha * kd + (1 - alpha) * ce, loss)


def test_bf16_head_products_track_fp32_and_keep_fp32_gradients():
    """``matmul_dtype=bf16`` (mixed-precision training): fp32 hidden states and head in, bf16 products inside;
    loss and gradients stay within bf16 rounding of the fp32 computation and come back in fp32 (the head's
    gradient accumulated over the chunks in fp32)."""
    torch.manual_seed(0)
    n, h, v = 40, 16, 64
    hs = torch.randn(n, h, requires_grad=True)
    ws = (torch.randn(v, h) * 0.3).requires_grad_(True)
    ht, wt = torch.randn(n, h), torch.randn(v, h) * 0.3
    targets = torch.randint(0, v, (n,))
    ref = chunked_kd_loss(hs, ws, ht, wt, targets, KDOptions(), 0.5, chunk_size=8)[0]
    g_ref = torch.autograd.grad(ref, [hs, ws])
    low = chunked_kd_loss(hs, ws, ht, wt, targets, KDOptions(), 0.5, chunk_size=8, matmul_dtype=torch.bfloat16)[0]
    g_low = torch.autograd.grad(low, [hs, ws])
    assert low.dtype == torch.float32 and all(g.dtype == torch.float32 for g in g_low)
    torch.testing.assert_close(low, ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g_low, g_ref):
        assert (a - b).norm() / b.norm() < 2e-2
    assert not torch.equal(g_low[1], g_ref[1])  # the products really ran in bf16


def test_head_dtype_follows_the_trainers_precision():
    from distill.training.kd import KDConfig

    assert KDConfig().matmul_dtype(bf16_training=True) == torch.bfloat16
    assert KDConfig().matmul_dtype(bf16_training=False) is None
    assert KDConfig(head_dtype="fp32").matmul_dtype(bf16_training=True) == torch.float32
    with pytest.raises(ValueError, match="head_dtype"):
        KDConfig(head_dtype="fp16")


def test_paired_positions_handle_different_image_token_counts():
    # Student: 2 image tokens; teacher: 5. The same response [7, 8, 9] after a 1-token prompt.
    s_labels = torch.tensor([[-100, -100, -100, 7, 8, 9, -100]])
    t_labels = torch.tensor([[-100, -100, -100, -100, -100, -100, 7, 8, 9]])
    s_mask, t_mask, targets = paired_positions(s_labels, t_labels)
    assert s_mask.nonzero()[:, 1].tolist() == [2, 3, 4]
    assert t_mask.nonzero()[:, 1].tolist() == [5, 6, 7]
    assert targets.tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="token ids differ"):
        paired_positions(s_labels, torch.tensor([[-100, -100, 7, 8, 5]]))
    with pytest.raises(ValueError, match="response lengths"):
        paired_positions(s_labels, torch.tensor([[-100, -100, 7, 8]]))


@pytest.mark.parametrize("shape", [(3, 7), (1, 19)])  # padded rows; one packed row
def test_select_positions_equal_boolean_indexing(shape):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) > 0.5
    x = torch.randn(*shape, 4, generator=g, requires_grad=True)
    picked = select_positions(x, flat_positions(mask), mask.shape)
    assert torch.equal(picked, x[mask])
    picked.sum().backward()
    assert torch.equal(x.grad, mask[..., None].float().expand_as(x))
    with pytest.raises(ValueError, match="line up"):  # hidden states longer than the labels: refused, not misread
        select_positions(torch.randn(shape[0], shape[1] + 2, 4), flat_positions(mask), mask.shape)


def test_reply_weights_give_each_reply_a_total_of_one():
    mask = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 0],   # replies of 3 and 1 tokens
                         [1, 1, 0, 1, 1, 1, 1, 1],   # a reply at the row start; 2 and 5 tokens
                         [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    w = reply_weights(mask)
    expected = torch.tensor([1 / 3] * 3 + [1.0] + [1 / 2] * 2 + [1 / 5] * 5)
    torch.testing.assert_close(w, expected)
    assert w.sum().item() == pytest.approx(4.0)  # four replies
    run_across_rows = torch.tensor([[0, 1], [1, 0]], dtype=torch.bool)  # row ends split runs
    torch.testing.assert_close(reply_weights(run_across_rows), torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_reply_weighted_chunked_equals_plain_weighted_mean(alpha):
    """Each token's KD and CE times its weight, summed, divided by the weights' sum (the number of replies)."""
    torch.manual_seed(1)
    n, h, v = 11, 8, 30
    hs = torch.randn(n, h, requires_grad=True)
    ws = torch.randn(v, h, requires_grad=True)
    ht, wt = torch.randn(n, h), torch.randn(v, h)
    targets = torch.randint(0, v, (n,))
    weights = reply_weights(torch.tensor([[0, 1, 1, 1, 0, 0, 1, 0], [1, 1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool))
    opts = KDOptions()

    s_logits, t_logits = hs @ ws.t(), ht @ wt.t()
    per_token = alpha * token_divergence(s_logits, t_logits, opts)
    per_token = per_token + (1 - alpha) * F.cross_entropy(s_logits, targets, reduction="none")
    plain = (per_token * weights).sum() / 4
    g_plain = torch.autograd.grad(plain, [hs, ws])

    loss, _, _ = chunked_kd_loss(hs, ws, ht, wt, targets, opts, alpha, chunk_size=3, weights=weights)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(loss, [hs, ws]), g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the Trainer's reply count over the accumulated batch replaces the default divisor
    loss8, _, _ = chunked_kd_loss(hs, ws, ht, wt, targets, opts, alpha, chunk_size=3, weights=weights,
                                  num_items_in_batch=8)
    torch.testing.assert_close(loss8, plain / 2)
    # the sparse (teacher cache) path weights the same way: full-vocabulary targets give the live loss
    t_logp = F.log_softmax(t_logits, -1)
    ids = torch.arange(v).expand(n, v)
    sparse, _, _ = chunked_sparse_kd_loss(hs, ws, ids, t_logp, torch.full((n,), -torch.inf), targets,
                                          KDOptions(tail_bucket=True), alpha, chunk_size=3, weights=weights)
    torch.testing.assert_close(sparse, plain, rtol=1e-4, atol=1e-5)
