"""What capture costs at the shapes researchers train, every provider side by side in one run.

Three sections, each a set of ratios measured in this run on this machine:

- ``model`` (the CPU goal): an ``ICLTransformer`` forward with no capture against the same
  forward capturing the five statistics plus residual and heads at the answer positions (and at
  the last position, and at every position), and TransformerLens 4.3 ``run_with_cache`` of every
  pattern, z and residual on a model of the same shape (``pip install -e '.[bench]'``; skipped
  without it). Timings are medians of interleaved runs; ``kept MiB`` is what the capture holds.
- ``attention``: the attention call alone at the seeds' shapes (He B=1024 T=95 H=4 Dh=128,
  Han B=128 T=40 H=8 Dh=32, Garg B=64 T=82 H=8 Dh=32) and at T = 256, 1024, 4096 with Dh 64
  and 128 (16384 tokens, H*Dh = 2048): our kernel with no statistics, each statistic, all at
  every row and at the answer rows, the tiled kernel against the short-sequence one, every SDPA
  backend torch offers (flash, cuDNN, efficient, math), compiled FlexAttention with its lse and
  eager materialisation with the same statistics. Forward and forward+backward. On CPU the
  package's CPU path (SDPA plus the statistics pass) against SDPA and eager, at CPU sizes.
- ``train``: one training step (forward, backward, AdamW) of each paper config's model on a
  real batch of its task: SDPA without capture, our kernel without capture, statistics at the
  answer positions every step (on the kernel, and on the SDPA path), and statistics plus
  residual and heads; steps/s and model FLOPs utilisation. On CPU the quickstart setup.

Writes ``benchmarks/results/capture_<device>.{md,csv}`` (machine, GPU and library versions in
the header) after every shape, so a run cut short keeps what it measured, and ends with a
**Goals** section that says ``met`` or ``not met`` for each goal from the ratios of this run.

    python -m benchmarks.capture                         # everything this device can run
    python -m benchmarks.capture --sections model        # the CPU goal alone
    python -m benchmarks.capture --quick                 # tiny shapes: checks that it runs
    python -m benchmarks.capture --budget 240            # stop starting new rows after 240 s

``--budget`` keeps a GPU session inside its time: rows not started in time are listed under
"Not measured". Kernel rows record the configs the autotuner picked.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from benchmarks.common import write_tables
from benchmarks.kernels.attention import eager_with_stats, make_flex, relative_error, time_ms
from benchmarks.peers import kept_bytes, transformerlens_available, transformerlens_capture, transformerlens_model
from lightning_icl import CaptureSpec, ICLModule, ICLTransformer
from lightning_icl.adapters import ICLModuleAdapter
from lightning_icl.kernels import SUPPORTED_STATS, capture_attention

SECTIONS = ("model", "attention", "train")
NUM_CLASSES = 3

# name: (B, T, H, Dh, first answer row, answer stride) at the papers' sizes
SEEDS = {
    "he2024": (1024, 95, 4, 128, 1, 3),
    "han2024": (128, 40, 8, 32, 0, 2),
    "garg2022": (64, 82, 8, 32, 0, 2),
}
LONG_TOKENS, LONG_WIDTH = 16384, 2048
CPU_MODELS = {  # the CPU sizes of the model goal: (B, T, d_model, n_heads, n_layers)
    "he-layout": (64, 96, 128, 4, 2),
    "T=256": (16, 256, 256, 8, 4),
}
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense bf16/fp16 tensor-core peaks (datasheets)

Row = dict[str, object]


def answer_rows(t: int, first: int, stride: int, device) -> torch.Tensor:
    return torch.arange(first, t, stride, device=device)


# ---- timing --------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved_ms(fns: dict[str, Callable], device: str, reps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each function, run in turn within every repetition, so that a
    machine's drifting load falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(ts) for name, ts in times.items()}


class Budget:
    """Seconds left for starting new rows; ``None``: unlimited."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start = seconds, time.perf_counter()

    def left(self) -> bool:
        return self.seconds is None or time.perf_counter() - self.start < self.seconds


