"""Flash-attention forward and backward in Triton, with per-head statistics.

Two paths, chosen by sequence length (``short_path``):

- **Tiled** (T > 128): the usual online-softmax loop over key blocks (base-2
  exponentials), one program per (batch*head, query block).
- **Short** (T <= 128, where the paper configs train): a query tile holds every key it
  needs, so the softmax is exact (one max, one sum, no rescaling); one program runs GROUP
  (batch, head) problems in turn, and a causal tile loads only the keys up to its last row.

Statistics are compile-time switches, so a launch that asks for none compiles to the plain
kernel; each one adds only an accumulator (rescaled, on the tiled path):

- max_prob = 1 / l at the end (the running max has probability exp(0) / l);
- entropy: t <- t * alpha + sum(p~ * s), then H = lse - t / l (masked scores are a
  large finite negative, so p~ * s is 0 there, never 0 * inf);
- class_mass: for up to CLASS_SUM_MAX classes, a masked row sum per class but the last,
  which is what the others leave of the row; for more, p~ @ onehot(key_class), one small dot;
- same_label_mass: acc_s <- acc_s * alpha + sum(p~ where label_j == label_i).

A ``ROWS`` flag per query row (``HAS_ROWS``) says which rows' statistics are wanted: query
tiles holding none of them run the plain loop, and their statistics are left undefined.

A key padding mask (``HAS_MASK``, a ``[B, T]`` bool read as bytes) is loaded per key tile and
scores a padded key -1e30, like the causal mask, in every tile (the unmasked phase too); a
row whose running max is still -1e30 at the end allows no key and is written as a zero
output with every statistic 0 and ``lse2`` 0. The backward zeroes p at padded keys, which
is every key of such a row, so its gradients are 0 whatever ``lse2`` says. Without a mask
the flag compiles the loads away.

Each tiled loop runs in two phases: tiles that need no mask (entirely inside the sequence
and, when causal, entirely below the diagonal), then the few that do.

The backward recomputes probabilities from the stored base-2 log-sum-exp. Tiled: one
kernel per key block accumulates dk and dv, one per query block accumulates dq, so no
atomics are needed. Short (fp16/bf16 with ``T_pad * Dh <= SHORT_BWD_MAX_AREA``): one fused
kernel per GROUP of (batch, head) problems computes rowsum(dO * O), dq, dk and dv together.

Each kernel autotunes its block shape, warps (and pipeline depth) once per length
bucket, head dim, dtype and set of statistics: the first launch of a new combination
compiles and times every config that fits (tens of seconds on a GPU). Set
``LIGHTNING_ICL_AUTOTUNE=0`` to skip that and launch the first config that fits, and
``LIGHTNING_ICL_SHORT=0`` to send short sequences down the tiled path. Which configs spill
registers on sm_90 is measured offline by ``python -m benchmarks.registers``
(``benchmarks/results/registers_sm90.md``); the pruning keeps the spilling ones out.

Import this module only after deciding on ``TRITON_INTERPRET``: Triton reads it
when the kernels are decorated.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton import knobs

INTERPRETED: bool = bool(knobs.runtime.interpret)
"""True when the kernels run in Triton's interpreter (CPU tensors)."""

LOG2E = 1.4426950408889634

# Inside kernels, constants are written as literals: compiled Triton cannot read module
# globals that are plain floats, and the interpreter cannot use constexpr globals in arithmetic.


def _config_grid(blocks, warps=(4, 8), stages=(2, 3, 4)) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn in blocks
        for w in warps
        for s in stages
    ]


# The query block is the M side of the forward and dq matmuls; the key block is the M side
# of the dk/dv matmuls, so that kernel wants the larger BLOCK_N.
FWD_CONFIGS = _config_grid([(128, 64), (128, 128), (64, 64), (64, 32), (32, 32), (16, 16)])
DKDV_CONFIGS = _config_grid([(32, 128), (64, 128), (32, 64), (64, 64), (16, 32), (16, 16)])
DQ_CONFIGS = _config_grid([(128, 32), (128, 64), (64, 32), (64, 64), (32, 16), (16, 16)])
# one config under the interpreter: it cannot autotune usefully and is slow per program
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]


def _configs(gpu_configs: list[triton.Config]) -> list[triton.Config]:
    return INTERPRETER_CONFIGS if INTERPRETED else gpu_configs


def autotuning() -> bool:
    """False when ``LIGHTNING_ICL_AUTOTUNE=0``: each launch takes the first config that fits."""
    return os.environ.get("LIGHTNING_ICL_AUTOTUNE", "1").strip() != "0"


def _prune(configs, named_args, **kwargs):
    """Fit the configs to the problem: blocks no longer than the sequence, no tiny blocks on
    long sequences, lighter tiles for wide heads and for several statistics at once."""
    t, d = named_args["T"], kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM"))
    span = max(16, triton.next_power_of_2(t))
    n_stats = sum(bool(kwargs.get(f)) for f in ("WANT_ENT", "WANT_CLS", "WANT_SAME"))
    kept = []
    for c in configs:
        bm, bn, area = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
        if bm > span or bn > span:
            continue
        if t >= 256 and max(bm, bn) < 64:
            continue
        if d >= 128 and (c.num_stages > 3 or (area > 128 * 64 and c.num_warps < 8)):
            continue
        if n_stats >= 2 and area > 128 * 64:
            continue
        if max(bm, bn) >= 128 and c.num_warps == 4:
            continue
        # with several statistics these spill registers on sm_90 (benchmarks/results/registers_sm90.md)
        if n_stats >= 2 and (bm >= 128 or (d >= 128 and c.num_warps < 8)):
            continue
        kept.append(c)
    kept = kept or configs[-1:]
    return kept if autotuning() else kept[:1]


