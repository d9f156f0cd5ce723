"""Multi-head GateLoop as Pallas kernels: the chunked form with exact per-channel decay, forward and backward.

Per head, H_n = diag(a_n) H_{n-1} + k_n^T v_n and y_n = Re(q_n H_n), with a = e^{log_r + i theta} per key channel.
Time is cut into chunks of C positions and chunks into sub-blocks of c = 16. With G, Phi the cumulative log|a| and
phase, a query n and a key m <= n interact through Z_nm = e^{(G_n - G_m) + i (Phi_n - Phi_m)} per channel, and:

- Key sub-block j < query sub-block i (same chunk): split at B, the position before sub-block i:
  Z = rho_n * sigma_m * gamma, with rho_n = e^{(G_n - G_B) + i(..)} (prefix inside sub-block i), sigma_m =
  e^{(G_end_j - G_m) + i(..)} (suffix inside sub-block j) and gamma the totals of the sub-blocks strictly between.
  Every factor is e^{sum of log|a| <= 0}: nothing overflows for any gate in [0, 1], |a| = 0 included. The scores
  are Re((q rho) (k sigma gamma)^T): two real matrix products (the rotation identity, key width 2 d_qk).
- Diagonal sub-blocks (m < n inside one sub-block): e^{G_n - G_m} with G_n - G_m summed directly over (m, n] (a
  running sum, one row at a time), never as a difference of prefix sums, so |a| ~ 0 earlier in the sub-block costs
  no cancellation. The phase factors as cos(Phi_n - Phi_m) = cos cos + sin sin of sub-block prefixes (|Phi| <= 16 pi
  after wrapping each step to [-pi, pi)). The m = n term is q_n . k_n exactly.
  That row loop is the exact fallback. A sub-block whose every channel decays by at most Config.tame_nats (48) nats
  over its 16 rows - all of them for gates |a| >= e^-3 - instead takes two matrix products,
  A = Re((q e^{G + i Phi}) (k e^{-G - i Phi})^T) with G, Phi the sub-block prefixes: the factors stay within e^48,
  far inside float32's range (e^88), and a term's relative error within eps (|G_n| + |G_m|) <= 96 x 6e-8 (in practice
  far less: G_n and G_m are sums sharing their first terms; the oracle errors are the same at 16 to 64 nats). The
  choice is one branch per program (lax.cond -> scf.if).
- Between chunks only the state is carried: S_{j+1} = T_j S_j + dS_j (T_j the chunk's total transition, dS_j its
  increment from a zero start), by a sequential kernel over chunks that keeps the state in registers.

Kernels (grid axes in brackets; bh = batch x heads, n chunks, nb = C / c sub-blocks):
  forward   _outer (bh, n): dS_j and the chunk totals -> _carry (bh, d_qk blocks): chunk-start states
            -> _query_side (bh, n, nb): y.
  backward  _outer (bh, n): each chunk's cotangent of its start state -> _carry reversed: the cotangent of each chunk's
            end state -> _query_side (dq and the query halves of dlog_r, dtheta) and _key_side (dk, dv and the key
            halves), both (bh, n, nb).
dlog_r and dtheta use that y depends on G only through q e^{G} and k e^{-G} (and the final state through e^{G_T}):
dL/dG_n = q_n Re(Dq_n) - k_n Re(Dk_n), dL/dPhi_n = -q_n Im(Dq_n) + k_n Im(Dk_n), where Dq, Dk are the complex
coefficients of q and k in the loss; dlog_r is the reverse cumulative sum of dL/dG. The kernels return sums
reversed inside each sub-block plus sub-block totals; the sum over later sub-blocks is one small XLA add.

Precision: float32 arithmetic throughout. Matrix products use `Config.precision`: on GPU TF32x3 (three tf32
tensor-core products, float32 accuracy); the 16 x 16 triangular sums are IEEE float32. In interpret mode (CPU, for
tests) every product is float32 (Precision.HIGHEST).

Shapes: the mode contract of ops/ ((b, t, h, d) arrays; h0 (b, h, d_qk, d_v) complex). d_qk and d_v are padded to
powers of two >= 16 and t to a multiple of C with identity steps (a = 1, q = k = v = 0), which change nothing.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gateloop_jax.ops.common import cmul, polar_pair, reset_gates
from gateloop_jax.ops.kernel_util import dot as _dot
from gateloop_jax.ops.kernel_util import dot_nt as _dot_nt
from gateloop_jax.ops.kernel_util import dot_tn as _dot_tn
from gateloop_jax.ops.kernel_util import iota as _iota
from gateloop_jax.ops.kernel_util import put_row as _put_row
from gateloop_jax.ops.kernel_util import row as _row
from gateloop_jax.ops.kernel_util import rows as _rows
from gateloop_jax.ops.kernel_util import strict as _strict
from gateloop_jax.ops.kernel_util import pad_operands, unpad_outputs
from gateloop_jax.ops.kernel_util import walk_rows as _diagonal
from gateloop_jax.ops.kernel_util import wrap as _wrap

try:  # The Triton backend's parameters; the module exists on every jax with Pallas, CPU builds included.
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

SUB = 16  # sub-block c: the smallest tile a Triton matrix product takes
# Head widths up to this run fast (H200): wider ones are padded to the next power of two, and at 128 the kernels'
# (d_qk, d_v) state tiles no longer fit in registers (see experiments/perf_notes.md); mode="auto" uses the pure-JAX
# chunked form for them.
MAX_FAST_HEAD_DIM = 64


class Config(NamedTuple):
    """Static kernel parameters (hashable: one compiled kernel per config and shape).

    Defaults: the fastest float32-accurate variant timed on an H200 (experiments/perf_notes.md): C = 16,
    4-row carry programs, matrix-product diagonal sub-blocks when tame, 8 warps for the carries and the key side:
    4.20 ms fwd+bwd at 32768 tokens x 8 heads x 64 x 64 (6.70 with 4 warps everywhere, 6.86 with the row loop
    everywhere, 5.38 with C = 32, in the same runs). The price of C = 16: the states saved for the backward,
    (t / C) x d_qk x d_v per head, are twice those of C = 32. tame_nats decides how many sub-blocks of a real model
    get the fast form: on a trained memory-horizon model's gates (H200) 4.26 ms at 48 against 6.10 at 32
    and 6.99 at 16; on random gates, where every sub-block is tame, all three are 4.2.
    """

    chunk: int = 16  # C, a multiple of SUB: states are stored once per chunk
    num_warps: int = 4  # the outer and query-side kernels
    carry_warps: int = 8  # the sequential carries
    backward_warps: int = 8  # the backward's key side
    num_stages: int = 1
    carry_block: int = 4  # d_qk rows of the state per program of the carry kernel (more programs: it is sequential)
    # Chunks per iteration of the carry loop, all their loads issued before any store (as the max-headed kernel does):
    # one store per step otherwise holds the next step's loads back, one memory latency per chunk. H200,
    # L = 8192: 1 -> 4 takes each carry from 0.42-0.45 to 0.35-0.36 ms (0.07-0.17 ms of the op); 8 is no better.
    carry_unroll: int = 4
    triangle: str = "ieee"  # the 16 x 16 triangular sums: "ieee" or "tf32x3" (the 0/1 matrix is exact in tf32)
    precision: str = "tf32x3"  # matrix products on GPU: "tf32x3" (float32 accuracy), "ieee", or "tf32" (fast, ~1e-3)
    # Diagonal sub-blocks whose gates decay by at most this many nats (every channel: sum of log|a| over the 16 rows
    # >= -tame_nats) take the matrix-product form (factors e^{+-G} stay within e^{tame_nats}; relative error <=
    # 2 tame_nats x 6e-8, measured far less); others the exact row loop. 0 = always the row loop. 48: in a trained
    # memory-horizon model 99.6% / 97% of the sub-blocks of its two layers are within 48 nats, against 89% / 43%
    # within 32 and 20% / 0.6% within 16 (experiments/kernel_dev/tame_fraction.py, perf_notes.md).
    tame_nats: float = 48.0
    ablate: str = ""  # profiling only (wrong results): skip the "diag" and / or "offdiag" sub-blocks


# Variants timed by experiments/kernel_dev/bench_kernels.py and profile_pallas_chunked.py (the first is the default).
# Two alternatives were timed on the H200 and removed (code at commit ae99aef): fused_state (outer
# + carry in one kernel per direction, 245 ms fwd+bwd against 4.0, both without y) and step_state (query and key
# sides walking each chunk's sub-blocks with the state in registers, C = 32 / 64: 6.4 / 7.1 ms against 4.0).
VARIANTS = {
    "default": Config(),
    "default_again": Config(),  # the same kernel twice: the run-to-run spread
    "c32": Config(chunk=32),
    "c32_carry16": Config(chunk=32, carry_block=16),  # 7.93 ms against the default's 6.77 in one H200 profile
    "c64": Config(chunk=64),
    "w8": Config(num_warps=8),
    "w4": Config(carry_warps=4, backward_warps=4),  # 4 warps everywhere
    "carry16": Config(carry_block=16),
    "carry_u1": Config(carry_unroll=1),  # one chunk per carry step
    "carry_u8": Config(carry_unroll=8),
    "tri_tf32x3": Config(triangle="tf32x3"),
    "nodiag": Config(ablate="diag"),  # ablations: wrong results, they show what each part costs
    "nooff": Config(ablate="offdiag"),
    "tf32": Config(precision="tf32"),  # speed reference only: ~1e-3 error
    "rowloop": Config(tame_nats=0.0),  # every diagonal sub-block by the exact row loop
    "tame16": Config(tame_nats=16.0),  # fast form for fewer sub-blocks
    "tame32": Config(tame_nats=32.0),
    "no_rowloop": Config(ablate="rowloop"),  # profiling: the matrix-product form only (wrong for wild gates)
    "c32_rowloop": Config(chunk=32, tame_nats=0.0),
}


def supported(q_shape, v_shape, platform: str) -> bool:
    """Multi-head shapes on GPU (Triton) or CPU (interpret mode, for tests)."""
    return len(q_shape) == 4 and platform in ("gpu", "cuda", "cpu")


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


class _Plan(NamedTuple):
    b: int
    h: int
    t: int  # padded to a multiple of chunk
    dk: int  # padded
    dv: int  # padded
    chunk: int
    num_warps: int
    num_stages: int
    carry_block: int
    precision: object  # a lax precision for jnp.dot
    tri: object  # lax precision of the triangular sums
    interpret: bool
    ablate: str = ""
    tame_nats: float = 48.0
    carry_warps: int = 8
    backward_warps: int = 8
    y_dtype: object = jnp.float32
    carry_unroll: int = 4

    @property
    def n(self):
        return self.t // self.chunk

    @property
    def nb(self):
        return self.chunk // SUB


_PRECISIONS = {
    "tf32x3": jax.lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
    "ieee": jax.lax.Precision.HIGHEST,
    "tf32": jax.lax.Precision.DEFAULT,
}

# --------------------------------------------------------------------------------------------------------------------
# In-kernel helpers. Tiles are (rows, d) float32; rows of a (b, t, h, d) array are read with stride h * d.
# --------------------------------------------------------------------------------------------------------------------


def _segment_sums(x, precision, prefix):
    """Inclusive prefix (prefix=True) or exclusive suffix sums down the rows of a (c, d) tile, each entry a direct
    sum of its own segment (triangular 0/1 matrix times x): no total-minus-prefix cancellation."""
    c = x.shape[0]
    r, col = _iota((c, c), 0), _iota((c, c), 1)
    tri = (col <= r) if prefix else (col > r)
    return _dot(tri.astype(jnp.float32), x, precision)


def _reverse_cumsum(x, precision):
    """Inclusive reverse cumulative sum down the rows (direct sums), and the column totals (d,)."""
    c = x.shape[0]
    r, col = _iota((c, c), 0), _iota((c, c), 1)
    upper = (col >= r).astype(jnp.float32)
    return _dot(upper, x, precision), jnp.sum(x, axis=0)


class _Tiles(NamedTuple):
    """One sub-block's gates: within-sub-block prefix (inclusive) and suffix (exclusive) of log|a| and phase, and the
    sub-block totals (1, d) (phase total wrapped)."""

    pre_lr: jax.Array
    pre_th: jax.Array
    suf_lr: jax.Array
    suf_th: jax.Array
    tot_lr: jax.Array
    tot_th: jax.Array


def _gate_tiles(lr_ref, th_ref, bi, hi, row0, tri, need=("pre", "suf")):
    """need: which of the prefix / suffix pairs to form (the other is None): each is two triangular products."""
    lr, th = _tile(lr_ref, bi, hi, row0), _wrap(_tile(th_ref, bi, hi, row0))
    pre_lr = pre_th = suf_lr = suf_th = None
    if "pre" in need:
        pre_lr, pre_th = _segment_sums(lr, tri, True), _segment_sums(th, tri, True)
    if "suf" in need:
        suf_lr, suf_th = _segment_sums(lr, tri, False), _segment_sums(th, tri, False)
    tot_lr = jnp.sum(lr, axis=0)[None, :]
    tot_th = _wrap(jnp.sum(th, axis=0))[None, :]
    return _Tiles(pre_lr, pre_th, suf_lr, suf_th, tot_lr, tot_th)


def _tile(ref, bi, hi, row0):
    return _rows(ref, bi, hi, row0, SUB)


def _if_tame(tame_nats, pre_lr, fast, slow, ablate=""):
    """fast() when every channel of the sub-block decays by at most tame_nats over its rows (pre_lr, the inclusive
    prefix of log|a|, is smallest on the last row), else slow(): one branch per program, both exact to ~1e-6."""
    if tame_nats <= 0:
        return slow()
    if "rowloop" in ablate:  # profiling: what the unused row-loop branch costs a kernel (wrong for wild gates)
        return fast()
    return jax.lax.cond(jnp.min(pre_lr) >= -tame_nats, fast, slow)


def _inverse_factors(pre_lr, pre_th, tame_nats):
    """e^{-G - i Phi} of the sub-block prefix as (re, im). On the tame branch -G <= tame_nats, so with the factors
    q e^{G + i Phi} the diagonal sub-block is two matrix products; the cap only keeps the unused branch finite."""
    mag = jnp.exp(jnp.minimum(-pre_lr, tame_nats))
    return mag * jnp.cos(pre_th), -mag * jnp.sin(pre_th)


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


def _outer_kernel(x_ref, y_ref, lr_ref, th_ref, out_re, out_im, *tot_refs, h, nb, to_end, conj, precision, tri):
    """Per chunk: sum_m f_m x_m^T y_m (complex (dk, dv)), with f_m = e^{(G_end - G_m) + i(..)} (to_end: the chunk's
    increment, x = k, y = v) or conj(e^{(G_m - G_start) + i(..)}) (the cotangent of the chunk's start state from its
    outputs, x = q, y = dy). With tot_refs, also the chunk's total log|a| and wrapped phase (its transition)."""
    pid, j = pl.program_id(0), pl.program_id(1)
    bi, hi = pid // h, pid % h
    t0 = j * (nb * SUB)
    d, e = out_re.shape[-2], out_re.shape[-1]
    acc_re = jnp.zeros((d, e), jnp.float32)
    acc_im = jnp.zeros((d, e), jnp.float32)
    off_lr = jnp.zeros((1, d), jnp.float32)
    off_th = jnp.zeros((1, d), jnp.float32)
    order = range(nb - 1, -1, -1) if to_end else range(nb)
    for s in order:  # static: nb = C / 16 sub-blocks
        row0 = t0 + s * SUB
        g = _gate_tiles(lr_ref, th_ref, bi, hi, row0, tri, ("suf",) if to_end else ("pre",))
        x, y = _tile(x_ref, bi, hi, row0), _tile(y_ref, bi, hi, row0)
        lr, th = (g.suf_lr, g.suf_th) if to_end else (g.pre_lr, g.pre_th)
        fr, fi = polar_pair(lr + off_lr, th + off_th)
        if conj:
            fi = -fi
        acc_re += _dot_tn(x * fr, y, precision)
        acc_im += _dot_tn(x * fi, y, precision)
        off_lr = off_lr + g.tot_lr
        off_th = _wrap(off_th + g.tot_th)
    out_re[bi, hi, j, :, :] = acc_re
    out_im[bi, hi, j, :, :] = acc_im
    if tot_refs:
        tot_lr_ref, tot_th_ref = tot_refs
        tot_lr_ref[bi, hi, j, :] = jnp.sum(off_lr, axis=0)  # (1, d) -> (d,)
        tot_th_ref[bi, hi, j, :] = jnp.sum(off_th, axis=0)


