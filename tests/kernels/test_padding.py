"""``key_padding_mask``: padded batches against the unpadded sequences and a float64 definition.

The torch backend runs everywhere; the kernel tier runs the Triton kernels on CPU tensors in
Triton's interpreter (``TRITON_INTERPRET=1``, fp32 and fp16, tiny shapes).
"""

import os

import pytest
import torch
from graph_checks import assert_compiles_as_one_graph

from lightning_icl.kernels import SUPPORTED_STATS, capture_attention
from lightning_icl.kernels.naive import naive_attention
from lightning_icl.kernels.torch_attention import capture_attention_torch

ALL = SUPPORTED_STATS
C = 3
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="kernel tier: CPU tensors need TRITON_INTERPRET=1")


def make(b, h, t, d, dtype=torch.float32, seed=0, c=C):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(b, h, t, d, generator=g).to(dtype) for _ in range(4))
    key_class = torch.randint(c, (b, t), generator=g)
    labels = torch.randint(4, (b, t), generator=g)
    return q, k, v, grad, key_class, labels


def padding_mask(b, t, kind, seed=0):
    """``[B, T]`` bool: "left" / "right" padding of random lengths (one sequence 1 long), or "random"
    keys (one sequence masked whole)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        mask = torch.rand(b, t, generator=g) < 0.6
        mask[-1] = False
        return mask
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0], lengths[-1] = t - 3, 1
    pos = torch.arange(t)
    return pos[None, :] >= (t - lengths)[:, None] if kind == "left" else pos[None, :] < lengths[:, None]


def run(q, k, v, grad, causal, mask, key_class, labels, positions=None, c=C, **kwargs):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, stats = capture_attention(
        q, k, v, causal=causal, stats=ALL, key_class=key_class, num_classes=c, query_label=labels,
        positions=positions, key_padding_mask=mask, **kwargs,
    )  # fmt: skip
    (out.float() * grad.float()).sum().backward()
    return out.detach(), stats, (q.grad, k.grad, v.grad)


def expected(q, k, v, grad, causal, mask, key_class, labels, c=C):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, stats = naive_attention(
        q, k, v, causal=causal, key_class=key_class, num_classes=c, query_label=labels, key_padding_mask=mask
    )
    (out * grad.double()).sum().backward()
    return out.detach(), stats, (q.grad, k.grad, v.grad)


def max_errors(got, want, positions=None):
    """Largest absolute error of the output, of every statistic and of each gradient."""
    out, stats, grads = got
    r_out, r_stats, r_grads = want
    if positions is not None:
        idx = positions if positions.dim() == 2 else positions.expand(out.shape[0], -1)
        r_stats = {
            name: torch.gather(x, 2, idx[:, None, :, None].expand(*x.shape[:2], -1, x.shape[3]))
            if x.dim() == 4
            else torch.gather(x, 2, idx[:, None, :].expand(x.shape[0], x.shape[1], -1))
            for name, x in r_stats.items()
        }
    errs = {"out": (out.double() - r_out).abs().max().item()}
    for name in ALL:
        assert torch.isfinite(stats[name]).all(), name
        assert stats[name].shape == r_stats[name].shape, name
        errs[name] = (stats[name].double() - r_stats[name]).abs().max().item()
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads, strict=True):
        assert torch.isfinite(g).all(), name
        errs[name] = (g.double() - r).abs().max().item()
    return errs


def check_definition(t, causal, kind, positions, atol, dtype=torch.float32, b=3, h=2, d=16, c=C, **kwargs):
    """Output, statistics and gradients against the float64 definition; returns the largest errors."""
    q, k, v, grad, key_class, labels = make(b, h, t, d, dtype, c=c)
    mask = padding_mask(b, t, kind)
    if positions == "shared":
        positions = torch.tensor([0, t // 2, t - 1])
    elif positions == "per_sequence":
        positions = torch.stack([torch.randperm(t, generator=torch.Generator().manual_seed(i))[:4] for i in range(b)])
    got = run(q, k, v, grad, causal, mask, key_class, labels, positions=positions, c=c, **kwargs)
    errs = max_errors(got, expected(q, k, v, grad, causal, mask, key_class, labels, c), positions)
    atol = atol if isinstance(atol, dict) else dict.fromkeys(errs, atol)
    bad = {name: e for name, e in errs.items() if not e <= atol[name]}
    assert not bad, f"errors above {atol}: {bad}"
    return errs


def check_against_unpadded(t, causal, kind, atol, dtype=torch.float32, **kwargs):
    """A padded batch at its valid rows equals each sequence run alone, unpadded; gradients too, for
    a loss over the valid rows (a padded query row may attend valid keys, so its loss would reach them)."""
    b, h, d = 3, 2, 16
    q, k, v, grad, key_class, labels = make(b, h, t, d, dtype, seed=1)
    mask = padding_mask(b, t, kind, seed=1)
    grad = grad * mask[:, None, :, None]
    out, stats, grads = run(q, k, v, grad, causal, mask, key_class, labels, **kwargs)
    for i in range(b):
        keep = mask[i]
        sub = [x[i : i + 1][:, :, keep] for x in (q, k, v, grad)]
        u_out, u_stats, u_grads = run(*sub, causal, None, key_class[i : i + 1, keep], labels[i : i + 1, keep], **kwargs)
        torch.testing.assert_close(out[i : i + 1][:, :, keep], u_out, atol=atol, rtol=0)
        for name in ALL:
            torch.testing.assert_close(stats[name][i : i + 1][:, :, keep], u_stats[name], atol=atol, rtol=0, msg=name)
        for g, u in zip(grads, u_grads, strict=True):
            torch.testing.assert_close(g[i : i + 1][:, :, keep], u, atol=atol, rtol=0)
        for g in grads[1:]:  # padded keys get no gradient
            assert (g[i][:, ~keep] == 0).all()


# ---- the torch backend ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["left", "right", "random"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("positions", [None, "shared", "per_sequence"])
def test_reference_matches_the_masked_definition(kind, causal, positions):
    check_definition(19, causal, kind, positions, atol=1e-5, backend="torch")


@pytest.mark.parametrize("kind", ["left", "right"])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_padded_rows_equal_the_unpadded_sequence(kind, causal):
    check_against_unpadded(13, causal, kind, atol=1e-5, backend="torch")


@pytest.mark.parametrize("causal", [True, False])
def test_reference_without_the_fused_cpu_op(monkeypatch, causal):
    """The plain-SDPA path (other devices, older torch): the whole mask, its own normaliser."""
    from lightning_icl.kernels import torch_attention

    monkeypatch.setattr(torch_attention, "_cpu_flash_op", lambda: None)
    check_definition(19, causal, "left", None, atol=1e-5, backend="torch")
    check_definition(19, causal, "random", "per_sequence", atol=1e-5, backend="torch")


def test_reference_chunked_statistics_and_float64():
    q, k, v, _, key_class, labels = make(2, 2, 11, 8, torch.float64)
    mask = padding_mask(2, 11, "left")
    out, stats = capture_attention_torch(
        q, k, v, causal=True, stats=ALL, key_class=key_class, num_classes=C, query_label=labels,
        key_padding_mask=mask, chunk_elements=1,
    )  # fmt: skip
    r_out, r_stats = naive_attention(
        q, k, v, causal=True, key_class=key_class, num_classes=C, query_label=labels, key_padding_mask=mask
    )
    torch.testing.assert_close(out, r_out, atol=1e-12, rtol=0)
    for name in ALL:
        torch.testing.assert_close(stats[name].double(), r_stats[name], atol=1e-6, rtol=0, msg=name)


def test_fully_masked_rows_are_zero_with_zero_gradients():
    b, h, t, d = 2, 2, 9, 16
    q, k, v, grad, key_class, labels = make(b, h, t, d)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, :4] = False  # left padding: causal rows 0..3 of sequence 0 see no key
    mask[1] = False  # nothing to attend at all
    for causal in (True, False):
        out, stats, (dq, dk, dv) = run(q, k, v, grad, causal, mask, key_class, labels, backend="torch")
        dead = torch.zeros(b, t, dtype=torch.bool)
        dead[1] = True
        if causal:
            dead[0, :4] = True
        assert (out[dead[:, None].expand(b, h, t)] == 0).all()
        for name in ALL:
            x = stats[name] if name != "class_mass" else stats[name].sum(-1)
            assert torch.isfinite(stats[name]).all() and (x[dead[:, None].expand(b, h, t)] == 0).all(), name
        live = ~dead[:, None].expand(b, h, t)
        torch.testing.assert_close(stats["class_mass"].sum(-1)[live], torch.ones(int(live.sum())), atol=1e-5, rtol=0)
        assert (dq[dead[:, None].expand(b, h, t)] == 0).all()
        assert (dk[1] == 0).all() and (dv[1] == 0).all()


def test_integer_masks_are_converted_and_an_all_true_mask_changes_nothing():
    q, k, v, grad, key_class, labels = make(2, 2, 7, 16)
    mask = padding_mask(2, 7, "right")
    want = run(q, k, v, grad, True, mask, key_class, labels, backend="torch")
    for dtype in (torch.int64, torch.int32, torch.uint8):
        got = run(q, k, v, grad, True, mask.to(dtype), key_class, labels, backend="torch")
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    plain = run(q, k, v, grad, True, None, key_class, labels, backend="torch")
    ones = run(q, k, v, grad, True, torch.ones(2, 7, dtype=torch.bool), key_class, labels, backend="torch")
    torch.testing.assert_close(ones, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(2, 7),  # float
        torch.ones(2, 6, dtype=torch.bool),  # wrong Tk
        torch.ones(1, 7, dtype=torch.bool),  # wrong B
        torch.ones(2, 1, 7, dtype=torch.bool),  # wrong rank
        [[1] * 7] * 2,  # not a tensor
    ],
)
def test_bad_masks_name_the_argument(mask):
    q, k, v, _, _, _ = make(2, 2, 7, 16)
    with pytest.raises(ValueError, match="key_padding_mask"):
        capture_attention(q, k, v, key_padding_mask=mask, backend="torch")


# ---- the Triton kernels, in the interpreter ----------------------------------------------------

KERNEL = dict(backend="triton", fp32_precision="ieee")
FP16_ATOL = {"out": 5e-3, "lse": 2e-3, "entropy": 5e-3, "max_prob": 2e-3, "class_mass": 3e-3,
             "same_label_mass": 3e-3, "dq": 2e-2, "dk": 2e-2, "dv": 1e-2}  # fmt: skip


@pytest.fixture(params=["short", "tiled"])
def path(request, monkeypatch):
    """The short-sequence kernels, or the tiled ones forced by ``LIGHTNING_ICL_SHORT=0``."""
    from lightning_icl.kernels import triton_attention

    monkeypatch.setenv("LIGHTNING_ICL_SHORT", "1" if request.param == "short" else "0")
    assert triton_attention.short_path(24) == (request.param == "short")
    return request.param


@needs_interpreter
@pytest.mark.parametrize("kind", ["left", "random"])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_the_masked_definition_fp32(path, kind, causal):
    check_definition(24, causal, kind, None, atol=1e-5, b=2, **KERNEL)


@needs_interpreter
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_several_key_tiles_and_positions(path, causal):
    """T = 80: three 32-key tiles on the tiled path (masked keys in unmasked and diagonal tiles)."""
    check_definition(80, causal, "left", "per_sequence", atol=1e-5, b=2, **KERNEL)


@needs_interpreter
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_the_masked_definition_fp16(path, causal):
    """fp16: the short path's fused backward (fp16 only) and the tiled one."""
    check_definition(24, causal, "left", None, atol=FP16_ATOL, dtype=torch.float16, b=2, **KERNEL)