def row(section: str, shape: str, provider: str, mode: str, **fields) -> Row:
    base: Row = dict.fromkeys(
        ("section", "shape", "provider", "mode", "B", "T", "H", "Dh", "dtype", "ms", "vs baseline", "TFLOP/s",
         "MFU", "MiB", "rel err", "config"),
        "",
    )  # fmt: skip
    base.update(section=section, shape=shape, provider=provider, mode=mode)
    base.update(fields)
    return base


# ---- model section (CPU goal) --------------------------------------------------------------------


def model_rows(name: str, b: int, t: int, d: int, h: int, layers: int, device: str, reps: int) -> list[Row]:
    torch.manual_seed(0)
    model = ICLTransformer(vocab_size=64, d_model=d, n_layers=layers, n_heads=h, max_seq_len=t).to(device).eval()
    x = torch.randint(64, (b, t), device=device)
    key_class = (torch.arange(t, device=device) % NUM_CLASSES).expand(b, t)
    answers = answer_rows(t, 1, 3, device)
    extra = dict(key_class=key_class, num_classes=NUM_CLASSES, labels=x)

    def spec(positions) -> CaptureSpec:
        return CaptureSpec(stats=SUPPORTED_STATS, residual=True, heads=True, positions=positions)

    fns: dict[str, Callable] = {"no capture": lambda: model(x)}
    kept: dict[str, int] = {"no capture": 0}
    for label, positions in (("capture@answers", answers), ("capture@last", "last"), ("capture@all", "all")):
        captured = spec(positions)
        fns[label] = lambda s=captured: model(x, capture=s, **extra)[1]
        with torch.no_grad():
            kept[label] = kept_bytes(fns[label]())
    if device == "cpu" and transformerlens_available():
        peer = transformerlens_model(n_layers=layers, d_model=d, n_heads=h, d_mlp=4 * d, vocab_size=64, seq_len=t)
        fns["TransformerLens forward"] = lambda: peer(x)
        fns["TransformerLens run_with_cache"] = lambda: transformerlens_capture(peer, x)
        kept["TransformerLens forward"] = 0
        with torch.no_grad():
            kept["TransformerLens run_with_cache"] = kept_bytes(transformerlens_capture(peer, x))
    with torch.no_grad():
        ms = interleaved_ms(fns, device, reps=reps, warmup=2)
    shape = f"{name} (B={b}, T={t}, d={d}, H={h}, L={layers})"
    return [
        row("model", shape, label, "fwd", B=b, T=t, H=h, Dh=d // h, dtype="float32", ms=round(value, 3),
            **{"vs baseline": round(value / ms["no capture"], 3), "MiB": round(kept[label] / 2**20, 2)})
        for label, value in ms.items()
    ]  # fmt: skip


# ---- attention section ---------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_path(path: str) -> Iterator[None]:
    """Force the tiled kernel (``LIGHTNING_ICL_SHORT=0``) for one provider; ``"auto"`` leaves the choice."""
    old = os.environ.get("LIGHTNING_ICL_SHORT")
    if path == "tiled":
        os.environ["LIGHTNING_ICL_SHORT"] = "0"
    try:
        yield
    finally:
        if path == "tiled":
            if old is None:
                os.environ.pop("LIGHTNING_ICL_SHORT", None)
            else:
                os.environ["LIGHTNING_ICL_SHORT"] = old


def short_kernel_takes(t: int) -> bool:
    from lightning_icl.kernels import triton_attention

    return triton_attention.short_path(t)


GOAL_PROVIDERS = ["kernel", "kernel+all", "kernel+all@answers", "sdpa:flash", "sdpa:cudnn", "sdpa:efficient",
                  "sdpa:math"]  # fmt: skip
SECOND_DTYPE_PROVIDERS = ["kernel", "kernel+all", "sdpa:flash", "sdpa:cudnn"]


def attention_providers(device: str, short: bool, phase: str) -> list[str]:
    """The providers of one phase: ``"goals"`` (what the goals read), then ``"rest"`` (the peers
    that are no SDPA backend, each statistic alone, the tiled kernel where the short one runs)."""
    if device != "cuda":
        return ["sdpa", "reference+all", "reference+all@answers", "eager+stats"] if phase == "goals" else []
    if phase == "goals":
        return list(GOAL_PROVIDERS)
    names = ["flex+lse", "eager+stats"] + [f"kernel+{s}" for s in SUPPORTED_STATS]
    return names + (["kernel:tiled", "kernel:tiled+all"] if short else [])


