"""Registers, spills and shared memory of the Triton attention kernels on Hopper, with no GPU.

Every ``@triton.jit`` kernel of ``lightning_icl.kernels.triton_attention`` whose name starts
with ``_`` and ends with ``_kernel`` is compiled ahead of time for NVIDIA sm_90a with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` (no driver needed), for
each config its autotuner keeps (its ``early_config_prune`` on representative lengths, for
the kernels forward()/backward() launch at that length) and each specialisation (head dim,
dtype, statistics flags). Registers per thread, spill stores/loads and stack frame come from
``ptxas -v`` (the ``ptxas`` Triton bundles and runs: its own log when it compiles, a rerun on
its PTX with its flags on a cache hit); the cubin Triton built is checked with ``cuobjdump
--dump-resource-usage`` (its register count must agree). Shared memory is Triton's dynamic
shared memory (``metadata.shared``, what a launch asks for); ``dots`` says whether the
``tl.dot``\\s became ``wgmma`` (Hopper's warpgroup MMA), ``mma.sync`` or plain FMAs.

    python -m benchmarks.registers                        # pruned configs, T=1024 and T=96
    python -m benchmarks.registers --quick                # one config per kernel, head dim 64 fp16
    python -m benchmarks.registers --kernels _fwd_kernel --head-dims 128 --dtypes bf16 --all-configs

Writes ``benchmarks/results/registers_sm90.{md,csv}`` (``--tag`` or ``--quick`` name the
files of a partial sweep apart) once every compile has finished. Compiles are cached in
Triton's cache (``~/.triton/cache``), so a rerun only pays for ``ptxas -v``. ``--jobs 2``
compiles in two processes.

The signature of each kernel is built by introspecting its ``JITFunction``: pointer, scalar
and constexpr arguments are mapped by the name rules in ``ARG_RULES`` and
``CONSTEXPR_RULES`` below, and integer values are specialised the way a launch would
(``== 1`` becomes a constexpr, multiples of 16 get ``tt.divisibility``), so a contiguous
tensor's unit stride is folded exactly as on a GPU. A kernel with an argument no rule maps
is skipped with a message naming it: extend the tables deliberately.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import itertools
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import write_tables

DEFAULT_MODULE = "lightning_icl.kernels.triton_attention"
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = ("fp16", "fp32")  # bf16 compiles to the same registers as fp16 (checked on every kernel)
SEQ_LENS = (1024, 96, 40)  # a long sequence (tiled kernels) and the short ones the paper configs train at
STAT_SETS = ("none", "all+rows")  # the plain kernel, and every statistic at requested rows
BATCH, HEADS = 4, 8  # only their divisibility matters (the strides and H as integer arguments)
NUM_CLASSES = 3  # classes for WANT_CLS, as in benchmarks/kernels/attention.py
# Largest dynamic shared memory one block may opt into, per compute capability (bytes).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}

# ---------------------------------------------------------------------------------------------
# Name rules: the one place that says what each kernel argument is. First full match wins.
# "*data" is a pointer of the dtype under test; "stride:<LAYOUT>" a stride of a contiguous tensor
# of that layout, the dimension being the name's last letter (sqt: stride of T in [B, H, T, D]);
# "size:<DIM>" a size. Unknown names raise UnmappedArgument, naming the argument.
ARG_RULES: list[tuple[str, str]] = [
    (r"Q|K|V|O|OUT|DO|DK|DV|DQ", "*data"),
    (r"LSE2|ENT|MAXP|CLS|SAME|DELTA", "*fp32"),
    (r"KEY_CLASS|LABEL", "*i32"),
    (r".*ROWS.*", "*i8"),
    (r"KEY_MASK", "*u8"),  # the key padding mask's bool bytes
    (r".*scale.*", "fp32"),
    (r"s[qkvod][bhtd]", "stride:BHTD"),  # q, k, v, out, do / dq, dk, dv: [B, H, T, D]
    (r"s[clrm][bt]", "stride:BT"),  # key_class, label, rows, key mask: [B, T]
    (r"B", "size:B"),
    (r"H", "size:H"),
    (r"BH", "size:BH"),  # B * H problems
    (r"T", "size:T"),
    (r"T_KEY", "size:T_KEY"),  # the autotuning bucket, next power of two of T
]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One specialisation of a kernel, independent of the config."""

    head_dim: int
    dtype: str  # "fp16", "bf16" or "fp32"
    stats: tuple[str, ...]  # the WANT_* / HAS_* flags switched on
    stats_label: str
    causal: bool
    precision: str  # fp32 dots: "tf32" or "ieee"
    num_classes: int
    cls_dot: str  # "auto", "0" or "1"
    seq_len: int = 0  # the launch's T, set by build_launch (only T_PAD reads it)


