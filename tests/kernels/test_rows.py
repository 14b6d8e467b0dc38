"""Statistics at requested query rows, the short-sequence kernels and the few-class mass path.

Every path is checked against float64 maths by definition: the torch backend (CPU path) always,
the Triton kernels under the interpreter (``TRITON_INTERPRET=1``) or on CUDA. Requested-rows
statistics must equal the all-rows statistics gathered at those rows.
"""

import os

import pytest
import torch

from lightning_icl.kernels import SUPPORTED_STATS, capture_attention
from lightning_icl.kernels.naive import naive_attention
from lightning_icl.kernels.torch_attention import capture_attention_torch

ALL = SUPPORTED_STATS
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_device() -> str:
    if INTERPRETED:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("the kernel needs the interpreter or CUDA")


def gather(stats: dict, positions: torch.Tensor) -> dict:
    b, h = next(iter(stats.values())).shape[:2]
    pos = positions.expand(b, -1) if positions.dim() == 1 else positions
    out = {}
    for name, x in stats.items():
        index = pos[:, None, :].expand(b, h, -1)
        if x.dim() == 4:
            index = index[..., None].expand(-1, -1, -1, x.shape[3])
        out[name] = torch.gather(x, 2, index.to(x.device))
    return out


def problem(b, h, t, d, device, num_classes=3, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    key_class = torch.randint(num_classes, (b, t), generator=g).to(device)
    labels = torch.randint(4, (b, t), generator=g).to(device)
    return q, k, v, key_class, labels


def row_sets(b, t):
    """Shared rows, per-sequence rows (unsorted, with a repeat), the last row alone."""
    g = torch.Generator().manual_seed(5)
    shared = torch.tensor(sorted({0, t // 3, t - 1}))
    per_row = torch.stack([torch.randint(t, (4,), generator=g) for _ in range(b)])
    per_row[0, 1] = per_row[0, 0]
    return {"shared": shared, "per_sequence": per_row, "last": torch.tensor([t - 1])}


def assert_rows_match(got, full, reference, positions, atol):
    for name in ALL:
        assert got[name].dtype == torch.float32 and not got[name].requires_grad
        assert got[name].shape[2] == positions.shape[-1], name
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], full[name], atol=atol, rtol=0, msg=f"{name}: rows vs all rows")
        torch.testing.assert_close(got[name].double(), reference[name], atol=atol, rtol=0, msg=f"{name}: vs float64")


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("t", [1, 9, 70])
def test_reference_rows_equal_all_rows_gathered(causal, t):
    b, h, d, c = 2, 3, 16, 3
    q, k, v, kc, labels = problem(b, h, t, d, "cpu")
    kw = dict(causal=causal, stats=ALL, key_class=kc, num_classes=c, query_label=labels, backend="torch")
    out_all, full = capture_attention(q, k, v, **kw)
    _, exact = naive_attention(q, k, v, causal=causal, key_class=kc, num_classes=c, query_label=labels)
    for rows in row_sets(b, t).values():
        out, got = capture_attention(q, k, v, positions=rows, **kw)
        torch.testing.assert_close(out, out_all, atol=0, rtol=0)  # the output covers every row regardless
        assert_rows_match(got, gather(full, rows), gather(exact, rows), rows, atol=2e-5)


def test_reference_chunks_rows_when_the_score_block_is_large():
    q, k, v, kc, labels = problem(1, 2, 40, 16, "cpu")
    rows = torch.arange(1, 40, 3)
    kw = dict(stats=ALL, key_class=kc, num_classes=3, query_label=labels, positions=rows[None])
    _, whole = capture_attention_torch(q, k, v, **kw)
    _, chunked = capture_attention_torch(q, k, v, chunk_elements=2 * 40 * 3, **kw)  # 3 rows at a time
    for name in ALL:
        torch.testing.assert_close(chunked[name], whole[name], atol=1e-6, rtol=0)


def test_reference_without_sdpa_lse_gives_the_same_statistics(monkeypatch):
    """Where torch hands out no log-sum-exp, the pass computes its own normaliser."""
    from lightning_icl.kernels import torch_attention

    q, k, v, kc, labels = problem(2, 2, 33, 16, "cpu")
    kw = dict(stats=ALL, key_class=kc, num_classes=3, query_label=labels, positions=torch.tensor([0, 5, 32]))
    _, with_lse = capture_attention_torch(q, k, v, **kw)
    plain = lambda q, k, v, causal, scale: (torch.nn.functional.scaled_dot_product_attention(q, k, v), None)
    monkeypatch.setattr(torch_attention, "_sdpa_with_lse", plain)
    _, own = capture_attention_torch(q, k, v, **kw)
    for name in ALL:
        torch.testing.assert_close(own[name], with_lse[name], atol=2e-6, rtol=0)


@pytest.mark.parametrize("path", ["short", "tiled"])
@pytest.mark.parametrize("t", [23, 129])
def test_kernel_rows_equal_all_rows_gathered(path, t, monkeypatch):
    device = kernel_device()
    monkeypatch.setenv("LIGHTNING_ICL_SHORT", "1" if path == "short" else "0")
    b, h, d, c = 2, 2, 16, 3
    q, k, v, kc, labels = problem(b, h, t, d, device)
    kw = dict(stats=ALL, key_class=kc, num_classes=c, query_label=labels, backend="triton", fp32_precision="ieee")
    out_all, full = capture_attention(q, k, v, **kw)
    _, exact = naive_attention(q, k, v, causal=True, key_class=kc, num_classes=c, query_label=labels)
    for rows in row_sets(b, t).values():
        rows = rows.to(device)
        out, got = capture_attention(q, k, v, positions=rows, **kw)
        # rows outside the requested tiles take the plain loop: the output must not move
        torch.testing.assert_close(out, out_all, atol=0, rtol=0)
        assert_rows_match(got, gather(full, rows), gather(exact, rows), rows, atol=1e-5)


@pytest.mark.parametrize("path", ["short", "tiled"])
@pytest.mark.parametrize("num_classes", [1, 2, 4, 6])
def test_kernel_class_mass_for_few_and_many_classes(path, num_classes, monkeypatch):
    """Up to four classes the kernel sums masked rows (the last class is the rest); above, a dot."""
    device = kernel_device()
    monkeypatch.setenv("LIGHTNING_ICL_SHORT", "1" if path == "short" else "0")
    q, k, v, kc, _ = problem(2, 2, 45, 16, device, num_classes=num_classes, seed=num_classes)
    _, got = capture_attention(
        q, k, v, stats=("class_mass",), key_class=kc, num_classes=num_classes, backend="triton", fp32_precision="ieee"
    )
    exact = naive_attention(q, k, v, causal=True, key_class=kc, num_classes=num_classes)[1]["class_mass"]
    assert got["class_mass"].shape == (2, 2, 45, num_classes)
    assert (got["class_mass"] >= 0).all()
    torch.testing.assert_close(got["class_mass"].double(), exact, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("t", [100, 128])
def test_short_kernel_at_its_longest_sequences(t, dtype, monkeypatch):
    """128 padded keys (several query tiles, causal key ranges cut per tile), forward and backward:
    fp16 takes the fused short backward, fp32 the tiled one."""
    from lightning_icl.kernels import triton_attention as ta

    device = kernel_device()
    monkeypatch.setenv("LIGHTNING_ICL_SHORT", "1")
    assert ta.short_path(t) and ta.short_backward_fits(t, 16, dtype) == (dtype == torch.float16)
    q, k, v, kc, labels = problem(1, 2, t, 16, device, dtype=dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, got = capture_attention(
        q, k, v, stats=ALL, key_class=kc, num_classes=3, query_label=labels, backend="triton", fp32_precision="ieee"
    )
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=dtype)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    qq, kk, vv = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, exact = naive_attention(qq, kk, vv, causal=True, key_class=kc, num_classes=3, query_label=labels)
    expected = torch.autograd.grad(ref, (qq, kk, vv), grad.double())
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    for name, a, e in zip(("dq", "dk", "dv"), mine, expected, strict=True):
        torch.testing.assert_close(a.double(), e, atol=10 * atol, rtol=0, msg=name)
    for name in ALL:
        torch.testing.assert_close(got[name].double(), exact[name], atol=atol, rtol=0, msg=name)


def test_model_capture_at_rows_equals_all_rows_on_both_backends():
    from lightning_icl import CaptureSpec, ICLTransformer

    torch.manual_seed(0)
    model = ICLTransformer(vocab_size=7, d_model=32, n_layers=2, n_heads=2, max_seq_len=30)
    x = torch.randint(7, (3, 30))
    kc = (torch.arange(30) % 3).expand(3, 30)
    backends = ["torch"] + (["triton"] if INTERPRETED or torch.cuda.is_available() else [])
    device = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
    model, x, kc = model.to(device), x.to(device), kc.to(device)
    rows = torch.tensor([[2, 5, 29], [29, 0, 0], [11, 12, 13]], device=device)
    for backend in backends:
        for block in model.blocks:
            block.attn.backend = backend
        _, full = model(x, capture=CaptureSpec(stats=ALL, positions="all"), key_class=kc, num_classes=3, labels=x)
        _, part = model(x, capture=CaptureSpec(stats=ALL, positions=rows), key_class=kc, num_classes=3, labels=x)
        for layer in (0, 1):
            for name, expected in gather(full.stats[layer], rows).items():
                torch.testing.assert_close(part.stats[layer][name], expected, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize(
    "positions, message",
    [
        (torch.tensor([0.0, 1.0]), "integer index tensor"),
        (torch.zeros(3, 2, dtype=torch.long), "\\[P\\] or \\[B, P\\] with B = 2"),
        (torch.zeros(2, 2, 2, dtype=torch.long), "\\[P\\] or \\[B, P\\]"),
        (torch.tensor([0, 9]), "positions must lie in \\[0, 9\\)"),
        (torch.tensor([-1]), "positions must lie in"),
    ],
)
def test_bad_positions_are_named(positions, message):
    q = torch.randn(2, 1, 9, 16)
    with pytest.raises(ValueError, match=message):
        capture_attention(q, q, q, stats=("lse",), positions=positions)


def test_model_checks_key_classes_once_per_forward():
    from lightning_icl import CaptureSpec, ICLTransformer

    model = ICLTransformer(vocab_size=7, d_model=32, n_layers=2, n_heads=2, max_seq_len=10)
    x = torch.randint(7, (2, 10))
    with pytest.raises(ValueError, match="key_class values must lie in \\[0, 3\\)"):
        model(x, capture=CaptureSpec(stats=("class_mass",)), key_class=torch.full((2, 10), 3), num_classes=3)
    with pytest.raises(ValueError, match="needs key_class"):
        model(x, capture=CaptureSpec(stats=("class_mass",)))