def provider_fn(name: str, key_class, labels, answers) -> tuple[Callable, str]:
    """``(fn(q, k, v) -> out, kernel path)`` for one provider."""
    kw = dict(key_class=key_class, num_classes=NUM_CLASSES, query_label=labels, validate=False)
    if name.startswith(("kernel", "reference")):
        base, _, stat = name.partition("+")
        path = "tiled" if base == "kernel:tiled" else "auto"
        backend = "torch" if base == "reference" else "triton"
        rows = None
        if stat.endswith("@answers"):
            stat, rows = stat.removesuffix("@answers"), answers
        stats = () if not stat else SUPPORTED_STATS if stat == "all" else (stat,)
        return (lambda q, k, v: capture_attention(q, k, v, stats=stats, positions=rows, backend=backend, **kw)[0]), path
    if name == "sdpa":
        return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)), "auto"
    if name.startswith("sdpa:"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }[name.split(":", 1)[1]]

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return sdpa, "auto"
    if name == "eager+stats":
        return (lambda q, k, v: eager_with_stats(q, k, v, True, key_class, labels)[0]), "auto"
    if name == "flex+lse":
        return make_flex(True, key_class.device.type), "auto"
    raise ValueError(f"unknown provider {name!r}")


def picked_configs(t: int, d: int, dtype: torch.dtype) -> str:
    """The configs the autotuner chose for the kernels that ran at this shape (empty before any ran)."""
    from lightning_icl.kernels import triton_attention as ta

    if ta.short_path(t):
        kernels = [("fwd", ta._short_fwd_kernel)]
        kernels += [("bwd", ta._short_bwd_kernel)] if ta.short_backward_fits(t, d, dtype) else []
    else:
        kernels = [("fwd", ta._fwd_kernel)]
    if not ta.short_backward_fits(t, d, dtype):
        kernels += [("dkdv", ta._bwd_dkdv_kernel), ("dq", ta._bwd_dq_kernel)]
    parts = []
    for label, kernel in kernels:
        config = getattr(kernel, "best_config", None)
        if config is not None:
            blocks = " ".join(f"{k}{v}" for k, v in config.kwargs.items())
            parts.append(f"{label} {blocks} w{config.num_warps} s{config.num_stages}")
    return "; ".join(parts)


def attention_rows(shape: str, b, h, t, d, answers_from, dtype, device, reps, provider_names, budget, skipped):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3))
    key_class = (torch.arange(t) % NUM_CLASSES).expand(b, t).contiguous().to(device)
    labels = torch.randint(16, (b, t), generator=g).to(device)
    answers = answer_rows(t, *answers_from, device)
    grad = torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype)
    flops_fwd = 2 * b * h * t * t * d  # causal: half of 4 B H T^2 Dh
    rows: list[Row] = []
    for name in provider_names:
        if not budget.left():
            skipped.append(f"{name} at {shape}: time budget spent")
            continue
        try:
            fn, path = provider_fn(name, key_class, labels, answers)
            with kernel_path(path):
                with torch.no_grad():
                    err = relative_error(fn(q, k, v), q, k, v, True)

                def fwd(fn=fn):
                    with torch.no_grad():
                        fn(q, k, v)

                def fwd_bwd(fn=fn):
                    torch.autograd.grad(fn(q, k, v), (q, k, v), grad)

                measured = []
                for mode, work, flops in (("fwd", fwd, flops_fwd), ("fwd+bwd", fwd_bwd, 3.5 * flops_fwd)):
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                    ms = time_ms(work, device, reps=reps, warmup=2)
                    mib = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1) if device == "cuda" else ""
                    measured.append((mode, ms, flops, mib))
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            skipped.append(f"{name} at {shape}: out of memory")
            continue
        except Exception as error:  # one backend missing on this device must not end the run
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            skipped.append(f"{name} at {shape}: {type(error).__name__}: {first}")
            print(skipped[-1], flush=True)
            continue
        config = picked_configs(t, d, dtype) if name.startswith("kernel") and device == "cuda" else ""
        for mode, ms, flops, mib in measured:
            rows.append(row("attention", shape, name, mode, B=b, T=t, H=h, Dh=d,
                            dtype=str(dtype).replace("torch.", ""), ms=round(ms, 4),
                            **{"TFLOP/s": float(f"{flops / ms / 1e9:.4g}"), "MiB": mib,
                               "rel err": float(f"{err:.3g}"), "config": config}))  # fmt: skip
        print(" | ".join(f"{m} {ms:.3f} ms" for m, ms, _, _ in measured), f"<- {name} {shape}", flush=True)
    return rows