def _num_classes(s: Spec) -> int:
    return max(s.num_classes, 1) if "WANT_CLS" in s.stats else 1  # forward(): max(0, 1) without class_mass


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cls_dot(s: Spec, module) -> bool:
    """forward(): one small one-hot dot for more than CLASS_SUM_MAX classes, else masked row sums."""
    if s.cls_dot != "auto":
        return s.cls_dot == "1"
    if not hasattr(module, "CLASS_SUM_MAX"):
        raise UnmappedArgument("CLS_DOT: the module has no CLASS_SUM_MAX any more; pass --cls-dot or fix _cls_dot")
    return _num_classes(s) > module.CLASS_SUM_MAX


# Constexprs, as forward() and backward() pass them: rule(spec, module). WANT_* / HAS_* flags come from
# Spec.stats, block sizes and any other autotuned meta-parameter from the config, anything else from its default.
CONSTEXPR_RULES: dict[str, Callable[[Spec, Any], Any]] = {
    "HEAD_DIM": lambda s, m: s.head_dim,
    "CAUSAL": lambda s, m: s.causal,
    "DOT_PRECISION": lambda s, m: s.precision if s.dtype == "fp32" else "tf32",  # _precision()
    "NUM_CLASSES": lambda s, m: _num_classes(s),
    "CLS_DOT": _cls_dot,
    # the one-hot dot needs 16 columns; the masked row sums only a power of two >= C
    "CLS_PAD": lambda s, m: max(16, _pow2(_num_classes(s))) if _cls_dot(s, m) else _pow2(_num_classes(s)),
    "T_PAD": lambda s, m: max(16, _pow2(s.seq_len)),  # the short kernels' padded key range
}


def _ask(module, fn: str, *args) -> bool | None:
    """``module.fn(*args)``, or None where the module has no such function."""
    f = getattr(module, fn, None)
    return None if f is None else bool(f(*args))


TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# Which kernels forward() and backward() launch for (T, head dim), by the module's own routing functions:
# T <= SHORT_MAX_T takes the short forward, and the fused short backward where short_backward_fits(); the
# tiled kernels take the rest. First match wins; a kernel matching no pattern (or a module without these
# functions) is reported at every length, as is every kernel with --every-length.
KERNEL_APPLIES: list[tuple[str, Callable[[Any, int, int, Any], bool | None]]] = [
    (r"_short_bwd.*", lambda m, t, d, dt: _ask(m, "short_backward_fits", t, d, dt)),
    (r"_short_.*", lambda m, t, d, dt: _ask(m, "short_path", t)),
    (r"_bwd_.*", lambda m, t, d, dt: None if (f := _ask(m, "short_backward_fits", t, d, dt)) is None else not f),
    (r"_fwd_.*", lambda m, t, d, dt: None if (short := _ask(m, "short_path", t)) is None else not short),
]


def applies(module, kernel: str, t: int, d: int, dtype: str = "fp16") -> bool:
    for pattern, fn in KERNEL_APPLIES:
        if re.fullmatch(pattern, kernel):
            verdict = fn(module, t, d, TORCH_DTYPES[dtype])
            return True if verdict is None else verdict
    return True


class UnmappedArgument(Exception):
    """A kernel argument that no rule of ARG_RULES / CONSTEXPR_RULES maps."""


def _rule(name: str) -> str:
    for pattern, kind in ARG_RULES:
        if re.fullmatch(pattern, name):
            return kind
    raise UnmappedArgument(f"no rule for argument {name!r}: add one to ARG_RULES in benchmarks/registers.py")


# ---------------------------------------------------------------------------------------------
# Kernels


@dataclasses.dataclass
class Kernel:
    name: str
    jit: Any  # the JITFunction
    configs: list  # triton.Config
    prune: Callable | None
    heuristics: dict[str, Callable]  # @triton.heuristics values, name -> fn(args)

    @property
    def flags(self) -> list[str]:
        return [p.name for p in self.jit.params if p.is_constexpr and p.name.startswith(("WANT_", "HAS_"))]