def _carry_kernel(tr_ref, ti_ref, inc_re, inc_im, init_re, init_im, out_re, out_im, last_re, last_im, *, h, n, bd,
                  reverse, conj, unroll):
    """Sequential over chunks with the state in registers. Forward: out_j = S (the state entering chunk j), then
    S = T_j S + inc_j. Reverse (cotangents): out_j = G (the cotangent of chunk j's end state), then
    G = conj(T_j) G + inc_j. last = the final S (the final state) or G (the cotangent of the initial state).
    The fold, `unroll` chunks per iteration with their loads first, is _fold_chunks."""
    pid, di = pl.program_id(0), pl.program_id(1)
    bi, hi = pid // h, pid % h
    rows = pl.ds(pl.multiple_of(di * bd, bd), bd)

    def terms(j):
        ar, ai = tr_ref[bi, hi, j, rows][:, None], ti_ref[bi, hi, j, rows][:, None]
        return ar, (-ai if conj else ai), inc_re[bi, hi, j, rows, :], inc_im[bi, hi, j, rows, :]

    _fold_chunks(terms, (init_re, init_im), (out_re, out_im), (last_re, last_im), bi, hi, rows, n=n, unroll=unroll,
                 reverse=reverse)


def _fold_chunks(terms, init, outs, lasts, bi, hi, rows, *, n, unroll, reverse):
    """The sequential fold of _carry_kernel, over the chunks in scan order (last first when reverse): out_j = the
    state entering chunk j, then state <- a_j state + x_j with (a_j re, im, x_j re, im) = terms(j), a_j a (rows, 1)
    column; lasts = the state after the last chunk. Each iteration forms the terms of
    `unroll` chunks (n is a multiple of it) before its first store: the stores go to refs the compiler cannot prove
    distinct from the inputs, so a load issued after one waits for it."""
    def body(i, state):
        sr, si = state
        chunks = [n - 1 - (i * unroll + u) if reverse else i * unroll + u for u in range(unroll)]
        formed = [terms(j) for j in chunks]
        for j, (ar, ai, xr, xi) in zip(chunks, formed):
            outs[0][bi, hi, j, rows, :] = sr
            outs[1][bi, hi, j, rows, :] = si
            sr, si = cmul(ar, ai, sr, si)
            sr, si = sr + xr, si + xi
        return sr, si

    state = tuple(x[bi, hi, rows, :].astype(jnp.float32) for x in init)
    sr, si = jax.lax.fori_loop(0, n // unroll, body, state)
    lasts[0][bi, hi, rows, :] = sr
    lasts[1][bi, hi, rows, :] = si


def _query_diagonal(q_ref, lr_ref, th_ref, w_ref, bi, hi, row0, q, k, v, w, g, kc, ks, rho, qt, *, grad, precision,
                    tame_nats, ablate):
    """The query side's diagonal sub-block: keys m <= n of the same 16 rows, exact for any gate (row loop) or by
    matrix products when tame. Forward: (A + diag(q . k)) v, (c, dv). Backward: the complex coefficient of q from
    W[n, m] = dy_n . v_m, m < n, as (re, im) (c, d_qk); the m = n term is added at the store."""
    c, d = q.shape
    if not grad:
        def row_scores(n, scores, wdec, qc_n, qs_n, cos_n, sin_n):
            row = jnp.sum(wdec * (qc_n * kc + qs_n * ks), axis=1)  # A[n, m] for m < n
            return _put_row(scores, n, row[None, :])

        def slow():
            return _diagonal(q_ref, lr_ref, th_ref, bi, hi, row0, kc, ks, row_scores, jnp.zeros((c, c), jnp.float32))

        def fast():  # A = Re((q rho) (k rho^-1)^T), m < n
            ir, ii = _inverse_factors(g.pre_lr, g.pre_th, tame_nats)
            s = _dot_nt(qt[0], k * ir, precision) - _dot_nt(qt[1], k * ii, precision)
            return jnp.where(_strict(c, True), s, 0.0)

        scores = jnp.zeros((c, c), jnp.float32)
        if "diag" not in ablate:
            scores = _if_tame(tame_nats, g.pre_lr, fast, slow, ablate)
        eye = (_iota((c, c), 0) == _iota((c, c), 1)).astype(jnp.float32)
        scores = scores + eye * jnp.sum(q * k, axis=1)[:, None]  # m = n: q_n . k_n, no decay, no phase
        return _dot(scores, v, precision)  # (c, dv)

    def row_grad(n, dq, wdec, qc_n, qs_n, cos_n, sin_n):
        dy_n = _row(w_ref, bi, hi, row0 + n)
        wcol = jnp.sum(v * dy_n, axis=1)[:, None]  # W[n, m] = dy_n . v_m, as a column over m
        r = jnp.sum(wcol * wdec * kc, axis=0)[None, :]
        im = -jnp.sum(wcol * wdec * ks, axis=0)[None, :]
        dre, dim = cmul(cos_n, sin_n, r, im)  # e^{i Phi_n} sum_m W w k_m e^{-i Phi_m}
        return _put_row(dq[0], n, dre), _put_row(dq[1], n, dim)

    zeros = jnp.zeros((c, d), jnp.float32)

    def slow():
        return _diagonal(q_ref, lr_ref, th_ref, bi, hi, row0, kc, ks, row_grad, (zeros, zeros))

    def fast():  # Dq = rho (W_{m<n} (k rho^-1))
        ir, ii = _inverse_factors(g.pre_lr, g.pre_th, tame_nats)
        wm = jnp.where(_strict(c, True), _dot_nt(w, v, precision), 0.0)
        return cmul(rho[0], rho[1], _dot(wm, k * ir, precision), _dot(wm, k * ii, precision))

    if "diag" in ablate:
        return zeros, zeros
    return _if_tame(tame_nats, g.pre_lr, fast, slow, ablate)


def _query_tiles(q_ref, k_ref, v_ref, lr_ref, th_ref, w_ref, bi, hi, row0, grad, tri):
    """One query sub-block's tiles: q, k, v, w (dy in the backward, else v), its gate tiles, k's phase parts
    kc, ks, and rho = e^{G + i Phi} (sub-block prefix) with q rho."""
    q, k, v = _tile(q_ref, bi, hi, row0), _tile(k_ref, bi, hi, row0), _tile(v_ref, bi, hi, row0)
    w = _tile(w_ref, bi, hi, row0) if grad else v
    g = _gate_tiles(lr_ref, th_ref, bi, hi, row0, tri, ("pre",))
    kc, ks = k * jnp.cos(g.pre_th), k * jnp.sin(g.pre_th)
    rho = polar_pair(g.pre_lr, g.pre_th)
    return q, k, v, w, g, kc, ks, rho, (q * rho[0], q * rho[1])


def _store_dq(out_refs, bi, hi, row0, slot, q, k, v, w, dq_re, dq_im, tri):
    """dq (the diagonal m = n term added) and the query halves of dL/dG, dL/dPhi, reverse-summed inside the
    sub-block, with their totals in sub-block slot `slot`."""
    dq_ref, dg_ref, dp_ref, dg_tot, dp_tot = out_refs
    w_diag = jnp.sum(w * v, axis=1)[:, None]  # W[n, n]
    dq_ref[bi, pl.ds(row0, SUB), hi, :] = (dq_re + w_diag * k).astype(dq_ref.dtype)
    dg, dg_sum = _reverse_cumsum(q * dq_re, tri)
    dp, dp_sum = _reverse_cumsum(-q * dq_im, tri)
    dg_ref[bi, pl.ds(row0, SUB), hi, :] = dg
    dp_ref[bi, pl.ds(row0, SUB), hi, :] = dp
    dg_tot[bi, hi, slot, :] = dg_sum
    dp_tot[bi, hi, slot, :] = dp_sum


def _query_side_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, w_ref, s_re, s_im, *out_refs, h, nb, precision, grad, tri,
                       tame_nats, ablate=""):
    """One query sub-block i of chunk j.

    Forward (grad=False; w = v): y_i = sum_{j' <= i} A_{i j'} v_{j'} + Re(q rho eps S_j) with S_j the chunk-start
    state. Backward (grad=True; w = dy): Dq_i, the complex coefficient of q_i in sum(dy * y), i.e. the same sums with
    W = dy v^T in place of A and dy S^T in place of S; writes dq and the query halves of dL/dG, dL/dPhi (reverse-summed
    inside the sub-block, plus the sub-block totals).
    """
    pid, j, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, hi = pid // h, pid % h
    t0 = j * (nb * SUB)
    row0 = t0 + i * SUB
    q, k, v, w, g, kc, ks, (rho_re, rho_im), (qt_re, qt_im) = _query_tiles(q_ref, k_ref, v_ref, lr_ref, th_ref,
                                                                           w_ref, bi, hi, row0, grad, tri)
    c, d = q.shape
    diag = _query_diagonal(q_ref, lr_ref, th_ref, w_ref, bi, hi, row0, q, k, v, w, g, kc, ks, (rho_re, rho_im),
                           (qt_re, qt_im), grad=grad, precision=precision, tame_nats=tame_nats, ablate=ablate)
    if not grad:
        acc = diag
    else:
        dq_re, dq_im = diag
        zeros = jnp.zeros((c, d), jnp.float32)
        acc_re, acc_im = zeros, zeros  # sum over key sub-blocks of W K', before the factor rho

    # Key sub-blocks j' < i, nearest first, accumulating the totals of the sub-blocks in between (gamma).
    def key_block(jj, carry):
        acc, gap_lr, gap_th = carry
        kr0 = t0 + (i - 1 - jj) * SUB
        gk = _gate_tiles(lr_ref, th_ref, bi, hi, kr0, tri, ("suf",))
        kk, vk = _tile(k_ref, bi, hi, kr0), _tile(v_ref, bi, hi, kr0)
        fr, fi = polar_pair(gk.suf_lr + gap_lr, gk.suf_th + gap_th)
        kt_re, kt_im = kk * fr, kk * fi
        if not grad:
            s = _dot_nt(qt_re, kt_re, precision) - _dot_nt(qt_im, kt_im, precision)
            acc = acc + _dot(s, vk, precision)
        else:
            wmat = _dot_nt(w, vk, precision)  # W = dy_i v_j'^T
            acc = (acc[0] + _dot(wmat, kt_re, precision), acc[1] + _dot(wmat, kt_im, precision))
        return acc, gap_lr + gk.tot_lr, _wrap(gap_th + gk.tot_th)

    zero_row = jnp.zeros((1, d), jnp.float32)
    init = acc if not grad else (acc_re, acc_im)
    acc, off_lr, off_th = init, zero_row, zero_row
    if nb > 1 and "offdiag" not in ablate:  # static: with one sub-block per chunk the loop's body is never emitted
        acc, off_lr, off_th = jax.lax.fori_loop(0, i, key_block, (init, zero_row, zero_row))

    # The state entering the chunk, seen from sub-block i: factor eps = e^{(G_B - G_start) + i(..)}.
    er, ei = polar_pair(off_lr, off_th)
    sr, si = s_re[bi, hi, j, :, :], s_im[bi, hi, j, :, :]
    if not grad:
        qs_re, qs_im = cmul(qt_re, qt_im, er, ei)
        y = acc + _dot(qs_re, sr, precision) - _dot(qs_im, si, precision)
        y_ref, = out_refs
        y_ref[bi, pl.ds(row0, SUB), hi, :] = y.astype(y_ref.dtype)
        return

    m_re, m_im = acc
    xr, xi = cmul(er, ei, _dot_nt(w, sr, precision), _dot_nt(w, si, precision))  # eps (dy S^T)
    m_re, m_im = m_re + xr, m_im + xi
    tr, ti = cmul(rho_re, rho_im, m_re, m_im)
    _store_dq(out_refs, bi, hi, row0, j * nb + i, q, k, v, w, dq_re + tr, dq_im + ti, tri)