def fill_baselines(rows: list[Row]) -> None:
    """Each attention row's time over ``kernel`` (CUDA) or ``sdpa`` (CPU) at its shape, dtype and mode."""
    base = {(r["shape"], r["dtype"], r["mode"]): r["ms"] for r in rows
            if r["section"] == "attention" and r["provider"] in ("kernel", "sdpa")}  # fmt: skip
    for r in rows:
        key = (r["shape"], r["dtype"], r["mode"])
        if r["section"] == "attention" and key in base:
            r["vs baseline"] = round(r["ms"] / base[key], 3)


def attention_shapes(device: str, quick: bool) -> list[tuple[str, int, int, int, int, tuple[int, int]]]:
    """``(label, B, H, T, Dh, (first answer, stride))`` for this device."""
    if quick:
        return [("quick T=24", 2, 2, 24, 16, (1, 3))]
    if device != "cuda":
        return [
            ("cpu he-layout", 64, 4, 96, 32, (1, 3)),
            ("cpu T=256", 16, 8, 256, 32, (1, 3)),
            ("cpu T=1024", 4, 8, 1024, 32, (1, 3)),
        ]
    shapes = [(f"{n} (B={b}, T={t})", b, h, t, d, (f, s)) for n, (b, t, h, d, f, s) in SEEDS.items()]
    for t in (1024, 4096, 256):
        for d in (64, 128):
            shapes.append((f"T={t}, Dh={d}", LONG_TOKENS // t, LONG_WIDTH // d, t, d, (1, 3)))
    return shapes


# ---- train section -------------------------------------------------------------------------------


def train_setups(device: str, quick: bool) -> dict[str, tuple]:
    from benchmarks.samplers import SETUPS

    if quick or device != "cuda":
        return {name: setup for name, setup in SETUPS.items() if name.startswith("quickstart")}
    return {name: setup for name, setup in SETUPS.items() if not name.startswith("quickstart")}


def model_flops(module: ICLModule, b: int, t: int) -> float:
    """Forward+backward FLOPs of one step: 6 per matmul weight per token, plus causal attention."""
    model = module.model
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    if model.is_token_model:
        matmul_params += model.embed.weight.numel()  # the tied read-out is a matmul
    attention = 2 * b * t * t * model.d_model * model.n_layers  # QK^T and PV, causal half
    return 3 * (2 * b * t * matmul_params + attention)


def train_rows(name: str, setup: tuple, device: str, steps: int, budget: Budget, skipped: list[str]) -> list[Row]:
    from lightning_icl.tasks.base import generator_for

    cls, data_kwargs, model_kwargs = setup
    data = cls(**data_kwargs)
    drawn = data.train_sampler()(generator_for(0, "bench"), 0)
    batch = dataclasses.replace(
        drawn, **{f.name: getattr(drawn, f.name).to(device) for f in dataclasses.fields(drawn)
                  if isinstance(getattr(drawn, f.name), torch.Tensor)}
    )  # fmt: skip
    b, t = batch.inputs.shape[:2]
    answers = batch.scored_positions()
    half = device == "cuda" and "he2024" in name  # the He config trains in bf16-mixed
    stats = CaptureSpec(stats=SUPPORTED_STATS, positions=answers)
    everything = CaptureSpec(stats=SUPPORTED_STATS, residual=True, heads=True, positions=answers)
    if device == "cuda":
        variants = {
            "sdpa": ("torch", None),
            "sdpa+stats@answers": ("torch", stats),
            "kernel": ("auto", None),
            "kernel+stats@answers": ("auto", stats),
            "kernel+stats+residual+heads@answers": ("auto", everything),
        }
    else:  # the CPU path: SDPA for the output, the statistics pass at the answer rows
        variants = {"sdpa": ("torch", None), "sdpa+stats@answers": ("torch", stats),
                    "sdpa+stats+residual+heads@answers": ("torch", everything)}  # fmt: skip
    rows: list[Row] = []
    peak = next((v for k, v in PEAK_TFLOPS.items() if device == "cuda" and k in torch.cuda.get_device_name()), None)
    for label, (backend, spec) in variants.items():
        if not budget.left():
            skipped.append(f"train {label} of {name}: time budget spent")
            continue
        torch.manual_seed(0)
        module = ICLModule.from_kwargs(task=data.task_info, attention_backend=backend, **model_kwargs).to(device)
        if spec is not None:  # a callback's training-step capture, as the callbacks ask for it
            ICLModuleAdapter(module).set_training_capture(spec)
        fused = {"fused": True} if device == "cuda" else {}
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4, **fused)

        def step(module=module, opt=opt):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=half):
                loss = module.training_step(batch, 0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        module.log = lambda *a, **k: None  # no Trainer here: training_step's logging is a no-op
        ms = time_ms(step, device, reps=steps, warmup=3)
        flops = model_flops(module, b, t)
        tflops = flops / ms / 1e9
        rows.append(row("train", name, label, "step", B=b, T=t, H=module.model.n_heads, Dh=module.model.head_dim,
                        dtype="bf16-mixed" if half else "float32", ms=round(ms, 3),
                        **{"TFLOP/s": float(f"{tflops:.4g}"),
                           "MFU": f"{100 * tflops / peak:.1f}%" if peak else "n/a",
                           "config": f"{1000 / ms:.2f} steps/s"}))  # fmt: skip
        print(f"train {name} {label}: {ms:.2f} ms/step", flush=True)
    base = next((r["ms"] for r in rows if r["provider"] == "sdpa"), None)
    for r in rows:
        if base:
            r["vs baseline"] = round(r["ms"] / base, 3)
    return rows


# ---- goals ---------------------------------------------------------------------------------------


def goals(rows: list[Row], device: str) -> list[str]:
    """One line per goal: the ratios of this run and whether the goal is met."""
    lines = []

    def pick(section, shape, provider, mode):
        return next(
            (
                r
                for r in rows
                if (r["section"], r["shape"], r["provider"], r["mode"]) == (section, shape, provider, mode)
            ),
            None,
        )

    model_shapes = sorted({r["shape"] for r in rows if r["section"] == "model"})
    if model_shapes:
        ratios, peer, ok = [], [], True
        for shape in model_shapes:
            base, cap = pick("model", shape, "no capture", "fwd"), pick("model", shape, "capture@answers", "fwd")
            tl = pick("model", shape, "TransformerLens run_with_cache", "fwd")
            ratio = cap["ms"] / base["ms"]
            ratios.append(f"{shape}: {ratio:.2f}x")
            ok &= ratio <= 1.3
            if tl is None:
                peer.append(f"{shape}: TransformerLens not installed (pip install -e '.[bench]')")
                ok = False
            else:
                less = tl["MiB"] / max(cap["MiB"], 1e-9)
                peer.append(f"{shape}: ours {cap['ms']:.1f} ms vs run_with_cache {tl['ms']:.1f} ms "
                            f"({tl['ms'] / cap['ms']:.2f}x faster, {less:.0f}x less kept)")  # fmt: skip
                ok &= cap["ms"] < tl["ms"]
        lines.append(
            f"stats + residual + heads at the answer positions <= 1.3x no capture, and faster than TransformerLens "
            f"run_with_cache ({device}): {'met' if ok else 'not met'}; " + "; ".join(ratios) + "; " + "; ".join(peer)
        )
    attention = [r for r in rows if r["section"] == "attention"]
    shapes = list(dict.fromkeys(r["shape"] for r in attention))
    if device == "cuda" and shapes:
        per_shape, ok = [], True
        for shape in shapes:
            mine = pick("attention", shape, "kernel", "fwd+bwd")
            sdpa = [r for r in attention if r["shape"] == shape and r["mode"] == "fwd+bwd" and
                    r["dtype"] == mine["dtype"] and str(r["provider"]).startswith("sdpa:")] if mine else []  # fmt: skip
            if mine is None or not sdpa:
                continue
            best = min(sdpa, key=lambda r: r["ms"])
            ratio = best["ms"] / mine["ms"]
            need = 0.9 if mine["T"] >= 4096 else 1.0
            ok &= ratio >= need
            per_shape.append(f"{shape}: {ratio:.2f} vs {best['provider']} (>= {need})")
        if per_shape:
            lines.append(f"kernel, no statistics, fwd+bwd >= the fastest SDPA backend: {'met' if ok else 'not met'}; "
                         + "; ".join(per_shape))  # fmt: skip
        for mode, need in (("fwd", 1.10), ("fwd+bwd", 1.05)):
            per_shape, ok = [], True
            for shape in shapes:
                base, full = pick("attention", shape, "kernel", mode), pick("attention", shape, "kernel+all", mode)
                if base and full and base["dtype"] == full["dtype"]:
                    ratio = full["ms"] / base["ms"]
                    ok &= ratio <= need
                    per_shape.append(f"{shape}: {ratio:.2f}")
            if per_shape:
                lines.append(f"all statistics at all rows <= {need:.2f}x the kernel without statistics, {mode}: "
                             f"{'met' if ok else 'not met'}; " + "; ".join(per_shape))  # fmt: skip
    elif shapes:
        lines.append("kernel goals (kernel vs SDPA, statistics vs none on the kernel): not measured here, need CUDA")
    train = [r for r in rows if r["section"] == "train"]
    if device == "cuda" and train:
        per_setup, ok = [], True
        for shape in dict.fromkeys(r["shape"] for r in train):
            base, mine = pick("train", shape, "sdpa", "step"), pick("train", shape, "kernel+stats@answers", "step")
            if base and mine:
                ratio = base["ms"] / mine["ms"]
                ok &= ratio >= 1.0
                per_setup.append(f"{shape}: {ratio:.2f}")
        if per_setup:
            verdict = "met" if ok else "not met"
            lines.append("paper-config training step on the kernel with statistics every step >= the same model on "
                         f"SDPA without capture (speed): {verdict}; " + "; ".join(per_setup))  # fmt: skip
    elif train:
        lines.append("paper-config training step goal: not measured here, needs CUDA (the CPU rows are the quickstart)")
    return lines


# ---- compile warm-up -----------------------------------------------------------------------------


def _warm_one(item: tuple) -> str:
    """Run one attention provider once, forward and backward (or one training setup's steps), so its
    kernels are compiled (and autotuned) into Triton's on-disk cache; the timed run then loads them."""
    if item[0] == "train":
        try:
            train_rows(item[1], train_setups("cuda", False)[item[1]], "cuda", 1, Budget(None), [])
            return ""
        except Exception as error:
            return f"train {item[1]}: {type(error).__name__}"
    label, b, h, t, d, answers_from, dtype_name, name = item
    dtype = getattr(torch, dtype_name)
    try:
        q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        key_class = (torch.arange(t, device="cuda") % NUM_CLASSES).expand(b, t).contiguous()
        labels = torch.randint(16, (b, t), device="cuda")
        fn, path = provider_fn(name, key_class, labels, answer_rows(t, *answers_from, "cuda"))
        with kernel_path(path):
            fn(q, k, v).sum().backward()
        torch.cuda.synchronize()
        return ""
    except Exception as error:  # the timed run reports it
        return f"{name} at {label}: {type(error).__name__}"


def warm_up(shapes, dtypes, workers: int, train: bool) -> None:
    """Compile every kernel the attention section will launch, in ``workers`` processes at once.

    Autotuning compiles every candidate config of every (length bucket, head dim, dtype,
    statistics) once, which takes minutes when done one after another; compiled kernels land in
    Triton's on-disk cache, so processes running side by side share the work. Their timings are
    not used: the timed run autotunes again, on cached binaries.
    """
    import concurrent.futures
    import multiprocessing

    items = []
    for label, b, h, t, d, answers_from in shapes:
        short = short_kernel_takes(t)
        for dtype in dtypes:
            names = attention_providers("cuda", short, "goals") + attention_providers("cuda", short, "rest")
            if dtype != dtypes[0]:
                names = SECOND_DTYPE_PROVIDERS
            names = [n for n in names if n.startswith("kernel")]
            items += [(label, b, h, t, d, answers_from, str(dtype).replace("torch.", ""), n) for n in names]
    if train:
        items += [("train", name) for name in train_setups("cuda", False)]
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        failed = [msg for msg in pool.map(_warm_one, items) if msg]
    print(f"warm-up: {len(items)} kernel launches compiled in {time.perf_counter() - start:.0f} s "
          f"with {workers} processes" + (f"; failed: {failed}" if failed else ""), flush=True)  # fmt: skip


# ---- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="attention dtypes on CUDA (CPU: float32)")
    parser.add_argument("--reps", type=int, default=15, help="repetitions per CPU timing (CUDA: do_bench)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps per variant")
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no new row is started")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions: checks that it runs")
    parser.add_argument(
        "--warm", type=int, default=0, help="CUDA: compile every kernel first in this many processes (Triton's cache)"
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="", help="appended to the file names")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    device, budget, reps = args.device, Budget(args.budget), 2 if args.quick else args.reps
    name = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else "cpu"
    stem = f"capture_{name}" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    rows: list[Row] = []
    skipped: list[str] = []

    def write() -> list[str]:
        fill_baselines(rows)
        summary = goals(rows, device)
        notes = "## Goals\n\n" + "\n".join(f"- {line}" for line in summary)
        notes += (
            "\n\nRatios are measured side by side in this run. `vs baseline`: time over `no capture` (model), over "
            "`kernel` (attention on CUDA) or `sdpa` (CPU), over `sdpa` (train). `MiB`: kept by the capture (model) "
            "or peak above the inputs (attention, CUDA). `rel err`: against SDPA on fp32 copies. `config`: the "
            "autotuned kernel configs (attention) or steps/s (train)."
        )
        if skipped:
            notes += "\n\n## Not measured\n\n" + "\n".join(f"- {line}" for line in skipped)
        if rows:
            for path in write_tables(rows, args.out, stem, f"Capture cost: {device}", notes):
                print("wrote", path, flush=True)
        return summary

    if "model" in sections:
        models = {"quick": (2, 24, 32, 2, 2)} if args.quick else CPU_MODELS
        for label, (b, t, d, h, layers) in models.items():
            if budget.left():
                rows += model_rows(label, b, t, d, h, layers, device, reps)
                write()
    dtypes = [getattr(torch, x) for x in args.dtypes.split(",")] if device == "cuda" else [torch.float32]
    shapes = attention_shapes(device, args.quick)

    def attention_phase(phase: str) -> None:
        for label, b, h, t, d, answers_from in shapes:
            for dtype in dtypes if phase == "rest" else dtypes[:1]:
                short = device == "cuda" and short_kernel_takes(t)
                # the second dtype: the goal rows only, after everything else
                providers = attention_providers(device, short, phase) if dtype == dtypes[0] else SECOND_DTYPE_PROVIDERS
                rows.extend(attention_rows(label, b, h, t, d, answers_from, dtype, device, reps, providers, budget,
                                           skipped))  # fmt: skip
                write()

    if device == "cuda" and args.warm > 0 and not args.quick:
        warm_up(shapes if "attention" in sections else [], dtypes, args.warm, "train" in sections)
    # what the goals read first, for every shape; then the training steps; then the rest
    if "attention" in sections:
        attention_phase("goals")
    if "train" in sections:
        for label, setup in train_setups(device, args.quick).items():
            rows.extend(train_rows(label, setup, device, 2 if args.quick else args.train_steps, budget, skipped))
            write()
    if "attention" in sections:
        attention_phase("rest")
    summary = write()
    print("\n".join(summary))
    return rows


if __name__ == "__main__":
    main()
