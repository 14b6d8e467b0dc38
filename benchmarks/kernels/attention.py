"""Attention benchmark: the capture kernel against SDPA, FlexAttention and eager materialisation.

Times forward, backward and forward+backward, with peak memory on CUDA, and writes
``benchmarks/results/attention_<device>.{csv,md}`` with the machine, GPU and library versions.

On a CUDA machine (the default there) the providers are:

- ``kernel``                the fused Triton kernel, no statistics (the plain kernel)
- ``kernel+<stat>``         with one statistic (lse, entropy, max_prob, class_mass, same_label_mass)
- ``kernel+all``            with every statistic
- ``sdpa_flash``            ``F.scaled_dot_product_attention`` on its flash backend
- ``eager+stats``           materialise the pattern, softmax, and compute the same statistics
                            from it (what hooking a TransformerLens-style model costs)
- ``flex+lse``              compiled FlexAttention returning its log-sum-exp (and max scores
                            where the installed torch offers them)

On CPU (the default without CUDA) it compares the package's reference path with all
statistics (``reference+all``: SDPA plus one pass over the score rows) against ``eager+stats``; ``--providers``
picks any subset anywhere (the Triton kernel on CPU needs ``TRITON_INTERPRET=1``).

    python -m benchmarks.kernels.attention                      # full sweep on this machine
    python -m benchmarks.kernels.attention --quick              # tiny shapes, a smoke run
    python -m benchmarks.kernels.attention --seq-lens 1024 --head-dims 64 --providers kernel,sdpa_flash

Every row also gives ``rel err``, ``||out - ref|| / ||ref||`` of the provider's output
against SDPA on fp32 copies of the inputs, so a fast but wrong config cannot hide. The
tables are rewritten after each (head dim, length), so a sweep cut short keeps what it
measured; ``--tag`` names the files of a partial sweep apart.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import write_tables
from lightning_icl.kernels import SUPPORTED_STATS, capture_attention
from lightning_icl.kernels.naive import masked_softmax, pattern_statistics

STAT_PROVIDERS = [f"kernel+{s}" for s in SUPPORTED_STATS]
GPU_PROVIDERS = ["kernel", *STAT_PROVIDERS, "kernel+all", "sdpa_flash", "eager+stats", "flex+lse"]
CPU_PROVIDERS = ["reference+all", "eager+stats"]
MODES = ("fwd", "bwd", "fwd+bwd")
NUM_CLASSES = 3


def eager_with_stats(q, k, v, causal, key_class, labels):
    """Materialise [B, H, T, T] scores and probabilities and compute every statistic from them, as an
    eager model would: scores at the inputs' dtype, softmax and statistics in fp32 (the definitions of
    :mod:`lightning_icl.kernels.naive`)."""
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    s, p, _ = masked_softmax(s, causal=causal)
    out = (p.to(v.dtype)) @ v
    with torch.no_grad():
        stats = pattern_statistics(s, p, key_class=key_class, num_classes=NUM_CLASSES, query_label=labels)
    return out, stats


def make_flex(causal: bool, device: str):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if device != "cuda":
        raise NotImplementedError("compiled FlexAttention returns its lse on CUDA only")
    # the bwd mode replays one graph's backward (retain_graph=True), which a compiled backward
    # refuses while it donates its saved buffers
    torch._functorch.config.donated_buffer = False
    compiled = torch.compile(flex_attention)
    try:
        from torch.nn.attention.flex_attention import AuxRequest

        aux = {"return_aux": AuxRequest(lse=True, max_scores=True)}
    except ImportError:  # older torch: lse only
        aux = {"return_lse": True}
    masks: dict = {}

    def run(q, k, v):
        t = q.shape[2]
        if causal and t not in masks:
            masks[t] = create_block_mask(lambda b_, h_, i, j: j <= i, None, None, t, t, device=q.device)
        result = compiled(q, k, v, block_mask=masks.get(t), **aux)
        return result[0]

    return run


def provider_fn(name: str, causal: bool, key_class, labels) -> Callable:
    device = key_class.device.type
    # validate=False: the attention is timed, not the value checks (a reduction over q, k, v and a host sync)
    kw = dict(key_class=key_class, num_classes=NUM_CLASSES, query_label=labels, validate=False)
    if name == "kernel":
        return lambda q, k, v: capture_attention(q, k, v, causal=causal, backend="triton", validate=False)[0]
    if name.startswith("kernel+") or name == "reference+all":
        stat = name.split("+", 1)[1]
        stats = SUPPORTED_STATS if stat == "all" else (stat,)
        backend = "torch" if name.startswith("reference") else "triton"
        return lambda q, k, v: capture_attention(q, k, v, causal=causal, stats=stats, backend=backend, **kw)[0]
    if name == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return sdpa
    if name == "eager+stats":
        return lambda q, k, v: eager_with_stats(q, k, v, causal, key_class, labels)[0]
    if name == "flex+lse":
        return make_flex(causal, device)
    raise ValueError(f"unknown provider {name!r}; choose from {GPU_PROVIDERS + CPU_PROVIDERS}")


def time_ms(fn: Callable, device: str, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA, wall clock on CPU."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def timer(device: str, warmup: int, reps: int) -> Callable[[Callable], float]:
    """Median milliseconds of ``fn()``, as :func:`time_ms` measures them."""
    return lambda fn: time_ms(fn, device, reps=reps, warmup=warmup)


def relative_error(out: torch.Tensor, q, k, v, causal: bool) -> float:
    """``||out - ref|| / ||ref||`` against SDPA on fp32 copies of the inputs."""
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        return ((out.float() - ref).norm() / ref.norm()).item()


def run_one(name, b, h, t, d, causal, dtype, device, time_ms, modes=MODES) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    key_class = torch.randint(NUM_CLASSES, (b, t), generator=g).to(device)
    labels = torch.randint(16, (b, t), generator=g).to(device)
    fn = provider_fn(name, causal, key_class, labels)
    grad = torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype)
    flops_fwd = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
    with torch.no_grad():
        err = float(f"{relative_error(fn(q, k, v), q, k, v, causal):.3g}")
    rows = []
    for mode in modes:
        if mode == "fwd":

            def work():
                with torch.no_grad():
                    fn(q, k, v)

        elif mode == "bwd":
            out = fn(q, k, v)

            def work(out=out):
                torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

        else:

            def work():
                torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ms = time_ms(work)
        peak = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1) if device == "cuda" else "n/a"
        flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}[mode]
        rows.append({
            "provider": name, "mode": mode, "B": b, "H": h, "T": t, "Dh": d, "causal": causal,
            "dtype": str(dtype).replace("torch.", ""), "ms": round(ms, 4),
            "TFLOP/s": float(f"{flops / ms / 1e9:.4g}"), "peak MiB": peak, "rel err": err,
        })  # fmt: skip
    return rows


def ratios(rows: list[dict]) -> list[str]:
    """The goals, as ratios measured in this run."""
    index = {(r["provider"], r["mode"], r["T"], r["Dh"]): r for r in rows}
    lines = []
    for (prov, mode, t, d), r in sorted(index.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][1])):
        if prov == "kernel+all" and (base := index.get(("kernel", mode, t, d))):
            lines.append(f"all statistics vs none, {mode}, T={t}, Dh={d}: time ratio {r['ms'] / base['ms']:.3f}")
        if prov == "kernel" and mode == "fwd+bwd" and (sdpa := index.get(("sdpa_flash", mode, t, d))):
            lines.append(f"kernel vs SDPA flash, fwd+bwd, T={t}, Dh={d}: throughput ratio {sdpa['ms'] / r['ms']:.3f}")
        if prov in ("kernel+all", "reference+all") and (eager := index.get(("eager+stats", mode, t, d))):
            mem = ""
            if isinstance(r["peak MiB"], float) and r["peak MiB"] > 0:
                mem = f", {eager['peak MiB'] / r['peak MiB']:.1f}x less peak memory"
            lines.append(f"{prov} vs eager+stats, {mode}, T={t}, Dh={d}: speed-up {eager['ms'] / r['ms']:.2f}x{mem}")
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--providers", default=None, help="comma-separated; default depends on the device")
    parser.add_argument("--seq-lens", default=None, help="comma-separated T values")
    parser.add_argument("--head-dims", default=None, help="comma-separated head dims")
    parser.add_argument(
        "--tokens", type=int, default=None, help="B*T held fixed across T (default 16384 GPU, 2048 CPU)"
    )
    parser.add_argument("--width", type=int, default=None, help="H*Dh held fixed (default 2048 GPU, 256 CPU)")
    parser.add_argument("--dtype", default="float16" if cuda else "float32")
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repetition: checks that it runs")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="appended to the file names, e.g. for one part of a sweep")
    args = parser.parse_args(argv)

    on_gpu = args.device == "cuda"
    providers = args.providers.split(",") if args.providers else (GPU_PROVIDERS if on_gpu else CPU_PROVIDERS)
    default_t = "64,128,256,512,1024,4096" if on_gpu else "64,128,256,512,1024"
    seq_lens = [int(x) for x in (args.seq_lens or ("16,32" if args.quick else default_t)).split(",")]
    head_dims = [
        int(x) for x in (args.head_dims or ("16" if args.quick else "32,64,128" if on_gpu else "64")).split(",")
    ]
    tokens = args.tokens or (64 if args.quick else 16384 if on_gpu else 2048)
    width = args.width or (32 if args.quick else 2048 if on_gpu else 256)
    dtype = getattr(torch, args.dtype)
    time_ms = timer(args.device, warmup=0 if args.quick else 2, reps=1 if args.quick else 15)
    modes = tuple(args.modes.split(","))
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    device_name = torch.cuda.get_device_name().replace(" ", "_") if on_gpu else "cpu"
    stem = f"attention_{device_name}" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")

    rows, skipped = [], []

    def write() -> list[str]:
        summary = ratios(rows)
        notes = "Ratios measured side by side in this run:\n\n" + "\n".join(f"- {line}" for line in summary)
        if skipped:
            notes += "\n\nNot measured:\n\n" + "\n".join(f"- {line}" for line in skipped)
        if rows:
            paths = write_tables(rows, args.out, stem, f"Attention with statistics: {args.device}", notes)
            print("wrote", *paths, flush=True)
        return summary

    for d in head_dims:
        for t in seq_lens:
            b, h = max(1, tokens // t), max(1, width // d)
            for name in providers:
                try:
                    new = run_one(name, b, h, t, d, not args.non_causal, dtype, args.device, time_ms, modes)
                except torch.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    skipped.append(f"{name} T={t} Dh={d}: out of memory")
                    print(skipped[-1], flush=True)
                    continue
                except Exception as err:  # one provider failing (e.g. no CPU FlexAttention) must not end the sweep
                    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                    skipped.append(f"{name} T={t} Dh={d}: not measured ({type(err).__name__}: {first_line})")
                    print(skipped[-1], flush=True)
                    continue
                rows += new
                print(
                    " | ".join(f"{r['mode']} {r['ms']:.3f} ms" for r in new),
                    f"<- {name} B={b} H={h} T={t} Dh={d} rel err {new[0]['rel err'] if new else 'n/a'}",
                    flush=True,
                )
            write()  # after each (head dim, length): a sweep cut short keeps what it measured
    print("\n".join(write()))
    return rows


if __name__ == "__main__":
    main()