def _key_tiles(q_ref, k_ref, v_ref, dy_ref, lr_ref, th_ref, bi, hi, row0, tri):
    """One key sub-block's tiles: q, k, v, dy, its gate tiles (prefix and suffix), the prefix phase's cos, sin and
    k's phase parts kc, ks."""
    q, k, v, dy = (_tile(r, bi, hi, row0) for r in (q_ref, k_ref, v_ref, dy_ref))
    g = _gate_tiles(lr_ref, th_ref, bi, hi, row0, tri)
    cos_m, sin_m = jnp.cos(g.pre_th), jnp.sin(g.pre_th)
    return q, k, v, dy, g, cos_m, sin_m, k * cos_m, k * sin_m


def _key_diagonal(q_ref, lr_ref, th_ref, dy_ref, bi, hi, row0, q, v, dy, g, kc, ks, *, precision, tame_nats, ablate):
    """The key side's diagonal sub-block (queries n > m of the same 16 rows): (tre, tim), the coefficient of k
    before the factor e^{-i Phi_m}, and dv's diagonal part A^T dy."""
    c, d = q.shape

    # For each query row n: Dk_m += W[n, m] w[m] q_n e^{i(Phi_n - Phi_m)} (e^{-i Phi_m} applied by the caller) and
    # dv_m += A[n, m] dy_n.
    def row_grad(n, carry, wdec, qc_n, qs_n, cos_n, sin_n):
        tre, tim, dv = carry
        dy_n = _row(dy_ref, bi, hi, row0 + n)
        wcol = jnp.sum(v * dy_n, axis=1)[:, None]
        tre = tre + wcol * wdec * qc_n
        tim = tim + wcol * wdec * qs_n
        a_col = jnp.sum(wdec * (qc_n * kc + qs_n * ks), axis=1)[:, None]  # A[n, m] as a column over m
        return tre, tim, dv + a_col * dy_n

    zeros = jnp.zeros((c, d), jnp.float32)
    dv_zeros = jnp.zeros(v.shape, jnp.float32)

    def slow():
        return _diagonal(q_ref, lr_ref, th_ref, bi, hi, row0, kc, ks, row_grad, (zeros, zeros, dv_zeros))

    def fast():  # with Qt = q rho, rows m: e^{-G_m} W^T_{n>m} Qt (e^{-i Phi_m} applied below) and A^T_{n>m} dy
        rr, ri = polar_pair(g.pre_lr, g.pre_th)
        qt_re, qt_im = q * rr, q * ri
        mag = jnp.exp(jnp.minimum(-g.pre_lr, tame_nats))  # e^{-G}, as in _inverse_factors
        upper = _strict(c, False)
        wt = jnp.where(upper, _dot_nt(v, dy, precision), 0.0)
        a_t = jnp.where(upper, _dot_nt(mag * kc, qt_re, precision) + _dot_nt(mag * ks, qt_im, precision), 0.0)
        return mag * _dot(wt, qt_re, precision), mag * _dot(wt, qt_im, precision), _dot(a_t, dy, precision)

    if "diag" in ablate:
        return zeros, zeros, dv_zeros
    return _if_tame(tame_nats, g.pre_lr, fast, slow, ablate)