def discover(module) -> list[Kernel]:
    """Every jitted (possibly autotuned) kernel of ``module`` named ``_*_kernel``, in definition order."""
    import triton
    from triton.runtime.jit import JITFunction

    kernels = []
    for name, obj in vars(module).items():
        if not (name.startswith("_") and name.endswith("_kernel")):
            continue
        configs, prune, heuristics, inner = None, None, {}, obj
        for _ in range(8):  # unwrap Autotuner / Heuristics down to the JITFunction
            if isinstance(inner, JITFunction):
                break
            if configs is None and hasattr(inner, "configs"):
                configs, prune = list(inner.configs), getattr(inner, "early_config_prune", None)
            if isinstance(getattr(inner, "values", None), dict):
                heuristics.update(inner.values)
            inner = getattr(inner, "fn", None)
        if not isinstance(inner, JITFunction):
            continue
        configs = configs or [triton.Config({}, num_warps=4, num_stages=3)]
        kernels.append(Kernel(name, inner, configs, prune, heuristics))
    return kernels


def _specialise_int(value: int, param) -> tuple[str, Any]:
    """(type, attr) as a launch specialises an integer: ("constexpr", 1), ("i32", "D") or ("i32", None)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        return native_specialize_impl(
            BaseBackend, value, False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
        )
    except ImportError:  # another Triton: the same rule, by hand
        if value == 1 and not param.do_not_specialize:
            return "constexpr", 1
        ty = "i32" if -(2**31) <= value < 2**31 else "i64"
        return ty, ("D" if value % 16 == 0 and not param.do_not_specialize_on_alignment else None)


def _scalar_value(kind: str, name: str, dims: dict[str, int]) -> int:
    what, spec = kind.split(":")
    if what == "size":
        return dims[spec]
    dim = name[-1].upper()
    if dim not in spec:
        raise UnmappedArgument(f"stride {name!r}: dimension {dim} is not in layout {spec}")
    return math.prod(dims[d] for d in spec[spec.index(dim) + 1 :])


def build_launch(kernel: Kernel, spec: Spec, t: int, module) -> tuple[dict, dict, dict, dict]:
    """Signature, constexprs (not the config's), attrs and named positional args of one launch."""
    import torch

    dims = {"B": BATCH, "H": HEADS, "BH": BATCH * HEADS, "T": t, "D": spec.head_dim, "T_KEY": _pow2(t)}
    spec = dataclasses.replace(spec, seq_len=t)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    ptr_dtype = {"*fp16": torch.float16, "*bf16": torch.bfloat16, "*fp32": torch.float32, "*i32": torch.int32}
    ptr_dtype["*i8"] = torch.int8
    ptr_dtype["*u8"] = torch.uint8
    config_keys = set().union(*(c.kwargs for c in kernel.configs))
    signature, constexprs, attrs, named = {}, {}, {}, {}
    for i, p in enumerate(kernel.jit.params):
        name = p.name
        if p.is_constexpr:
            signature[name] = "constexpr"
            if name in config_keys or name in kernel.heuristics:
                continue  # from the config / filled in below
            if name in CONSTEXPR_RULES:
                constexprs[name] = CONSTEXPR_RULES[name](spec, module)
            elif name.startswith(("WANT_", "HAS_")):
                constexprs[name] = name in spec.stats
            elif p.has_default:
                constexprs[name] = p.default
            else:
                raise UnmappedArgument(
                    f"no rule for constexpr {name!r}: add one to CONSTEXPR_RULES in benchmarks/registers.py"
                )
            continue
        kind = _rule(name)
        if kind.startswith("*"):
            ty = f"*{spec.dtype}" if kind == "*data" else kind
            signature[name] = p.annotation if p.annotation.startswith("*") else ty
            if not p.do_not_specialize_on_alignment:  # torch allocations are 256-byte aligned
                attrs[(i,)] = "D"
            named[name] = torch.empty(0, dtype=torch_dtype.get(spec.dtype) if kind == "*data" else ptr_dtype[ty])
        elif kind == "fp32":
            signature[name], named[name] = "fp32", 0.125
        else:
            value = _scalar_value(kind, name, dims)
            ty, attr = _specialise_int(value, p)
            named[name] = value
            if ty == "constexpr":
                signature[name], constexprs[name] = "constexpr", value
            else:
                signature[name] = p.annotation or ty
                if attr:
                    attrs[(i,)] = attr
    return signature, constexprs, attrs, named


def binder_check(kernel: Kernel, arch: int, signature: dict, constexprs: dict, attrs: dict, named: dict) -> str:
    """ "" when Triton's own launch binder, given the same argument values, specialises them as
    build_launch() did; else what differs ("unavailable" where this Triton lacks the internals)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(GPUTarget("cuda", arch, 32))
        jit = kernel.jit
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        meta = {**{k: v for k, v in constexprs.items() if k not in named}, **kernel.configs[0].kwargs}
        pos = [named[p.name] for p in jit.params if not p.is_constexpr]
        kw = {p.name: meta[p.name] for p in jit.params if p.is_constexpr and p.name in meta}
        bound, spec, opts = binder(*pos, **kw)
        _, sig2, cx2, attrs2 = jit._pack_args(backend, kw, bound, spec, opts)
    except Exception as e:
        return f"unavailable ({type(e).__name__})"
    cx2 = {jit.arg_names[path[0]]: v for path, v in cx2.items()}
    diffs = [f"{k}: {signature.get(k)} vs {v}" for k, v in sig2.items() if signature.get(k) != v]
    diffs += [f"{k}={constexprs.get(k)} vs {v}" for k, v in cx2.items() if k not in meta and constexprs.get(k) != v]
    mine = {path for path, v in attrs.items() if v}
    theirs = {path for path, v in attrs2.items() if v}
    diffs += [f"tt.divisibility of {jit.arg_names[path[0]]}" for path in sorted(mine ^ theirs)]
    return "; ".join(diffs)


def kept_configs(kernel: Kernel, named: dict, constexprs: dict, all_configs: bool) -> list:
    """The configs the autotuner would time for this launch (all of them with ``all_configs``)."""
    if all_configs or kernel.prune is None:
        return kernel.configs
    kwargs = {k: v for k, v in constexprs.items() if k not in named}  # launch keywords: the constexprs
    return kernel.prune(kernel.configs, dict(named), **kwargs)


def _short_name(key: str) -> str:
    return "".join(w[0] for w in key.split("_"))  # BLOCK_M -> BM, GROUP -> G


def config_label(c) -> str:
    blocks = " ".join(f"{_short_name(k)}{v}" for k, v in c.kwargs.items())
    return f"{blocks} w{c.num_warps} s{c.num_stages}".strip()


# ---------------------------------------------------------------------------------------------
# Compiling


@dataclasses.dataclass
class Job:
    module: str
    kernel: str
    spec: Spec
    config_kwargs: dict
    options: dict  # num_warps, num_stages, num_ctas, maxnreg
    signature: dict
    constexprs: dict
    attrs: dict
    arch: int
    seq_lens: list[int]


_TOOLS: dict[str, str] = {}


def _tools(arch: int) -> tuple[str, str]:
    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the one Triton itself runs for this arch
    try:
        cuobjdump = knobs.nvidia.cuobjdump.path
    except AttributeError:
        cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    return ptxas, cuobjdump


def ptxas_flags(metadata) -> list[str]:
    """The flags Triton's make_cubin gives ptxas (Triton 3.9), so the numbers are the launched binary's."""
    flags = ["-v", "-lineinfo", "--regAllocOptLevel=2"]
    if not metadata.enable_fp_fusion:
        flags.append("--fmad=false")
    if metadata.ptx_options:
        flags += metadata.ptx_options.split(" ")
    return flags


def _parse_ptxas(log: str) -> dict[str, int]:
    out = {}
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["stack"], out["spill_st"], out["spill_ld"] = map(int, m.groups())
    if m := re.search(r"Used (\d+) registers", log):
        out["regs"] = int(m.group(1))
    return out


def compile_job(job: Job) -> dict:
    """Compile one job; returns the measurements (or an ``error``).

    On a compile (not a cache hit) the numbers are Triton's own ``ptxas -v`` log of the cubin it built;
    on a cache hit ptxas runs again on the PTX with Triton's flags (``ptxas_flags``). Either way the
    cubin's register count (cuobjdump) must agree, else the row's note says so."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    module = importlib.import_module(job.module)
    jit = next(k.jit for k in discover(module) if k.name == job.kernel)
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    log = io.StringIO()
    dump_before = knobs.nvidia.dump_ptxas_log
    try:
        src = triton.compiler.ASTSource(
            fn=jit,
            signature=job.signature,
            constexprs={**job.constexprs, **job.config_kwargs},
            attrs=job.attrs,
        )
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its ptxas -v log (and, on failure, the PTX)
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
    except Exception as e:  # a config that does not compile is a result too
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    finally:
        knobs.nvidia.dump_ptxas_log = dump_before
    res["compile_s"] = time.perf_counter() - t0
    md = ck.metadata
    ptx = ck.asm["ptx"]
    res["smem"] = md.shared
    wg, mma = "wgmma.mma_async" in ptx, "mma.sync" in ptx
    res["dots"] = "+".join(n for n, on in (("wgmma", wg), ("mma.sync", mma)) if on) or "fma"
    ptxas, cuobjdump = _tools(job.arch)
    res.update(_parse_ptxas(log.getvalue()))
    with tempfile.TemporaryDirectory(prefix="registers_") as d:
        ptx_path, obj = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        if "regs" not in res or "spill_st" not in res:  # a cache hit: no log, run ptxas again
            res["cached"] = True
            with open(ptx_path, "w") as f:
                f.write(ptx)
            arch = sm_arch_from_capability(job.arch)
            cmd = [ptxas, *ptxas_flags(md), f"--gpu-name={arch}", ptx_path, "-o", os.path.join(d, "rerun.cubin")]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                return {**res, "error": f"ptxas failed ({run.returncode}): {run.stderr.strip()[:200]}"}
            res.update(_parse_ptxas(run.stderr + run.stdout))
        # the cubin Triton built (and would launch): its register count must be the same
        with open(obj, "wb") as f:
            f.write(ck.asm["cubin"])
        dump = subprocess.run([cuobjdump, "--dump-resource-usage", obj], capture_output=True, text=True).stdout
        if m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump):
            res["cubin_regs"], res["cubin_local"] = int(m.group(1)), int(m.group(4))
            res["static_smem"] = int(m.group(3))
    return res


