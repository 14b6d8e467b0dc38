"""The torch backend (the CPU path) against attention by definition in float64 (``naive_attention``)."""

import pytest
import torch

from lightning_icl.kernels import SUPPORTED_STATS, capture_attention
from lightning_icl.kernels.naive import naive_attention, naive_pattern
from lightning_icl.kernels.torch_attention import capture_attention_torch

ALL = SUPPORTED_STATS


def inputs(b, h, t, d, dtype=torch.float32, seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # views of one fused projection, as the model makes them
        qkv = torch.randn(b, t, 3, h, d, generator=g).permute(2, 0, 3, 1, 4).to(dtype)
        return qkv[0], qkv[1], qkv[2]
    return [torch.randn(b, h, t, d, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("t", [1, 7, 37, 129])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_reference_matches_naive_for_output_and_every_statistic(t, causal, strided):
    b, h, d, c = 2, 3, 16, 3
    q, k, v = inputs(b, h, t, d, strided=strided)
    key_class = torch.randint(c, (b, t), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(4, (b, t), generator=torch.Generator().manual_seed(2))
    out, stats = capture_attention(
        q, k, v, causal=causal, stats=ALL, key_class=key_class, num_classes=c, query_label=labels, backend="torch"
    )
    ref_out, ref = naive_attention(q, k, v, causal=causal, key_class=key_class, num_classes=c, query_label=labels)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    for name in ALL:
        assert stats[name].dtype == torch.float32 and not stats[name].requires_grad
        assert torch.isfinite(stats[name]).all(), name
        torch.testing.assert_close(stats[name].double(), ref[name], atol=2e-5, rtol=1e-4, msg=name)
    # mass over all classes is the whole row
    torch.testing.assert_close(stats["class_mass"].sum(-1), torch.ones(b, h, t), atol=1e-5, rtol=0)


def test_chunking_does_not_change_results():
    q, k, v = inputs(1, 2, 50, 16)
    kc = torch.randint(2, (1, 50))
    # 7 rows per chunk (2 heads x 50 keys x 7 rows) against everything at once
    a = capture_attention_torch(q, k, v, stats=ALL, key_class=kc, num_classes=2, query_label=kc, chunk_elements=700)
    b = capture_attention_torch(q, k, v, stats=ALL, key_class=kc, num_classes=2, query_label=kc)
    torch.testing.assert_close(a[0], b[0])
    for name in ALL:
        torch.testing.assert_close(a[1][name], b[1][name])


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_match_naive_and_do_not_depend_on_statistics(causal):
    q, k, v = inputs(2, 2, 19, 32, dtype=torch.float64)
    grads = []
    for stats in ((), ("entropy", "lse", "max_prob")):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out, _ = capture_attention(qq, kk, vv, causal=causal, stats=stats, backend="torch")
        out.square().sum().backward()
        grads.append([x.grad for x in (qq, kk, vv)])
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    ref_out, _ = naive_attention(qq, kk, vv, causal=causal)
    ref_out.square().sum().backward()
    for got in grads:
        for g, r in zip(got, (qq.grad, kk.grad, vv.grad), strict=True):
            torch.testing.assert_close(g, r)


def test_half_precision_error_is_close_to_pytorchs_own():
    q, k, v = inputs(2, 2, 64, 64, dtype=torch.float16)
    ref_out, ref = naive_attention(q, k, v, causal=True)
    out, stats = capture_attention(q, k, v, stats=("lse", "entropy"), backend="torch")
    torch_out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).half()
    ours = (out.double() - ref_out).abs().max()
    theirs = (torch_out.double() - ref_out).abs().max()
    assert ours <= 2 * theirs + 1e-3
    torch.testing.assert_close(stats["entropy"].double(), ref["entropy"], atol=1e-3, rtol=1e-3)


def test_custom_scale():
    q, k, v = inputs(1, 1, 9, 16)
    out, stats = capture_attention(q, k, v, sm_scale=0.5, stats=("lse",), backend="torch")
    ref_out, ref = naive_attention(q, k, v, causal=True, sm_scale=0.5)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stats["lse"].double(), ref["lse"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(q=torch.randn(2, 2, 5)), "q must be \\[B, H, T, Dh\\]"),
        (dict(k=torch.randn(2, 2, 5, 16, dtype=torch.float64)), "share a dtype"),
        (dict(k=torch.randn(2, 2, 6, 16), v=torch.randn(2, 2, 6, 16)), "as many queries as keys"),
        (dict(v=torch.randn(2, 2, 5, 32)), "k and v must have the same shape"),
        (dict(stats=("attention_pattern",)), "stats \\[.attention_pattern.\\] unknown"),
        (dict(stats=("class_mass",)), "needs key_class"),
        (
            dict(stats=("class_mass",), key_class=torch.full((2, 5), 3), num_classes=3),
            "key_class values must lie in \\[0, 3\\)",
        ),
        (dict(stats=("same_label_mass",)), "needs query_label"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_input_raises_a_clear_value_error(change, message):
    args = dict(q=torch.randn(2, 2, 5, 16), k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16))
    args.update({n: change.pop(n) for n in ("q", "k", "v") if n in change})
    with pytest.raises(ValueError, match=message):
        capture_attention(args["q"], args["k"], args["v"], **change)


def test_statistics_stay_fp32_accurate_under_autocast():
    q, k, v = inputs(1, 2, 40, 32, seed=3)
    _, plain = capture_attention(q, k, v, stats=("entropy", "lse"), backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mixed = capture_attention(q, k, v, stats=("entropy", "lse"), backend="torch")
    for name in ("entropy", "lse"):
        torch.testing.assert_close(mixed[name], plain[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_single_probabilities_from_lse_match_the_pattern(causal):
    from lightning_icl.kernels import attention_probability

    q, k, v = inputs(2, 3, 17, 16, dtype=torch.float64)
    _, stats = capture_attention(q, k, v, causal=causal, stats=("lse",), backend="torch")
    pattern = naive_pattern(q, k, causal=causal)
    prev = torch.arange(17) - 1  # previous token; -1 for the first query
    got = attention_probability(q, k, stats["lse"], prev, causal=causal)
    expected = torch.where(prev[None, None] >= 0, pattern[..., torch.arange(17), prev.clamp(min=0)], 0.0)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    later = torch.arange(17) + 1  # a key after the query: zero when causal
    got = attention_probability(q, k, stats["lse"], later, causal=causal)
    assert (got[..., :-1] == 0).all() if causal else (got[..., :-1] > 0).all()
    assert (got[..., -1] == 0).all()  # index 17 is out of range