def _store_dk(bi, hi, row0, slot, q, k, v, dy, dk_re, dk_im, dv, outs, tri):
    """dk, dv (diagonal m = n terms added) and the key halves of dL/dG, dL/dPhi with their totals in slot `slot`."""
    dk_ref, dv_ref, dg_ref, dp_ref, dg_tot, dp_tot = outs
    w_diag = jnp.sum(dy * v, axis=1)[:, None]  # W[m, m]
    dk_ref[bi, pl.ds(row0, SUB), hi, :] = (dk_re + w_diag * q).astype(dk_ref.dtype)
    dv_ref[bi, pl.ds(row0, SUB), hi, :] = (dv + jnp.sum(q * k, axis=1)[:, None] * dy).astype(dv_ref.dtype)
    dg, dg_sum = _reverse_cumsum(k * dk_re, tri)
    dp, dp_sum = _reverse_cumsum(-k * dk_im, tri)  # finish() subtracts the key half: dL/dPhi = -q Im Dq + k Im Dk
    dg_ref[bi, pl.ds(row0, SUB), hi, :] = dg
    dp_ref[bi, pl.ds(row0, SUB), hi, :] = dp
    dg_tot[bi, hi, slot, :] = dg_sum
    dp_tot[bi, hi, slot, :] = dp_sum