@needs_interpreter
def test_kernel_class_mass_by_one_hot_dot(path):
    """More classes than the masked row sums take: the one-hot dot."""
    check_definition(24, True, "random", "shared", atol=1e-5, b=2, c=6, **KERNEL)


@needs_interpreter
@pytest.mark.parametrize("kind", ["left", "right"])
def test_kernel_padded_rows_equal_the_unpadded_sequence(path, kind):
    check_against_unpadded(24, True, kind, atol=1e-5, **KERNEL)


@needs_interpreter
def test_kernel_equals_the_reference_with_a_mask(path):
    q, k, v, grad, key_class, labels = make(2, 2, 24, 16)
    mask = padding_mask(2, 24, "left")
    got = run(q, k, v, grad, True, mask, key_class, labels, **KERNEL)
    want = run(q, k, v, grad, True, mask, key_class, labels, backend="torch")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
def test_compiles_without_graph_breaks_with_a_mask(backend):
    q, k, v, grad, key_class, _ = make(2, 2, 20, 16)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    mask = padding_mask(2, 20, "left").long()  # an integer mask, as a tokenizer gives it

    def f(q, k, v):
        out, stats = capture_attention(q, k, v, stats=("entropy", "class_mass"), key_class=key_class, num_classes=C,
                                       key_padding_mask=mask, backend=backend, fp32_precision="ieee")  # fmt: skip
        return (out * grad).sum() + 0 * stats["entropy"].sum(), stats["class_mass"]

    assert_compiles_as_one_graph(f, q, k, v)
