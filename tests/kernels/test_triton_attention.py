"""The fused Triton kernel against a float64 reference: output, every statistic, every gradient.

Interpreter tier: CPU tensors through ``TRITON_INTERPRET=1`` (fp32, fp16; small shapes).
GPU tier: CUDA tensors, every dtype and larger shapes; skipped without CUDA.
"""

import os
import subprocess
import sys

import pytest
import torch
from graph_checks import assert_compiles_as_one_graph

from lightning_icl.kernels import SUPPORTED_STATS, capture_attention
from lightning_icl.kernels.naive import naive_attention

ALL = SUPPORTED_STATS
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="interpreter tier: CPU tensors need TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="GPU tier: needs CUDA")


def make(b, h, t, d, dtype, device, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # three views of one fused [B, T, 3, H, Dh] projection
        qkv = torch.randn(b, t, 3, h, d, generator=g).to(device=device, dtype=dtype).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        assert t == 1 or not q.is_contiguous()
    else:
        q, k, v = (torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    key_class = torch.randint(3, (b, t), generator=g).to(device)
    labels = torch.randint(5, (b, t), generator=g).to(device)
    return q, k, v, key_class, labels


def check(b, h, t, d, causal, dtype, device, strided, atol):
    q, k, v, key_class, labels = make(b, h, t, d, dtype, device, strided)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, stats = capture_attention(
        q, k, v, causal=causal, stats=ALL, key_class=key_class, num_classes=3, query_label=labels,
        backend="triton", fp32_precision="ieee",
    )  # fmt: skip
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(device=device, dtype=dtype)
    mine = torch.autograd.grad(out, (q, k, v), grad)

    def run(at):
        qq, kk, vv = (x.detach().to(at).requires_grad_() for x in (q, k, v))
        o, st = naive_attention(qq, kk, vv, causal=causal, key_class=key_class, num_classes=3, query_label=labels,
                                dtype=at)  # fmt: skip
        return o, st, torch.autograd.grad(o, (qq, kk, vv), grad.to(at))

    ref_out, ref_stats, ref_grads = run(torch.float64)
    # PyTorch's own error at this dtype (fp16 maths runs in fp32 on CPU, as SDPA's math path does)
    own_dtype = dtype if device != "cpu" or dtype == torch.float32 else torch.float32
    own_out, own_stats, own_grads = run(own_dtype)

    def assert_within(name, got, own, ref):
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        err = (got.double() - ref).abs().max().item()
        own_err = (own.double() - ref).abs().max().item()
        assert err <= 2 * own_err + atol, f"{name}: error {err:.3g} > 2 x PyTorch's {own_err:.3g} + {atol}"

    assert out.shape == q.shape and out.dtype == dtype
    assert_within("out", out, own_out.to(dtype), ref_out)
    for name in ALL:
        assert stats[name].dtype == torch.float32 and not stats[name].requires_grad
        assert_within(name, stats[name], own_stats[name].float(), ref_stats[name])
    for name, got, own, ref in zip(("dq", "dk", "dv"), mine, own_grads, ref_grads, strict=True):
        assert got.shape == q.shape
        assert_within(name, got, own.to(dtype), ref)


ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# the short kernels take T <= 128 (LIGHTNING_ICL_SHORT=0 sends them down the tiled path)
PATH_LENGTHS = [("short", t) for t in (1, 7, 37, 100)] + [("tiled", t) for t in (1, 7, 37, 129)]


@needs_interpreter
@pytest.mark.parametrize("path, t", PATH_LENGTHS)
@pytest.mark.parametrize("d", [16, 64])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_interpreter_kernel_matches_reference(path, t, d, causal, dtype, strided, monkeypatch):
    monkeypatch.setenv("LIGHTNING_ICL_SHORT", "1" if path == "short" else "0")
    check(1, 2, t, d, causal, dtype, "cpu", strided, ATOL[dtype])


@needs_interpreter
@pytest.mark.parametrize("d", [32, 128])
def test_interpreter_other_head_dims(d):
    check(2, 1, 37, d, True, torch.float32, "cpu", True, ATOL[torch.float32])


@needs_cuda
@pytest.mark.parametrize("t", [1, 37, 100, 1000])  # short kernels (padded keys 16, 64, 128), the tiled ones
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_gpu_kernel_matches_reference(t, d, causal, dtype):
    check(2, 3, t, d, causal, dtype, "cuda", t % 2 == 1, ATOL[dtype])


def device_for_kernel():
    if INTERPRETED:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("needs the interpreter or CUDA")


def test_statistics_switches_do_not_change_the_output():
    device = device_for_kernel()
    q, k, v, key_class, labels = make(2, 2, 45, 16, torch.float32, device, strided=False)
    plain, none = capture_attention(q, k, v, backend="triton", fp32_precision="ieee")
    assert none == {}
    for stats in (("lse",), ("entropy", "max_prob"), ALL):
        out, got = capture_attention(
            q, k, v, stats=stats, key_class=key_class, num_classes=3, query_label=labels,
            backend="triton", fp32_precision="ieee",
        )  # fmt: skip
        torch.testing.assert_close(out, plain, atol=0, rtol=0)
        assert set(got) == set(stats)


def test_kernel_and_reference_give_the_same_statistics_through_the_model():
    from lightning_icl import CaptureSpec, ICLTransformer

    device = device_for_kernel()
    torch.manual_seed(0)
    model = ICLTransformer(vocab_size=7, d_model=32, n_layers=2, n_heads=2, max_seq_len=23).to(device)
    x = torch.randint(7, (3, 23), device=device)
    kc = (torch.arange(23, device=device) % 3).expand(3, 23)
    spec = CaptureSpec(stats=ALL, heads=True, positions="all")
    outs = {}
    for backend in ("torch", "triton"):
        for block in model.blocks:
            block.attn.backend = backend
        outs[backend] = model(x, capture=spec, key_class=kc, num_classes=3, labels=x)
    (a, cap_a), (b, cap_b) = outs["torch"], outs["triton"]
    # The model is fp32 with the kernel's default fp32_precision="tf32": on a GPU its dots round
    # operands to TF32 (relative 2^-11), so the two backends agree to a few 1e-4 there (class
    # mass 2.3e-4 measured on an H100; 1.5e-7 with "ieee"); the interpreter's dots are exact.
    tol = 1e-4 if device == "cpu" else 1e-3
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    for layer in (0, 1):
        for name in ALL:
            torch.testing.assert_close(cap_a.stats[layer][name], cap_b.stats[layer][name], atol=tol, rtol=tol)


def test_compiles_without_graph_breaks():
    device = device_for_kernel()
    q, k, v, key_class, _ = make(1, 2, 20, 16, torch.float32, device, strided=True)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))

    def f(q, k, v):
        out, stats = capture_attention(q, k, v, stats=("entropy", "class_mass"), key_class=key_class, num_classes=3,
                                       backend="triton", fp32_precision="ieee")  # fmt: skip
        return out.square().sum() + 0 * stats["entropy"].sum(), stats["class_mass"]

    assert_compiles_as_one_graph(f, q, k, v)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d=24), "head dimension of 24"),
        (dict(dtype=torch.float64), "supports dtypes"),
        (dict(num_classes=65), "at most 64 key classes"),
    ],
)
def test_kernel_rejects_what_it_cannot_run(kwargs, message):
    d, dtype, c = kwargs.get("d", 16), kwargs.get("dtype", torch.float32), kwargs.get("num_classes", 0)
    q = torch.randn(1, 1, 5, d, dtype=dtype)
    stats = {"stats": ("class_mass",), "key_class": torch.zeros(1, 5, dtype=torch.long), "num_classes": c} if c else {}
    with pytest.raises(ValueError, match=message):
        capture_attention(q, q, q, backend="triton", **stats)


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    code = (
        "import torch; from lightning_icl.kernels import capture_attention\n"
        "q = torch.randn(1, 1, 5, 16)\n"
        "try:\n    capture_attention(q, q, q, backend='triton')\n"
        "except ValueError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "ERR" in out and "TRITON_INTERPRET=1" in out


def test_auto_backend_uses_the_reference_on_cpu():
    q = torch.randn(1, 1, 5, 24, dtype=torch.float64)  # no kernel could run this
    out, stats = capture_attention(q, q, q, stats=("lse",))
    assert out.dtype == torch.float64 and stats["lse"].shape == (1, 1, 5)


def test_autotune_pruning_fits_blocks_to_the_problem(monkeypatch):
    from lightning_icl.kernels import triton_attention as ta

    monkeypatch.setenv("LIGHTNING_ICL_AUTOTUNE", "1")

    for configs in (ta.FWD_CONFIGS, ta.DKDV_CONFIGS, ta.DQ_CONFIGS):
        short = ta._prune(configs, {"T": 20}, HEAD_DIM=64)
        assert short and all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_N"] <= 32 for c in short)
        long = ta._prune(configs, {"T": 4096}, HEAD_DIM=64)
        assert long and all(max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 64 for c in long)
        wide = ta._prune(configs, {"T": 4096}, HEAD_DIM=128)
        assert wide and all(c.num_stages <= 3 for c in wide) and len(wide) < len(long)
    plain = ta._prune(ta.FWD_CONFIGS, {"T": 4096}, HEAD_DIM=64)
    heavy = ta._prune(ta.FWD_CONFIGS, {"T": 4096}, HEAD_DIM=64, WANT_ENT=True, WANT_CLS=True, WANT_SAME=True)
    assert (
        heavy and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in heavy) and len(heavy) < len(plain)
    )
    assert ta._configs(ta.FWD_CONFIGS) == (ta.INTERPRETER_CONFIGS if ta.INTERPRETED else ta.FWD_CONFIGS)