def _key_side_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, dy_ref, e_re, e_im, dk_ref, dv_ref, dg_ref, dp_ref,
                     dg_tot, dp_tot, *, h, nb, precision, tri, tame_nats, ablate=""):
    """Backward, one key sub-block j' of chunk j: Dk (complex coefficient of k) and dv from the query sub-blocks
    i >= j' of the chunk and from the cotangent E of the chunk's end state; writes dk, dv and the key halves of
    dL/dG, dL/dPhi (reverse-summed inside the sub-block, plus totals)."""
    pid, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bi, hi = pid // h, pid % h
    t0 = j * (nb * SUB)
    row0 = t0 + s * SUB
    q, k, v, dy, g, cos_m, sin_m, kc, ks = _key_tiles(q_ref, k_ref, v_ref, dy_ref, lr_ref, th_ref, bi, hi, row0, tri)
    c, d = k.shape
    zeros = jnp.zeros((c, d), jnp.float32)
    tre, tim, dv = _key_diagonal(q_ref, lr_ref, th_ref, dy_ref, bi, hi, row0, q, v, dy, g, kc, ks,
                                 precision=precision, tame_nats=tame_nats, ablate=ablate)
    dk_re, dk_im = cmul(cos_m, -sin_m, tre, tim)

    # Query sub-blocks i > j', nearest first: with sigma_m = e^{(G_end - G_m) + i(..)} (suffix in j'), gamma the
    # totals in between and Qt_i = q rho (prefix in i): Dk += sigma gamma (W^T Qt), dv += A^T dy_i.
    sg_re, sg_im = polar_pair(g.suf_lr, g.suf_th)
    kt_re, kt_im = k * sg_re, k * sg_im

    def query_block(ii, carry):
        m_re, m_im, dv, gap_lr, gap_th = carry
        qr0 = row0 + (ii + 1) * SUB
        gq = _gate_tiles(lr_ref, th_ref, bi, hi, qr0, tri, ("pre",))
        qq, dyq = _tile(q_ref, bi, hi, qr0), _tile(dy_ref, bi, hi, qr0)
        rr, ri = polar_pair(gq.pre_lr, gq.pre_th)
        qt_re, qt_im = qq * rr, qq * ri
        gr, gi = polar_pair(gap_lr, gap_th)
        wmat_t = _dot_nt(v, dyq, precision)  # W^T[m, n] = v_m . dy_n
        ur, ui = cmul(gr, gi, _dot(wmat_t, qt_re, precision), _dot(wmat_t, qt_im, precision))
        kg_re, kg_im = cmul(kt_re, kt_im, gr, gi)
        a_t = _dot_nt(kg_re, qt_re, precision) - _dot_nt(kg_im, qt_im, precision)  # A^T (c_keys, c_queries)
        return m_re + ur, m_im + ui, dv + _dot(a_t, dyq, precision), gap_lr + gq.tot_lr, _wrap(gap_th + gq.tot_th)

    zero_row = jnp.zeros((1, d), jnp.float32)
    init = (zeros, zeros, jnp.zeros(v.shape, jnp.float32), zero_row, zero_row)
    m_re, m_im, dv_off, gap_lr, gap_th = init
    if nb > 1 and "offdiag" not in ablate:  # static, as in the query side
        m_re, m_im, dv_off, gap_lr, gap_th = jax.lax.fori_loop(0, nb - 1 - s, query_block, init)
    dv = dv + dv_off

    # The chunk's end state: k_m contributes sigma gamma_end k_m v_m^T; its cotangent E gives Dk += gamma_end
    # (v conj(E)^T) (times sigma below) and dv += Re(k sigma gamma_end conj(E)).
    er, ei = e_re[bi, hi, j, :, :], e_im[bi, hi, j, :, :]
    gr, gi = polar_pair(gap_lr, gap_th)
    xr, xi = cmul(gr, gi, _dot_nt(v, er, precision), -_dot_nt(v, ei, precision))
    m_re, m_im = m_re + xr, m_im + xi
    ke_re, ke_im = cmul(kt_re, kt_im, gr, gi)
    dv = dv + _dot(ke_re, er, precision) + _dot(ke_im, ei, precision)
    tr, ti = cmul(sg_re, sg_im, m_re, m_im)
    _store_dk(bi, hi, row0, j * nb + s, q, k, v, dy, dk_re + tr, dk_im + ti, dv,
              (dk_ref, dv_ref, dg_ref, dp_ref, dg_tot, dp_tot), tri)