# ---------------------------------------------------------------------------------------------
# Sweep


def stat_sets(kernel: Kernel, wanted: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(label, flags) for the kernel: "all" is every WANT_* flag, "ent" WANT_ENT, "rows" HAS_ROWS, and
    "all+rows" both; a set naming a flag the kernel lacks is left out, and kernels without flags get "none"."""
    flags = kernel.flags
    out: dict[tuple[str, ...], str] = {}
    for w in wanted:
        chosen: list[str] = []
        for token in w.split("+"):
            if token == "all":
                chosen += [f for f in flags if f.startswith("WANT_")]
            elif token != "none":
                matches = [f for f in (f"WANT_{token.upper()}", f"HAS_{token.upper()}") if f in flags]
                if not matches:
                    break
                chosen += matches
        else:
            key = tuple(dict.fromkeys(chosen))
            out.setdefault(key, w if key else "none")
    return [(label, flags_) for flags_, label in out.items()]


def plan(args, module, kernels: list[Kernel]) -> tuple[list[Job], list[str], dict[str, int]]:
    """The compiles to run (deduplicated), the kernels skipped, and the binder checks' outcomes."""
    jobs: dict[tuple, Job] = {}
    skipped = []
    checks: dict[str, int] = {}
    for kernel in kernels:
        try:
            for dtype, d, (label, flags), causal, prec in itertools.product(
                args.dtypes, args.head_dims, stat_sets(kernel, args.stats), args.causal, args.fp32_precision
            ):
                if prec != args.fp32_precision[0] and dtype != "fp32":
                    continue  # the precision only matters for fp32 dots
                prec = prec if dtype == "fp32" else "tf32"
                spec = Spec(d, dtype, flags, label, causal, prec, args.num_classes, args.cls_dot)
                for t in args.seq_len:
                    if not (args.every_length or applies(module, kernel.name, t, d, dtype)):
                        continue
                    signature, constexprs, attrs, named = build_launch(kernel, spec, t, module)
                    verdict = binder_check(kernel, args.arch, signature, constexprs, attrs, named)
                    verdict = f"{kernel.name}: {verdict}" if verdict and not verdict.startswith("unav") else verdict
                    checks[verdict] = checks.get(verdict, 0) + 1
                    configs = kept_configs(kernel, named, constexprs, args.all_configs)
                    if args.quick:
                        configs = configs[:1]
                    for c in configs:
                        cx = dict(constexprs)
                        for hname, fn in kernel.heuristics.items():
                            cx[hname] = fn({**named, **cx, **c.kwargs})
                        options = {"num_warps": c.num_warps, "num_stages": c.num_stages, "num_ctas": c.num_ctas}
                        if c.maxnreg is not None:
                            options["maxnreg"] = c.maxnreg
                        key = (
                            kernel.name,
                            spec,
                            repr(sorted(c.kwargs.items())),
                            repr(sorted(options.items())),
                            repr(sorted(signature.items())),
                            repr(sorted(cx.items())),
                            repr(sorted(attrs.items())),
                        )
                        if key in jobs:
                            jobs[key].seq_lens.append(t)
                            continue
                        jobs[key] = Job(
                            module.__name__, kernel.name, spec, dict(c.kwargs), options, signature, cx,
                            {k: [["tt.divisibility", 16]] if v == "D" else v for k, v in attrs.items()},
                            args.arch, [t],
                        )  # fmt: skip
                    if args.quick:
                        break
        except UnmappedArgument as e:
            skipped.append(f"{kernel.name}: skipped, {e}")
            jobs = {k: v for k, v in jobs.items() if k[0] != kernel.name}
    return list(jobs.values()), skipped, checks


def make_row(job: Job, res: dict, config_keys: list[str], smem_limit: int | None) -> dict:
    row: dict[str, Any] = {
        "kernel": job.kernel,
        "T": ",".join(map(str, sorted(job.seq_lens))),
        "head_dim": job.spec.head_dim,
        "dtype": job.spec.dtype,
        "stats": job.spec.stats_label,
        "causal": int(job.spec.causal),
        "dot_prec": job.spec.precision if job.spec.dtype == "fp32" else "",
    }
    row.update({k: job.config_kwargs.get(k, "") for k in config_keys})
    row["warps"], row["stages"] = job.options["num_warps"], job.options["num_stages"]
    for k in ("regs", "spill_st", "spill_ld", "stack", "smem"):
        row[k] = res.get(k, "")
    smem = res.get("smem")
    row["smem_ok"] = "" if smem is None or smem_limit is None else ("yes" if smem <= smem_limit else "NO")
    row["dots"] = res.get("dots", "")
    check = ""
    if "cubin_regs" in res and res["cubin_regs"] != res.get("regs"):
        check = f"cubin has {res['cubin_regs']} regs"
    row["compile_s"] = f"{res['compile_s']:.1f}" if "compile_s" in res else ""
    row["note"] = "; ".join(x for x in (res.get("error", ""), check) if x)
    return row


def spills(row: dict) -> bool:
    return bool(row["spill_st"] or row["spill_ld"])


def usable(row: dict) -> bool:
    """Spill-free and within the shared memory a block may have (else the launch fails)."""
    return not spills(row) and row["smem_ok"] != "NO"


def row_config(row: dict, config_keys: list[str]) -> str:
    blocks = " ".join(f"{_short_name(k)}{row[k]}" for k in config_keys if row.get(k, "") != "")
    return f"{blocks} w{row['warps']} s{row['stages']}".strip()


def _spec_text(dtype: str, stats: str, causal: int, dot_prec: str) -> str:
    return f"{dtype} stats={stats}" + ("" if causal else " non-causal") + (f" {dot_prec}" if dot_prec else "")


def summary(rows: list[dict], config_keys: list[str]) -> list[str]:
    """The "Goals" lines: spill-free configs per (kernel, head dim), and every config that spills."""
    ok_rows = [r for r in rows if r["regs"] != ""]
    lines = ["## Goals", ""]
    by_kd: dict[tuple, list[dict]] = {}
    for r in ok_rows:
        by_kd.setdefault((r["kernel"], r["head_dim"]), []).append(r)
    lines.append(
        "Goal: every (kernel, head dim) has, for every specialisation (dtype, stats), a config that neither "
        "spills nor exceeds the shared-memory limit."
    )
    lines.append("")
    for (k, d), rs in by_kd.items():
        specs: dict[tuple, list[dict]] = {}
        for r in rs:
            specs.setdefault((r["dtype"], r["stats"], r["causal"], r["dot_prec"]), []).append(r)
        without = [_spec_text(*s) for s, group in specs.items() if not any(usable(r) for r in group)]
        free = sum(usable(r) for r in rs)
        mark = "met" if not without else "NOT met"
        line = f"- {k} d={d}: {mark}, {free}/{len(rs)} configs spill-free and fit, regs {min(r['regs'] for r in rs)}"
        line += f"-{max(r['regs'] for r in rs)}"
        if without:
            line += "; no usable config for " + ", ".join(without)
        lines.append(line)
    spilling = [r for r in ok_rows if spills(r)]
    lines += ["", f"Configs that spill: {len(spilling)} of {len(ok_rows)}"] + ([""] if spilling else [])
    groups: dict[tuple, list[str]] = {}
    for r in spilling:
        cfg = row_config(r, config_keys)
        groups.setdefault((r["kernel"], r["head_dim"], r["dtype"], r["stats"]), []).append(
            f"{cfg} ({r['regs']} regs, {r['spill_st']}/{r['spill_ld']} B st/ld)"
        )
    for (k, d, dt, st), cfgs in groups.items():
        lines.append(f"- {k} d={d} {dt} stats={st}: " + ", ".join(cfgs))
    no_wgmma = [r for r in ok_rows if "wgmma" not in r["dots"]]
    lines += ["", f"Configs whose dots are not wgmma: {len(no_wgmma)} of {len(ok_rows)}"] + ([""] if no_wgmma else [])
    kinds: dict[tuple, set] = {}
    for r in no_wgmma:
        kinds.setdefault((r["kernel"], r["dots"]), set()).add(row_config(r, config_keys).rsplit(" s", 1)[0])
    for (k, dots), cfgs in kinds.items():
        lines.append(f"- {k} -> {dots}: " + ", ".join(sorted(cfgs)))
    over = [r for r in ok_rows if r["smem_ok"] == "NO"]
    if over:
        lines += ["", f"Configs over the shared-memory limit (fail to launch, the autotuner skips them): {len(over)}"]
    errors = [r for r in rows if r["regs"] == ""]
    if errors:
        lines += ["", f"Configs that did not compile: {len(errors)}"]
        lines += [f"- {r['kernel']} d={r['head_dim']} {r['dtype']} {r['stats']}: {r['note']}" for r in errors[:20]]
    return lines


def _csv_list(cast):
    return lambda s: [cast(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--module", default=DEFAULT_MODULE, help="module holding the kernels")
    p.add_argument("--kernels", type=_csv_list(str), default=None, help="comma-separated kernel names (default: all)")
    p.add_argument("--head-dims", type=_csv_list(int), default=list(HEAD_DIMS))
    p.add_argument("--dtypes", type=_csv_list(str), default=list(DTYPES))
    p.add_argument("--seq-len", type=_csv_list(int), default=list(SEQ_LENS), help="lengths whose pruned configs count")
    p.add_argument(
        "--stats",
        type=_csv_list(str),
        default=list(STAT_SETS),
        help="statistics sets: none, all, or flags joined by + (ent, maxp, cls, same, rows, all+rows, ...)",
    )
    p.add_argument("--causal", type=_csv_list(lambda x: x.lower() in ("1", "true", "yes")), default=[True])
    p.add_argument("--fp32-precision", type=_csv_list(str), default=["tf32"], help="tf32 and/or ieee (fp32 only)")
    p.add_argument("--num-classes", type=int, default=NUM_CLASSES)
    p.add_argument("--cls-dot", choices=("auto", "0", "1"), default="auto", help="CLS_DOT with class mass")
    p.add_argument(
        "--every-length", action="store_true", help="every kernel at every length, not only where it is launched"
    )
    p.add_argument("--dry-run", action="store_true", help="list the compiles and stop")
    p.add_argument("--all-configs", action="store_true", help="compile every config, not only the pruned ones")
    p.add_argument("--quick", action="store_true", help="one config per kernel, head dim 64, fp16, no statistics")
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: H100/H200)")
    p.add_argument("--jobs", type=int, default=1, help="compiles in parallel (processes)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"))
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    args = p.parse_args(argv)
    if args.quick:
        args.head_dims, args.dtypes, args.stats = [64], ["fp16"], ["none"]  # and the first length a kernel takes
        args.tag = args.tag or "quick"
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        p.error(f"unknown dtypes {bad}; choose from {DTYPES}")

    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import triton

    module = importlib.import_module(args.module)
    if getattr(module, "INTERPRETED", False):
        sys.exit(f"{args.module} was imported under the interpreter (INTERPRETED is True)")
    kernels = discover(module)
    print(f"kernels in {args.module}: {', '.join(k.name for k in kernels)}")
    if args.kernels:
        missing = set(args.kernels) - {k.name for k in kernels}
        if missing:
            sys.exit(f"no kernels named {sorted(missing)}")
        kernels = [k for k in kernels if k.name in args.kernels]
    jobs, skipped, checks = plan(args, module, kernels)
    for s in skipped:
        print(s)
    n_checks = sum(checks.values())
    if set(checks) == {""}:
        check_note = f"matches Triton's launch binder on the same argument values ({n_checks} launches)"
    else:
        check_note = "; ".join(f"{k or 'matches'} ({n})" for k, n in checks.items())
    print(f"specialisation check: {check_note}")
    if not jobs:
        sys.exit("nothing to compile")
    if args.dry_run:
        for j in jobs:
            cfg = config_label(triton.Config(j.config_kwargs, **j.options))
            print(f"{j.kernel} d={j.spec.head_dim} {j.spec.dtype} stats={j.spec.stats_label} {cfg} T={j.seq_lens}")
        print(f"{len(jobs)} compiles")
        return
    ptxas, _ = _tools(args.arch)
    ptxas_version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    print(f"{len(jobs)} compiles for sm_{args.arch} ({os.path.basename(ptxas)}: {ptxas_version[-2]})")

    config_keys = list(dict.fromkeys(k for j in jobs for k in j.config_kwargs))
    smem_limit = SMEM_LIMIT.get(args.arch)
    results: list[dict | None] = [None] * len(jobs)
    t_start = time.perf_counter()

    def report(i: int, res: dict) -> None:
        results[i] = res
        j = jobs[i]
        done = sum(r is not None for r in results)
        what = f"{j.kernel} d={j.spec.head_dim} {j.spec.dtype} stats={j.spec.stats_label}"
        what += f" {config_label(triton.Config(j.config_kwargs, **j.options))}"
        if "error" in res and "regs" not in res:
            msg = f"ERROR {res['error']}"
        else:
            msg = f"{res.get('regs')} regs, spill {res.get('spill_st')}/{res.get('spill_ld')} B, "
            msg += f"stack {res.get('stack')} B, smem {res.get('smem')} B, {res.get('dots')}"
        print(f"[{done}/{len(jobs)}] {what}: {msg} ({res.get('compile_s', 0):.1f}s)", flush=True)

    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(compile_job, j): i for i, j in enumerate(jobs)}
            for fut in as_completed(futures):
                report(futures[fut], fut.result())
    else:
        for i, j in enumerate(jobs):
            report(i, compile_job(j))
    elapsed = time.perf_counter() - t_start

    rows = [make_row(j, r or {}, config_keys, smem_limit) for j, r in zip(jobs, results, strict=True)]
    n_cached = sum(bool(r and r.get("cached")) for r in results)
    goals = summary(rows, config_keys)
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    notes = [
        f"Compiled ahead of time, no GPU: triton.compile(ASTSource(...), target=GPUTarget('cuda', {args.arch}, 32)) "
        f"for {sm_arch_from_capability(args.arch)}; Triton {triton.__version__}; "
        f"ptxas {ptxas_version[-2].split(',', 1)[-1].strip()} ({os.path.basename(ptxas)}, the one Triton runs "
        f"for sm_{args.arch}), flags `{' '.join(ptxas_flags_from_env())}`; {len(jobs)} compiles in {elapsed:.0f} s "
        f"({n_cached} answered by Triton's cache, their ptxas -v rerun).",
        "",
        f"Launch modelled: B={BATCH}, H={HEADS}, contiguous tensors, so each unit stride is a constexpr 1 and "
        "strides/lengths divisible by 16 carry tt.divisibility, as a real launch specialises them; "
        f"num_classes={args.num_classes} with class_mass (NUM_CLASSES=1 without), CLS_DOT={args.cls_dot} "
        "(auto: forward()'s rule, more than CLASS_SUM_MAX classes), HAS_* flags off unless a stats set names them "
        "(rows: HAS_ROWS). Kernels at the lengths forward()/backward() launch them"
        + (" (here: every length)" if args.every_length else " (short_path, short_backward_fits)")
        + f". Specialisation: {check_note}. Configs: those the "
        f"kernel's early_config_prune keeps for T in {args.seq_len}"
        + (" (all configs)" if args.all_configs else "")
        + "; `T` lists the lengths that keep each one.",
        "",
        "regs: registers per thread; spill_st/spill_ld: spill stores/loads (bytes per thread); stack: stack "
        "frame bytes (ptxas -v). smem: dynamic shared memory the launch asks for (Triton metadata.shared); "
        f"smem_ok: within the {smem_limit} B a block may opt into on sm_{args.arch}. dots: what the PTX holds for "
        "tl.dot (wgmma.mma_async, mma.sync, or neither: fma). compile_s: 0.x s means Triton's cache answered. "
        "The numbers are Triton's own ptxas -v log when it compiled, or a ptxas rerun on its PTX with its flags "
        "on a cache hit; a note 'cubin has N regs' would mean they disagree with the cubin Triton built "
        "(cuobjdump --dump-resource-usage).",
        "",
        *goals,
    ]
    if skipped:
        notes += ["", *[f"- {s}" for s in skipped]]
    print()
    print("\n".join(goals))
    print(f"\n{len(jobs)} compiles in {elapsed:.0f} s ({n_cached} from Triton's cache)")
    stem = f"registers_sm{args.arch}" + (f"_{args.tag}" if args.tag else "")
    title = f"Registers, spills and shared memory of the Triton attention kernels on sm_{args.arch} (compiled, no GPU)"
    csv_path, md_path = write_tables(rows, args.out, stem, title, "\n".join(notes))
    print(f"wrote {csv_path} and {md_path}")


def ptxas_flags_from_env() -> list[str]:
    """ptxas flags for the notes (fp fusion as Triton's knobs default it)."""
    from triton import knobs

    fusion = knobs.language.fp_fusion_enabled(None)
    meta = type("M", (), {"enable_fp_fusion": fusion, "ptx_options": knobs.nvidia.ptxas_options})
    return ptxas_flags(meta)


if __name__ == "__main__":
    main()