def _prune_dkdv(configs, named_args, **kwargs):
    """As :func:`_prune`; at head dim 128 the dk/dv kernel's query block stays at 32 rows or fewer, on
    8 warps, since otherwise its two ``[BLOCK_N, 128]`` accumulators spill registers on sm_90."""
    if kwargs.get("HEAD_DIM", 0) >= 128:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] <= 32 and c.num_warps == 8] or configs
    return _prune(configs, named_args, **kwargs)


# Tune per power-of-two length bucket, not per exact length.
_FWD_KEY = [
    "T_KEY", "HEAD_DIM", "CAUSAL", "WANT_ENT", "WANT_MAXP", "WANT_CLS", "WANT_SAME", "DOT_PRECISION", "HAS_MASK"
]  # fmt: skip
_BWD_KEY = ["T_KEY", "HEAD_DIM", "CAUSAL", "DOT_PRECISION", "HAS_MASK"]


@triton.jit
def _query_block(H, CAUSAL: tl.constexpr):
    """``(bh, b, h, pid_m)`` of a program over (batch * head, query block): 64-bit ``bh``, since
    B*H*T*Dh may pass 2^31; when causal the query blocks run backwards, the longest rows first, for
    load balance."""
    bh = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    return bh, bh // H, bh % H, pid_m


@triton.jit
def _load_rows(base, rows, st, sd, row_ok, HEAD_DIM: tl.constexpr):
    """``[len(rows), HEAD_DIM]``: rows ``rows`` of the ``[T, Dh]`` head at ``base`` (0 where not ``row_ok``)."""
    offs_d = tl.arange(0, HEAD_DIM)
    return tl.load(base + rows[:, None] * st + offs_d[None, :] * sd, mask=row_ok[:, None], other=0.0)


@triton.jit
def _keys_allowed(km_base, cols, smt, T):
    """The key padding mask at key positions ``cols`` as bools (False past ``T``)."""
    return tl.load(km_base + cols * smt, mask=cols < T, other=0) != 0


@triton.jit
def _in_range_and_causal(cols, offs_m, T, CAUSAL: tl.constexpr):
    """``[BM, BN]`` bools: key ``cols`` lies inside the sequence and, when causal, not after query ``offs_m``."""
    valid = (cols < T)[None, :]
    if CAUSAL:
        valid = valid & (cols[None, :] <= offs_m[:, None])
    return valid