# --------------------------------------------------------------------------------------------------------------------
# pallas_call wrappers on padded arrays
# --------------------------------------------------------------------------------------------------------------------


def _call(plan: _Plan, kernel, grid, out_shapes, *args, name, warps=None):
    params = None
    if not plan.interpret and plgpu is not None:
        params = plgpu.CompilerParams(num_warps=warps or plan.num_warps, num_stages=plan.num_stages)
    return pl.pallas_call(kernel, out_shape=out_shapes, grid=grid, interpret=plan.interpret,
                          compiler_params=params, name=name)(*args)


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _outer(plan, x, y, lr, th, *, to_end, conj, totals):
    p = plan
    outs = (_f32(p.b, p.h, p.n, p.dk, y.shape[-1]),) * 2 + ((_f32(p.b, p.h, p.n, p.dk),) * 2 if totals else ())
    kernel = functools.partial(_outer_kernel, h=p.h, nb=p.nb, to_end=to_end, conj=conj, precision=p.precision,
                               tri=p.tri)
    return _call(p, kernel, (p.b * p.h, p.n), outs, x, y, lr, th, name="gateloop_mh_outer")


def _carry(plan, tr, ti, inc_re, inc_im, init_re, init_im, *, reverse):
    p = plan
    bd = min(p.carry_block, p.dk)
    outs = (_f32(p.b, p.h, p.n, p.dk, p.dv),) * 2 + (_f32(p.b, p.h, p.dk, p.dv),) * 2
    unroll = math.gcd(p.n, p.carry_unroll)  # a divisor of the number of chunks, at most carry_unroll
    kernel = functools.partial(_carry_kernel, h=p.h, n=p.n, bd=bd, reverse=reverse, conj=reverse, unroll=unroll)
    return _call(p, kernel, (p.b * p.h, p.dk // bd), outs, tr, ti, inc_re, inc_im, init_re, init_im,
                 name="gateloop_mh_carry", warps=p.carry_warps)


def _query_side(plan, q, k, v, lr, th, w, s_re, s_im, *, grad):
    """Forward (w = v): y. Backward (w = dy): dq, the query halves of dL/dG, dL/dPhi and their sub-block totals."""
    p = plan
    if grad:  # dq in q's dtype (rounded once, at the store); the dL/dG, dL/dPhi parts stay float32
        big, small = _f32(p.b, p.t, p.h, p.dk), _f32(p.b, p.h, p.n * p.nb, p.dk)
        outs = (jax.ShapeDtypeStruct(big.shape, q.dtype), big, big, small, small)
    else:
        outs = jax.ShapeDtypeStruct((p.b, p.t, p.h, p.dv), p.y_dtype)
    kernel = functools.partial(_query_side_kernel, h=p.h, nb=p.nb, precision=p.precision, grad=grad, tri=p.tri,
                               tame_nats=p.tame_nats, ablate=p.ablate)
    return _call(p, kernel, (p.b * p.h, p.n, p.nb), outs, q, k, v, lr, th, w, s_re, s_im,
                 name="gateloop_mh_bwd_q" if grad else "gateloop_mh_fwd")


def _key_side(plan, q, k, v, lr, th, dy, e_re, e_im):
    """Backward: dk, dv, the key halves of dL/dG, dL/dPhi and their sub-block totals."""
    p = plan
    big, small = _f32(p.b, p.t, p.h, p.dk), _f32(p.b, p.h, p.n * p.nb, p.dk)
    kernel = functools.partial(_key_side_kernel, h=p.h, nb=p.nb, precision=p.precision, tri=p.tri,
                               tame_nats=p.tame_nats, ablate=p.ablate)
    grads = (jax.ShapeDtypeStruct(big.shape, k.dtype), jax.ShapeDtypeStruct((p.b, p.t, p.h, p.dv), v.dtype))
    return _call(p, kernel, (p.b * p.h, p.n, p.nb), grads + (big, big, small, small),
                 q, k, v, lr, th, dy, e_re, e_im, name="gateloop_mh_bwd_k", warps=p.backward_warps)


def _forward(plan, q, k, v, lr, th, h0re, h0im):
    p = plan
    inc_re, inc_im, tot_lr, tot_th = _outer(p, k, v, lr, th, to_end=True, conj=False, totals=True)
    tr, ti = polar_pair(tot_lr, tot_th)  # each chunk's total transition, (b, h, n, d_qk): small, in XLA
    s_re, s_im, f_re, f_im = _carry(p, tr, ti, inc_re, inc_im, h0re, h0im, reverse=False)
    y = _query_side(p, q, k, v, lr, th, v, s_re, s_im, grad=False)
    return y, f_re, f_im, (s_re, s_im, tr, ti)


def _suffix_totals(tot):
    """(b, h, blocks, d) sub-block totals -> for each sub-block, the sum over the later ones (exclusive)."""
    rev = jnp.cumsum(tot[:, :, ::-1], axis=2)[:, :, ::-1]
    return rev - tot  # exact enough: a difference only of partial gradients, not of exponents


def _backward(plan, q, k, v, lr, th, h0re, h0im, res, final, dy, gf_re, gf_im):
    p = plan
    s_re, s_im, tr, ti = res
    f_re, f_im = final
    loc_re, loc_im = _outer(p, q, dy, lr, th, to_end=False, conj=True, totals=False)
    e_re, e_im, dh0_re, dh0_im = _carry(p, tr, ti, loc_re, loc_im, gf_re, gf_im, reverse=True)
    dq, qg, qp, qg_tot, qp_tot = _query_side(p, q, k, v, lr, th, dy, s_re, s_im, grad=True)
    dk, dv, kg, kp, kg_tot, kp_tot = _key_side(p, q, k, v, lr, th, dy, e_re, e_im)
    # The final state scales with e^{G_T + i Phi_T}: its cotangent adds Re<gf, final> and Re<gf, i final> to dL/dG_T,
    # dL/dPhi_T, which the reverse cumulative sum hands to every position.
    end_g = jnp.sum(gf_re * f_re + gf_im * f_im, axis=-1)  # (b, h, dk)
    end_p = jnp.sum(gf_im * f_re - gf_re * f_im, axis=-1)

    def finish(qpart, kpart, qtot, ktot, end):
        later = _suffix_totals(qtot - ktot) + end[:, :, None, :]  # (b, h, blocks, dk)
        later = jnp.repeat(jnp.transpose(later, (0, 2, 1, 3)), SUB, axis=1)  # (b, t, h, dk)
        return qpart - kpart + later

    dlr = finish(qg, kg, qg_tot, kg_tot, end_g)
    dth = finish(qp, kp, qp_tot, kp_tot, end_p)
    return dq, dk, dv, dlr, dth, dh0_re, dh0_im


def make_plan(cfg: Config, b, h, t, dk, dv, *, interpret: bool, chunk_size: int | None = None,
              y_dtype=jnp.float32) -> _Plan:
    """Static plan of one call: chunk = chunk_size (default cfg.chunk) capped at the length and rounded up to a
    multiple of SUB; t padded to a whole number of chunks; d_qk, d_v padded to powers of two >= SUB."""
    chunk = max(SUB, -(-min(chunk_size or cfg.chunk, -(-t // SUB) * SUB) // SUB) * SUB)
    dkp, dvp = max(SUB, _next_pow2(dk)), max(SUB, _next_pow2(dv))
    precision = jax.lax.Precision.HIGHEST if interpret else _PRECISIONS[cfg.precision]
    tri = jax.lax.Precision.HIGHEST if interpret else _PRECISIONS[cfg.triangle]
    return _Plan(b, h, -(-t // chunk) * chunk, dkp, dvp, chunk, cfg.num_warps, cfg.num_stages, cfg.carry_block,
                 precision, tri, bool(interpret), cfg.ablate, float(cfg.tame_nats), cfg.carry_warps,
                 cfg.backward_warps, jnp.dtype(y_dtype), cfg.carry_unroll)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(plan, q, k, v, lr, th, h0re, h0im):
    y, f_re, f_im, _ = _forward(plan, q, k, v, lr, th, h0re, h0im)
    return y, f_re, f_im


def _core_fwd(plan, q, k, v, lr, th, h0re, h0im):
    y, f_re, f_im, res = _forward(plan, q, k, v, lr, th, h0re, h0im)
    return (y, f_re, f_im), (q, k, v, lr, th, h0re, h0im, res, (f_re, f_im))


def _core_bwd(plan, res, cts):
    q, k, v, lr, th, h0re, h0im, fwd_res, final = res
    dy, (gf_re, gf_im) = cts[0], (x.astype(jnp.float32) for x in cts[1:])  # dy as it comes: upcast on load
    grads = _backward(plan, q, k, v, lr, th, h0re, h0im, fwd_res, final, dy, gf_re, gf_im)
    primals = (q, k, v, lr, th, h0re, h0im)
    return tuple(g.astype(x.dtype) for g, x in zip(grads, primals))


_core.defvjp(_core_fwd, _core_bwd)


def gateloop_pallas_chunked(q, k, v, log_r, theta, h0, *, chunk_size: int | None = None,
                            interpret: bool | None = None, config: Config | None = None, out_dtype=jnp.float32,
                            reset=None):
    """Mode contract: q, k, log_r, theta (b, t, h, dk), v (b, t, h, dv) real; h0 (b, h, dk, dv) complex or None.

    Returns (y (b, t, h, dv) in out_dtype, float32 by default, final state (b, h, dk, dv) complex64); differentiable
    in every argument (custom_vjp). chunk_size (default Config.chunk) is rounded up to a multiple of 16. Inputs go
    into the kernels in their own dtype (bf16 ones are upcast on load) and q, k, v's gradients come out in it.
    reset: (b, t) bool or None, True where a segment starts (the state restarts there: a = 0).
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    plan = make_plan(config or Config(), b, h, t, dk, dv, interpret=interpret, chunk_size=chunk_size,
                     y_dtype=out_dtype)
    tp, dkp, dvp = plan.t, plan.dk, plan.dv
    if reset is not None:  # exact here: every exponent of these kernels is a direct sum over its own span
        log_r, theta = reset_gates(log_r, theta, reset)

    args, h0re, h0im = pad_operands(q, k, v, log_r, theta, h0, tp, dkp, dvp)
    return unpad_outputs(*_core(plan, *args, h0re, h0im), t, dk, dv)


__all__ = ["Config", "gateloop_pallas_chunked", "supported"]