def test_short_kernel_configs_fit_the_padded_keys(monkeypatch):
    from lightning_icl.kernels import triton_attention as ta

    monkeypatch.setenv("LIGHTNING_ICL_AUTOTUNE", "1")
    for t_pad in (16, 32, 64, 128, 256):
        for prune, configs in ((ta._prune_short, ta.SHORT_FWD_CONFIGS), (ta._prune_short_bwd, ta.SHORT_BWD_CONFIGS)):
            kept = prune(configs, {}, T_PAD=t_pad)
            # one to four query tiles, each no longer than the padded keys, 64 rows where there are 64
            assert kept and all(c.kwargs["BLOCK_M"] <= t_pad and t_pad // c.kwargs["BLOCK_M"] <= 4 for c in kept)
            assert all(c.kwargs["BLOCK_M"] >= min(64, t_pad) for c in kept)
    assert ta.short_path(128) and not ta.short_path(129)
    # the fused backward: half precision, dk and dv small enough to stay in registers
    assert ta.short_backward_fits(95, 32, torch.float16) and ta.short_backward_fits(40, 64, torch.bfloat16)
    assert not ta.short_backward_fits(95, 128, torch.float16) and not ta.short_backward_fits(95, 32, torch.float32)
    monkeypatch.setenv("LIGHTNING_ICL_SHORT", "0")
    assert not ta.short_path(95) and not ta.short_backward_fits(95, 32, torch.float16)


def test_autotuning_can_be_switched_off(monkeypatch):
    from lightning_icl.kernels import triton_attention as ta

    monkeypatch.setenv("LIGHTNING_ICL_AUTOTUNE", "1")
    for configs in (ta.FWD_CONFIGS, ta.DKDV_CONFIGS, ta.DQ_CONFIGS):
        tuned = ta._prune(configs, {"T": 4096}, HEAD_DIM=64)
        monkeypatch.setenv("LIGHTNING_ICL_AUTOTUNE", "0")
        assert not ta.autotuning() and ta._prune(configs, {"T": 4096}, HEAD_DIM=64) == tuned[:1]
        monkeypatch.setenv("LIGHTNING_ICL_AUTOTUNE", "1")


def test_model_on_the_kernel_compiles_as_one_graph():
    from lightning_icl import ICLTransformer

    device = device_for_kernel()
    torch.manual_seed(0)
    model = ICLTransformer(vocab_size=7, d_model=32, n_layers=2, n_heads=2, max_seq_len=23, attention_backend="triton")
    model = model.to(device)
    x = torch.randint(7, (2, 23), device=device)
    compiled = torch.compile(lambda x: model(x)[0], fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.float().logsumexp(-1).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x)[0]
    eager.float().logsumexp(-1).mean().backward()
    torch.testing.assert_close(out, eager)
    for a, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