@triton.jit
def _key_range(pid_m, T, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(full_hi, hi)`` for query block ``pid_m``: key blocks in ``[0, full_hi)`` need no mask (inside
    the sequence and, when causal, ending before the block's first row); those in ``[full_hi, hi)`` do."""
    if CAUSAL:
        full_hi = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        full_hi = T // BLOCK_N * BLOCK_N
        hi = T
    return full_hi, hi


@triton.jit
def _class_sums(p, kc, NUM_CLASSES: tl.constexpr, CLS_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """``[BM, CLS_PAD]``: the row sums of ``p`` over the keys of each class but the last (whose mass is
    what the others leave of the row), 0 in the other columns; ``kc`` the key classes ``[BN]``."""
    cls_cols = tl.arange(0, CLS_PAD)
    sums = tl.zeros([BLOCK_M, CLS_PAD], dtype=tl.float32)
    for c in tl.static_range(NUM_CLASSES - 1):
        mass = tl.sum(tl.where((kc == c)[None, :], p, 0.0), 1)
        sums = tl.where(cls_cols[None, :] == c, mass[:, None], sums)
    return sums


@triton.jit
def _same_label_sum(p, q_label, k_label):
    """Row sums of ``p`` over the keys whose label equals the query's."""
    return tl.sum(tl.where(q_label[:, None] == k_label[None, :], p, 0.0), 1)


@triton.jit
def _fwd_tile_loop(
    q, q_label, k_base, v_base, kc_base, lab_base, km_base,
    skt, skd, svt, svd, sct, slt, smt,
    offs_m, T, full_hi, hi, scale_log2,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WANT_ENT: tl.constexpr,
    WANT_CLS: tl.constexpr,
    CLS_DOT: tl.constexpr,
    NUM_CLASSES: tl.constexpr,
    CLS_PAD: tl.constexpr,
    WANT_SAME: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The online-softmax loop of one query tile over its key tiles, with the asked-for accumulators.

    With ``HAS_MASK`` every key tile's padding flags are loaded and padded keys scored -1e30, like
    the causal mask; a row that allows no key ends with ``m_i = -1e30`` (see :func:`_live_rows`)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    cls_cols = tl.arange(0, CLS_PAD)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    cls_acc = tl.zeros([BLOCK_M, CLS_PAD], dtype=tl.float32)
    same_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for phase in tl.static_range(2):
        lo_p = 0 if phase == 0 else full_hi
        hi_p = full_hi if phase == 0 else hi
        for start_n in range(lo_p, hi_p, BLOCK_N):
            cols = start_n + offs_n
            k_ptrs = k_base + cols[None, :] * skt + offs_d[:, None] * skd  # [D, BN]
            v_ptrs = v_base + cols[:, None] * svt + offs_d[None, :] * svd  # [BN, D]
            if phase == 0:
                k_t = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k_t = tl.load(k_ptrs, mask=(cols < T)[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=(cols < T)[:, None], other=0.0)
            s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2  # base-2 scores [BM, BN]
            if phase == 1:
                s = tl.where(_in_range_and_causal(cols, offs_m, T, CAUSAL), s, -1.0e30)
            if HAS_MASK:
                s = tl.where(_keys_allowed(km_base, cols, smt, T)[None, :], s, -1.0e30)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            p_in = p.to(v.dtype)
            acc = tl.dot(p_in, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            if WANT_ENT:
                t_i = t_i * alpha + tl.sum(p * s, 1)
            if WANT_CLS:
                kc = tl.load(kc_base + cols * sct, mask=cols < T, other=-1)
                if CLS_DOT:  # many classes: one small dot with the one-hot key classes
                    onehot = (kc[:, None] == cls_cols[None, :]).to(v.dtype)  # [BN, C]
                    cls_acc = tl.dot(p_in, onehot, cls_acc * alpha[:, None], input_precision=DOT_PRECISION)
                else:  # few classes: a masked row sum per class but the last (the rest of l)
                    cls_acc = cls_acc * alpha[:, None] + _class_sums(p, kc, NUM_CLASSES, CLS_PAD, BLOCK_M)
            if WANT_SAME:
                k_label = tl.load(lab_base + cols * slt, mask=cols < T, other=-2)
                same_acc = same_acc * alpha + _same_label_sum(p, q_label, k_label)
            m_i = m_new
    return m_i, l_i, acc, t_i, cls_acc, same_acc


@triton.jit
def _live_rows(m_i):
    """Rows that allow at least one key: every other row's running max is the -1e30 of a masked score."""
    return m_i > -1.0e29


@triton.jit
def _store_stats(
    LSE2, ENT, MAXP, CLS, SAME, stat_off, row_ok, m_i, l_i, t_i, cls_acc, same_acc,
    WANT_ENT: tl.constexpr,
    WANT_MAXP: tl.constexpr,
    WANT_CLS: tl.constexpr,
    CLS_DOT: tl.constexpr,
    NUM_CLASSES: tl.constexpr,
    CLS_PAD: tl.constexpr,
    WANT_SAME: tl.constexpr,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Write the base-2 log-sum-exp and the statistics of one query tile from its accumulators.

    With ``HAS_MASK``, a row that allows no key gets every statistic 0, its log-sum-exp too."""
    lse2 = m_i + tl.log2(l_i)
    inv_l = 1.0 / l_i
    if HAS_MASK:
        live = _live_rows(m_i)
        lse2 = tl.where(live, lse2, 0.0)
        inv_l = tl.where(live, inv_l, 0.0)
    tl.store(LSE2 + stat_off, lse2, mask=row_ok)
    if WANT_ENT:  # H = ln 2 * (lse2 - E_p[s2]) with base-2 scores s2
        tl.store(ENT + stat_off, 0.6931471805599453 * (lse2 - t_i * inv_l), mask=row_ok)
    if WANT_MAXP:  # the row max has weight exp2(0) = 1
        tl.store(MAXP + stat_off, inv_l, mask=row_ok)
    if WANT_CLS:
        _store_class_mass(CLS, stat_off, row_ok, cls_acc, inv_l, m_i, CLS_DOT, NUM_CLASSES, CLS_PAD, HAS_MASK)
    if WANT_SAME:
        tl.store(SAME + stat_off, same_acc * inv_l, mask=row_ok)


@triton.jit
def _store_class_mass(
    CLS, stat_off, row_ok, cls_acc, inv_l, m_i,
    CLS_DOT: tl.constexpr,
    NUM_CLASSES: tl.constexpr,
    CLS_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Write the class mass ``[BM, NUM_CLASSES]`` of one query tile from its unnormalised class sums.

    Without ``CLS_DOT`` the sums leave out the last class, which gets what the others leave of the
    row (0 in a row that allows no key, whose running max ``m_i`` is -1e30)."""
    c = tl.arange(0, CLS_PAD)
    mass = cls_acc * inv_l[:, None]
    if not CLS_DOT:  # the last class holds what the others leave of the row
        rest = tl.maximum(1.0 - tl.sum(mass, 1), 0.0)
        if HAS_MASK:
            rest = tl.where(_live_rows(m_i), rest, 0.0)
        mass = tl.where(c[None, :] == NUM_CLASSES - 1, rest[:, None], mass)
    cls_ptrs = CLS + stat_off[:, None] * NUM_CLASSES + c[None, :]
    tl.store(cls_ptrs, mass, mask=row_ok[:, None] & (c[None, :] < NUM_CLASSES))


@triton.autotune(configs=_configs(FWD_CONFIGS), key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE2, ENT, MAXP, CLS, SAME, KEY_CLASS, LABEL, ROWS, KEY_MASK,
    scale_log2,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    scb, sct,
    slb, slt,
    srb, srt,
    smb, smt,
    H, T, T_KEY,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WANT_ENT: tl.constexpr,
    WANT_MAXP: tl.constexpr,
    WANT_CLS: tl.constexpr,
    CLS_DOT: tl.constexpr,
    NUM_CLASSES: tl.constexpr,
    CLS_PAD: tl.constexpr,
    WANT_SAME: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh, b, h, pid_m = _query_block(H, CAUSAL)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T

    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, sqd, row_ok, HEAD_DIM)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    kc_base = KEY_CLASS + b * scb
    lab_base = LABEL + b * slb
    km_base = KEY_MASK + b * smb
    q_label = offs_m  # a placeholder unless same-label mass is asked for
    if WANT_SAME:
        q_label = tl.load(lab_base + offs_m * slt, mask=row_ok, other=-1)

    full_hi, hi = _key_range(pid_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    tile_wanted = False  # the extra accumulators: with statistics, in query tiles that hold a requested row
    if WANT_ENT or WANT_CLS or WANT_SAME:
        tile_wanted = True
        if HAS_ROWS:
            flags = tl.load(ROWS + b * srb + offs_m * srt, mask=row_ok, other=0)
            tile_wanted = tl.max(flags.to(tl.int32), 0) > 0
    # fmt: off
    if tile_wanted:
        m_i, l_i, acc, t_i, cls_acc, same_acc = _fwd_tile_loop(
            q, q_label, k_base, v_base, kc_base, lab_base, km_base, skt, skd, svt, svd, sct, slt, smt, offs_m, T,
            full_hi, hi, scale_log2, HEAD_DIM, CAUSAL, DOT_PRECISION, WANT_ENT, WANT_CLS, CLS_DOT, NUM_CLASSES,
            CLS_PAD, WANT_SAME, HAS_MASK, BLOCK_M, BLOCK_N,
        )
    else:  # the plain loop
        m_i, l_i, acc, t_i, cls_acc, same_acc = _fwd_tile_loop(
            q, q_label, k_base, v_base, kc_base, lab_base, km_base, skt, skd, svt, svd, sct, slt, smt, offs_m, T,
            full_hi, hi, scale_log2, HEAD_DIM, CAUSAL, DOT_PRECISION, False, False, CLS_DOT, NUM_CLASSES,
            CLS_PAD, False, HAS_MASK, BLOCK_M, BLOCK_N,
        )
    # fmt: on

    out = acc / l_i[:, None]
    if HAS_MASK:  # a row that allows no key: a zero output row
        out = tl.where(_live_rows(m_i)[:, None], out, 0.0)
    o_ptrs = OUT + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None])
    stat_off = bh * T + offs_m  # statistics are contiguous [B, H, T]
    _store_stats(
        LSE2, ENT, MAXP, CLS, SAME, stat_off, row_ok, m_i, l_i, t_i, cls_acc, same_acc,
        WANT_ENT, WANT_MAXP, WANT_CLS, CLS_DOT, NUM_CLASSES, CLS_PAD, WANT_SAME, HAS_MASK,
    )  # fmt: skip


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse2_base, delta_base,
    sqt, sqd, sdt, sdd,
    offs_n, lo, hi, T, scale_log2,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    DIAGONAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Accumulate one key block's dk and dv over the query blocks starting in ``[lo, hi)``.

    ``MASK_ROWS``: the blocks may run past ``T`` (their padded rows load q = do = 0 and add nothing);
    ``DIAGONAL``: they straddle the diagonal, so a causal p is masked."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q_ptrs = q_base + offs_m[None, :] * sqt + offs_d[:, None] * sqd  # [D, BM]
        do_ptrs = do_base + offs_m[:, None] * sdt + offs_d[None, :] * sdd
        if MASK_ROWS:
            row_ok = offs_m < T
            q_t = tl.load(q_ptrs, mask=row_ok[None, :], other=0.0)
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            lse2 = tl.load(lse2_base + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            q_t = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse2 = tl.load(lse2_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION) * scale_log2  # [BN, BM]
        p_t = tl.exp2(s_t - lse2[None, :])
        if CAUSAL and DIAGONAL:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BN, BM]
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, km_base,
    skt, skd, svt, svd, smt,
    offs_m, lo, hi, T, scale_log2,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Accumulate one query block's dq over the key blocks starting in ``[lo, hi)``.

    ``MASKED``: the blocks may run past ``T`` or, when causal, cross the diagonal. With ``HAS_MASK``
    padded keys get p = 0 (so does every key of a row that allows none, whatever its ``lse2``)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        k_ptrs = k_base + cols[:, None] * skt + offs_d[None, :] * skd  # [BN, D]
        v_ptrs = v_base + cols[None, :] * svt + offs_d[:, None] * svd  # [D, BN]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols < T)[:, None], other=0.0)
            v_t = tl.load(v_ptrs, mask=(cols < T)[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v_t = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_in_range_and_causal(cols, offs_m, T, CAUSAL), p, 0.0)
        if HAS_MASK:
            p = tl.where(_keys_allowed(km_base, cols, smt, T)[None, :], p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.autotune(configs=_configs(DKDV_CONFIGS), key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE2, DELTA, DK, DV, KEY_MASK,
    scale_log2, sm_scale,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    smb, smt,
    H, T, T_KEY,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    b = bh // H
    h = bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < T
    k = _load_rows(K + b * skb + h * skh, offs_n, skt, skd, col_ok, HEAD_DIM)
    v = _load_rows(V + b * svb + h * svh, offs_n, svt, svd, col_ok, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdb + h * sdh
    stat_base = bh * T

    # Phase 0: query blocks straddling the diagonal (causal mask); phase 1: full blocks after
    # it, no mask; phase 2: the partial last block. Padded keys (col >= T) only feed padded
    # rows of dk/dv, which are never stored; padded queries load q = do = 0 and add nothing.
    full_end = T // BLOCK_M * BLOCK_M
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        mid = tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    tail = tl.maximum(mid, full_end)
    for phase in tl.static_range(3):
        lo_p = lo if phase == 0 else (mid if phase == 1 else tail)
        hi_p = mid if phase == 0 else (full_end if phase == 1 else T)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE2 + stat_base, DELTA + stat_base, sqt, sqd, sdt, sdd,
            offs_n, lo_p, hi_p, T, scale_log2, HEAD_DIM, CAUSAL, DOT_PRECISION, phase != 1, phase == 0, BLOCK_M,
        )  # fmt: skip
    dk = dk * sm_scale
    if HAS_MASK:  # a padded key's row of p is 0 for every query, so its dk and dv are 0
        key_ok = _keys_allowed(KEY_MASK + b * smb, offs_n, smt, T)
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    out_off = bh * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # dk, dv contiguous
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.autotune(configs=_configs(DQ_CONFIGS), key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE2, DELTA, DQ, KEY_MASK,
    scale_log2, sm_scale,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sdb, sdh, sdt, sdd,
    smb, smt,
    H, T, T_KEY,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    bh, b, h, pid_m = _query_block(H, CAUSAL)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, sqd, row_ok, HEAD_DIM)
    do = _load_rows(DO + b * sdb + h * sdh, offs_m, sdt, sdd, row_ok, HEAD_DIM)
    lse2 = tl.load(LSE2 + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    full_hi, hi = _key_range(pid_m, T, CAUSAL, BLOCK_M, BLOCK_N)
    for phase in tl.static_range(2):
        lo_p = 0 if phase == 0 else full_hi
        hi_p = full_hi if phase == 0 else hi
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, KEY_MASK + b * smb, skt, skd, svt, svd, smt,
            offs_m, lo_p, hi_p, T, scale_log2, HEAD_DIM, CAUSAL, DOT_PRECISION, HAS_MASK, phase == 1, BLOCK_N,
        )  # fmt: skip
    dq = dq * sm_scale
    out_off = bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_off, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ---- short sequences: the whole key range of a (batch, head) in registers ----------------------
#
# For T <= SHORT_MAX_T a query tile sees every key it needs in one tile, so its softmax is exact:
# one max, one exp2, one sum, no rescaling. One program runs GROUP (batch, head) problems one
# after another, so B*H = 4096 tiny problems are not 4096 programs' worth of scheduling tail.
# A query tile j of a causal problem loads only the keys up to its last row (rounded up to a
# power of two). The fused backward holds one problem's dk and dv for all keys and walks its
# query tiles, so dq, dk and dv come from one kernel without atomics.

CLASS_SUM_MAX = 4
"""Up to this many key classes, class mass is C - 1 masked row sums per tile (the last class is
the rest of the row); with more, one small dot with the one-hot classes."""

SHORT_MAX_T = 128
"""Longest sequence the short-sequence kernels take (its padded key range is one tile). At a
padded 256 keys every short config with statistics spills registers on sm_90, so 129..256 take
the tiled kernels, whose 128-key blocks make that two tiles."""

SHORT_BWD_MAX_AREA = 128 * 32
"""Largest ``T_PAD * HEAD_DIM`` the fused short backward takes (fp16/bf16): its dk, dv
accumulators grow with it, and beyond this every config spills registers on sm_90
(``benchmarks/results/registers_sm90.md``); fp32 spills at any size, so it takes the tiled backward."""


def _short_config_grid(blocks, groups, warps, stages=(1,)) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "GROUP": g}, num_warps=w, num_stages=s)
        for bm in blocks
        for g in groups
        for w in warps
        for s in stages
    ]


# num_stages has nothing to pipeline here (no inner loop): one value, half the compiles.
SHORT_FWD_CONFIGS = _short_config_grid((128, 64, 32, 16), groups=(1, 4), warps=(8, 4))
SHORT_BWD_CONFIGS = _short_config_grid((64, 32, 16), groups=(1, 2), warps=(8,))
INTERPRETER_SHORT_CONFIGS = [triton.Config({"BLOCK_M": 16, "GROUP": 2}, num_warps=4, num_stages=1)]


def _short_configs(gpu_configs: list[triton.Config]) -> list[triton.Config]:
    return INTERPRETER_SHORT_CONFIGS if INTERPRETED else gpu_configs


def _prune_short(configs, named_args, **kwargs):
    """Short forward: one to four query tiles, each at least 64 rows (the M of a Hopper
    warpgroup's wgmma; shorter tiles compile to mma.sync) unless the keys are fewer, 8 warps for
    128-row tiles and 4 for tiles under 64 rows; several problems per program only without
    statistics and for head dims up to 64, where that does not spill registers on sm_90
    (``benchmarks/results/registers_sm90.md``)."""
    t_pad, d = kwargs["T_PAD"], kwargs.get("HEAD_DIM", 64)
    n_stats = sum(bool(kwargs.get(f)) for f in ("WANT_ENT", "WANT_CLS", "WANT_SAME"))
    kept = []
    for c in configs:
        bm, warps, group = c.kwargs["BLOCK_M"], c.num_warps, c.kwargs["GROUP"]
        if bm > t_pad or t_pad // bm > 4 or bm < min(64, t_pad) or bm * t_pad > 64 * 256:
            continue
        if (bm >= 128 and warps != 8) or (bm < 64 and warps != 4):
            continue
        if group > 1 and (n_stats > 0 or d >= 128):  # several problems per program: only plain, narrow ones
            continue
        kept.append(c)
    kept = kept or [c for c in configs if c.kwargs["BLOCK_M"] <= t_pad][-1:] or configs[-1:]
    return kept if autotuning() else kept[:1]


def _prune_short_bwd(configs, named_args, **kwargs):
    """Fused short backward: query tiles of min(64, T_PAD) rows on 8 warps, the only shape that
    holds dk and dv without spilling on sm_90."""
    t_pad = kwargs["T_PAD"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] == min(64, t_pad)] or configs[-1:]
    return kept if autotuning() else kept[:1]


_SHORT_FWD_KEY = [
    "T_PAD", "HEAD_DIM", "CAUSAL", "WANT_ENT", "WANT_MAXP", "WANT_CLS", "WANT_SAME", "DOT_PRECISION", "HAS_MASK"
]  # fmt: skip
_SHORT_BWD_KEY = ["T_PAD", "HEAD_DIM", "CAUSAL", "DOT_PRECISION", "HAS_MASK"]


@triton.jit
def _short_fwd_tile(
    Q, K, V, OUT, LSE2, ENT, MAXP, CLS, SAME, KEY_CLASS, LABEL, ROWS, KEY_MASK,
    scale_log2,
    sqt, sqd, skt, skd, svt, svd, sot, sod, sct, slt, srt, smt,
    q_base, k_base, v_base, o_base, kc_base, lab_base, rows_base, km_base, stat_base,
    m0, T,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WANT_ENT: tl.constexpr,
    WANT_MAXP: tl.constexpr,
    WANT_CLS: tl.constexpr,
    CLS_DOT: tl.constexpr,
    NUM_CLASSES: tl.constexpr,
    CLS_PAD: tl.constexpr,
    WANT_SAME: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    KEYS: tl.constexpr,
):  # fmt: skip
    """One query tile ``[m0, m0 + BLOCK_M)`` against its ``KEYS`` keys, with an exact softmax."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, KEYS)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    col_ok = cols < T
    q = _load_rows(Q + q_base, offs_m, sqt, sqd, row_ok, HEAD_DIM)
    k_t = tl.load(K + k_base + cols[None, :] * skt + offs_d[:, None] * skd, mask=col_ok[None, :], other=0.0)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale_log2  # base-2 scores [BM, KEYS]
    valid = _in_range_and_causal(cols, offs_m, T, CAUSAL)
    if HAS_MASK:
        valid = valid & _keys_allowed(KEY_MASK + km_base, cols, smt, T)[None, :]
    s = tl.where(valid, s, -1.0e30)
    m = tl.max(s, 1)
    p = tl.exp2(s - m[:, None])
    l_i = tl.sum(p, 1)
    inv_l = 1.0 / l_i
    stat_off = stat_base + offs_m
    lse2 = m + tl.log2(l_i)
    if HAS_MASK:  # a row that allows no key (max -1e30): zero output, every statistic 0, lse2 0
        live = _live_rows(m)
        inv_l = tl.where(live, inv_l, 0.0)
        lse2 = tl.where(live, lse2, 0.0)
    tl.store(LSE2 + stat_off, lse2, mask=row_ok)
    if WANT_MAXP:
        tl.store(MAXP + stat_off, inv_l, mask=row_ok)
    # the statistics before the p @ v dot, so that s and their temporaries are dead during it
    if WANT_ENT or WANT_CLS or WANT_SAME:
        tile_wanted = True
        if HAS_ROWS:  # the statistics' extra work only in query tiles that hold a requested row
            flags = tl.load(ROWS + rows_base + offs_m * srt, mask=row_ok, other=0)
            tile_wanted = tl.max(flags.to(tl.int32), 0) > 0
        if tile_wanted:
            if WANT_ENT:
                t_i = tl.sum(p * s, 1)
                tl.store(ENT + stat_off, 0.6931471805599453 * (lse2 - t_i * inv_l), mask=row_ok)
            if WANT_CLS:
                kc = tl.load(KEY_CLASS + kc_base + cols * sct, mask=col_ok, other=-1)
                if CLS_DOT:
                    onehot = (kc[:, None] == tl.arange(0, CLS_PAD)[None, :]).to(V.dtype.element_ty)
                    cls_sum = tl.dot(p.to(V.dtype.element_ty), onehot, input_precision=DOT_PRECISION)
                else:
                    cls_sum = _class_sums(p, kc, NUM_CLASSES, CLS_PAD, BLOCK_M)
                _store_class_mass(CLS, stat_off, row_ok, cls_sum, inv_l, m, CLS_DOT, NUM_CLASSES, CLS_PAD, HAS_MASK)
            if WANT_SAME:
                q_label = tl.load(LABEL + lab_base + offs_m * slt, mask=row_ok, other=-1)
                k_label = tl.load(LABEL + lab_base + cols * slt, mask=col_ok, other=-2)
                tl.store(SAME + stat_off, _same_label_sum(p, q_label, k_label) * inv_l, mask=row_ok)
    v = _load_rows(V + v_base, cols, svt, svd, col_ok, HEAD_DIM)
    acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    out = acc * inv_l[:, None]
    tl.store(OUT + o_base + offs_m[:, None] * sot + offs_d[None, :] * sod, out.to(OUT.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip


@triton.autotune(
    configs=_short_configs(SHORT_FWD_CONFIGS), key=_SHORT_FWD_KEY, prune_configs_by={"early_config_prune": _prune_short}
)
@triton.jit
def _short_fwd_kernel(
    Q, K, V, OUT, LSE2, ENT, MAXP, CLS, SAME, KEY_CLASS, LABEL, ROWS, KEY_MASK,
    scale_log2,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    scb, sct,
    slb, slt,
    srb, srt,
    smb, smt,
    BH, H, T,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WANT_ENT: tl.constexpr,
    WANT_MAXP: tl.constexpr,
    WANT_CLS: tl.constexpr,
    CLS_DOT: tl.constexpr,
    NUM_CLASSES: tl.constexpr,
    CLS_PAD: tl.constexpr,
    WANT_SAME: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    for i in range(GROUP):
        bh = pid * GROUP + i
        if bh < BH:
            b = bh // H
            h = bh % H
            for j in tl.static_range(T_PAD // BLOCK_M):
                if j * BLOCK_M < T:
                    _short_fwd_tile(
                        Q, K, V, OUT, LSE2, ENT, MAXP, CLS, SAME, KEY_CLASS, LABEL, ROWS, KEY_MASK,
                        scale_log2, sqt, sqd, skt, skd, svt, svd, sot, sod, sct, slt, srt, smt,
                        b * sqb + h * sqh, b * skb + h * skh, b * svb + h * svh, b * sob + h * soh,
                        b * scb, b * slb, b * srb, b * smb, bh * T,
                        j * BLOCK_M, T,
                        HEAD_DIM, CAUSAL, DOT_PRECISION, WANT_ENT, WANT_MAXP, WANT_CLS, CLS_DOT, NUM_CLASSES,
                        CLS_PAD, WANT_SAME, HAS_ROWS, HAS_MASK, BLOCK_M,
                        # causal: keys up to the tile's last row, as a power of two (tiles 0 and 1 exactly)
                        BLOCK_M * (j + 1) if (CAUSAL and j < 2) else T_PAD,
                    )  # fmt: skip


@triton.autotune(
    configs=_short_configs(SHORT_BWD_CONFIGS),
    key=_SHORT_BWD_KEY,
    prune_configs_by={"early_config_prune": _prune_short_bwd},
)
@triton.jit
def _short_bwd_kernel(
    Q, K, V, OUT, DO, LSE2, DQ, DK, DV, KEY_MASK,
    scale_log2, sm_scale,
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    sdb, sdh, sdt, sdd,
    smb, smt,
    BH, H, T,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_MASK: tl.constexpr,
    T_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, T_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < T
    for i in range(GROUP):
        bh = pid * GROUP + i
        if bh < BH:
            b = bh // H
            h = bh % H
            k = _load_rows(K + b * skb + h * skh, cols, skt, skd, col_ok, HEAD_DIM)
            v = _load_rows(V + b * svb + h * svh, cols, svt, svd, col_ok, HEAD_DIM)
            dk = tl.zeros([T_PAD, HEAD_DIM], dtype=tl.float32)
            dv = tl.zeros([T_PAD, HEAD_DIM], dtype=tl.float32)
            key_ok = col_ok
            if HAS_MASK:  # padded keys (so every key of a row that allows none: its lse2 is 0) get p = 0
                key_ok = col_ok & _keys_allowed(KEY_MASK + b * smb, cols, smt, T)
            for j in tl.static_range(T_PAD // BLOCK_M):
                if j * BLOCK_M < T:
                    offs_m = j * BLOCK_M + tl.arange(0, BLOCK_M)
                    row_ok = offs_m < T
                    q = _load_rows(Q + b * sqb + h * sqh, offs_m, sqt, sqd, row_ok, HEAD_DIM)
                    do = _load_rows(DO + b * sdb + h * sdh, offs_m, sdt, sdd, row_ok, HEAD_DIM)
                    o = _load_rows(OUT + b * sob + h * soh, offs_m, sot, sod, row_ok, HEAD_DIM)
                    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)  # rowsum(dO * O)
                    lse2 = tl.load(LSE2 + bh * T + offs_m, mask=row_ok, other=0.0)
                    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2  # [BM, T_PAD]
                    valid = key_ok[None, :] & row_ok[:, None]
                    if CAUSAL:
                        valid = valid & (cols[None, :] <= offs_m[:, None])
                    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
                    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BM, T_PAD]
                    ds = p * (dp - delta[:, None])
                    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
                    dq_off = bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
                    tl.store(DQ + dq_off, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
                    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
            out_off = bh * T * HEAD_DIM + cols[:, None] * HEAD_DIM + offs_d[None, :]  # dk, dv contiguous
            tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
            tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


def _precision(dtype: torch.dtype, ieee: bool) -> str:
    # only fp32 operands have a choice; "tf32" is Triton's default and a no-op for fp16/bf16
    return "ieee" if (ieee and dtype == torch.float32) else "tf32"


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensors' GPU, not whichever is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def short_path(t: int) -> bool:
    """Whether sequences of length ``t`` take the short-sequence kernels (``LIGHTNING_ICL_SHORT=0``: never)."""
    return t <= SHORT_MAX_T and os.environ.get("LIGHTNING_ICL_SHORT", "1").strip() != "0"


def short_backward_fits(t: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the fused short backward holds this problem's dk and dv (else the tiled backward runs)."""
    area = max(16, triton.next_power_of_2(t)) * head_dim
    return short_path(t) and dtype in (torch.float16, torch.bfloat16) and area <= SHORT_BWD_MAX_AREA


def _mask_arg(key_mask: torch.Tensor | None, unused: torch.Tensor) -> torch.Tensor:
    """The key padding mask as the kernels read it: its bool bytes as uint8, no copy."""
    if key_mask is None:
        return unused
    return key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_class: torch.Tensor | None,
    label: torch.Tensor | None,
    rows: torch.Tensor | None,
    causal: bool,
    sm_scale: float,
    num_classes: int,
    want_entropy: bool,
    want_max_prob: bool,
    want_class_mass: bool,
    want_same_label: bool,
    ieee: bool,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward; returns ``(out, lse2, entropy, max_prob, class_mass, same_label_mass)``.

    Statistics not asked for come back as empty tensors. ``lse2`` is the base-2 log-sum-exp.
    ``rows`` (``[B, T]`` int8, or None for all) flags the query rows whose entropy, class mass
    and same-label mass are wanted: they are computed in the query tiles holding a flagged row
    and undefined in the others (lse and max_prob are free and cover every row). ``key_mask``
    (``[B, T]`` bool, or None for every key) says which keys may be attended; a row that allows
    none gets a zero output, every statistic 0 and ``lse2`` 0.
    """
    b, h, t, d = q.shape
    out = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    lse2 = torch.empty((b, h, t), **f32)

    def stat(wanted: bool, *shape: int) -> torch.Tensor:
        # a fresh empty tensor for each statistic not asked for: outputs of a custom op may not alias
        return torch.empty(shape if wanted else (0,), **f32)

    ent = stat(want_entropy, b, h, t)
    maxp = stat(want_max_prob, b, h, t)
    cls = stat(want_class_mass, b, h, t, num_classes)
    same = stat(want_same_label, b, h, t)
    unused = torch.empty((1, 1), dtype=torch.int32, device=q.device)
    # int32 ids keep the per-tile comparisons cheap in registers
    kc = key_class.to(torch.int32) if want_class_mass else unused
    lab = label.to(torch.int32) if want_same_label else unused
    flags = rows if rows is not None else unused
    km = _mask_arg(key_mask, unused)
    n_cls = max(num_classes, 1)
    cls_dot = n_cls > CLASS_SUM_MAX
    flags_common = dict(
        HEAD_DIM=d,
        CAUSAL=causal,
        DOT_PRECISION=_precision(q.dtype, ieee),
        WANT_ENT=want_entropy,
        WANT_MAXP=want_max_prob,
        WANT_CLS=want_class_mass,
        CLS_DOT=cls_dot,
        NUM_CLASSES=n_cls,
        # the one-hot dot needs 16 columns; the masked row sums only a power of two >= C
        CLS_PAD=max(16, triton.next_power_of_2(n_cls)) if cls_dot else triton.next_power_of_2(n_cls),
        WANT_SAME=want_same_label,
        HAS_ROWS=rows is not None,
        HAS_MASK=key_mask is not None,
    )
    args = (
        q, k, v, out, lse2, ent, maxp, cls, same, kc, lab, flags, km,
        sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *kc.stride(), *lab.stride(), *flags.stride(), *km.stride(),
    )  # fmt: skip
    with _on_device(q):
        if short_path(t):
            grid = lambda meta: (triton.cdiv(b * h, meta["GROUP"]),)
            _short_fwd_kernel[grid](*args, b * h, h, t, T_PAD=max(16, triton.next_power_of_2(t)), **flags_common)
        else:
            grid = lambda meta: (b * h, triton.cdiv(t, meta["BLOCK_M"]))
            _fwd_kernel[grid](*args, h, t, triton.next_power_of_2(t), **flags_common)
    return out, lse2, ent, maxp, cls, same


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse2: torch.Tensor,
    causal: bool,
    sm_scale: float,
    ieee: bool,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv (contiguous, dtype of q) from the saved forward (and its ``key_mask``)."""
    b, h, t, d = q.shape
    dq = torch.empty((b, h, t, d), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    common = dict(HEAD_DIM=d, CAUSAL=causal, DOT_PRECISION=_precision(q.dtype, ieee), HAS_MASK=key_mask is not None)
    scale_log2 = sm_scale * LOG2E
    km = _mask_arg(key_mask, torch.empty((1, 1), dtype=torch.uint8, device=q.device))
    if short_backward_fits(t, d, q.dtype):  # one kernel: delta, dq, dk and dv of each (batch, head) together
        grid = lambda meta: (triton.cdiv(b * h, meta["GROUP"]),)
        with _on_device(q):
            _short_bwd_kernel[grid](
                q, k, v, out, grad_out, lse2, dq, dk, dv, km, scale_log2, sm_scale,
                *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *km.stride(),
                b * h, h, t, T_PAD=max(16, triton.next_power_of_2(t)), **common,
            )  # fmt: skip
        return dq, dk, dv
    delta = torch.linalg.vecdot(out.float(), grad_out.float()).contiguous()  # [B, H, T]
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *km.stride())
    t_key = triton.next_power_of_2(t)
    grid_n = lambda meta: (b * h, triton.cdiv(t, meta["BLOCK_N"]))
    grid_m = lambda meta: (b * h, triton.cdiv(t, meta["BLOCK_M"]))
    with _on_device(q):
        _bwd_dkdv_kernel[grid_n](
            q, k, v, grad_out, lse2, delta, dk, dv, km, scale_log2, sm_scale, *strides, h, t, t_key, **common
        )
        _bwd_dq_kernel[grid_m](
            q, k, v, grad_out, lse2, delta, dq, km, scale_log2, sm_scale, *strides, h, t, t_key, **common
        )
    return dq, dk, dv
