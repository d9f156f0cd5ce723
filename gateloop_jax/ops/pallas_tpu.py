"""Multi-head GateLoop as Pallas TPU (Mosaic) kernels: the chunked form with exact per-channel decay, fwd and bwd.

Per head, H_n = diag(a_n) H_{n-1} + k_n^T v_n and y_n = Re(q_n H_n), with a = e^{log_r + i theta} per key channel.
With G, Phi the cumulative log|a| and phase, a query n and a key m <= n interact through the complex decay
Z_nm = e^{(G_n - G_m) + i (Phi_n - Phi_m)} (per key channel). Time is cut into chunks of C rows, chunks into
sub-blocks of c = 8 rows (one TPU sublane tile). Inside a chunk, with T_s = e^{(sum of log|a|) + i (sum of phases)}
over sub-block s:

- Key sub-block s < query sub-block i: Z_nm = rho_n * gamma_i(s) * sigma_m, with rho_n = e^{(..)} summed over n's own
  sub-block up to n (inclusive prefix), sigma_m summed over m's own sub-block after m (exclusive suffix) and
  gamma_i(s) = prod_{s < s' < i} T_s'. Every factor has modulus e^{sum of log|a| <= 0}, each exponent a direct
  sum of its own segment (a 0/1 triangular matrix product, or a running product of T's), never a difference of
  prefix sums: no overflow and no cancellation for any gate in [0, 1], |a| = 0 included. The scores are
  Re((q rho)(k sigma gamma)^T): two real (c x d) @ (d x C) matrix products per query sub-block (rotation identity).
- Diagonal sub-blocks (m <= n inside one sub-block): Z_nm is carried as a running complex product over the rows,
  Z_n,m = Z_{n-1},m * a_n (and Z_nn = 1): products of factors of modulus <= 1 (underflow to 0 is the right answer),
  c x c x d per sub-block on the VPU, no exp of a difference.
- Between chunks the state is carried in VMEM scratch: S_{j+1} = T_chunk S_j + sum_m (k_m sigma_m eps'_m)^T v_m with
  eps'_m the product of T over the sub-blocks after m's; outputs see the chunk-start state through
  rho_n eps_n, eps_n the product of T over the sub-blocks before n's.
Phases are wrapped to [-pi, pi) per step and only summed inside a sub-block (|sum| <= 8 pi); longer spans are
products of complex numbers, so cos / sin never see large angles.

Kernels (grid (b, h, chunks); b and h "parallel", chunks "arbitrary", i.e. sequential on one core):
  forward   chunk j: y (intra-chunk part + chunk-start state), the state update, the chunk-start state saved for the
            backward ((b, h, n, d_v, d_qk), re and im) and the final state at the last chunk.
  backward  walks the chunks in reverse (index map n-1-j) with E, the cotangent of the chunk's end state, in scratch
            (initialised from the final-state cotangent): dq, dk, dv, dlog_r, dtheta per chunk, dh0 at the end.
dlog_r and dtheta use that y depends on G only through q e^{G} and k e^{-G} (and the final state through e^{G_T}):
dL/dG_n = q_n Re(Dq_n) - k_n Re(Dk_n), dL/dPhi_n = -q_n Im(Dq_n) + k_n Im(Dk_n), with Dq, Dk the complex coefficients
of q and k in the loss; dlog_r is the reverse cumulative sum of dL/dG, done in the kernel (triangular product inside
the chunk plus a carried (1, d_qk) row of the later chunks' sums, seeded with the final-state term).

State layout: the kernels keep states transposed, (d_v, d_qk), so that the per-key-channel transition diag(T) is a
lane-broadcast multiply (d_qk on lanes) rather than a sublane one; the wrapper transposes h0 and the final state.

Shapes: the mode contract of ops/ ((b, t, h, d) arrays; h0 (b, h, d_qk, d_v) complex). Inputs are transposed to
(b, h, t, d) in XLA; d_qk and d_v are zero-padded to multiples of 128 (the TPU lane width: the last dim of a block
must be 128-divisible or the whole array) and t to a multiple of C with identity steps (a = 1, q = k = v = 0), which
change nothing. The padding costs up to 128 / d of the matmul and VMEM work (2x at d = 64, 8x at d = 16).

Cost per chunk and (batch, head), d = padded d_qk ~ d_v, in multiply-adds: matrix products ~ 9 C^2 d forward and
~ 16 C^2 d backward (6 C^2 d of each are the 0/1 segment sums of log|a| and phase), plus 4 C d^2 (forward) and
8 C d^2 (backward) against the state; the diagonal sub-blocks O(C c d) on the VPU; transcendentals ~ 9 C d. Saved
for the backward: the chunk-start states, (t / C) d_qk d_v complex per head, besides the inputs.

The export check: tests/pallas_tpu_test.py exports both kernels for platform "tpu" (Pallas -> Mosaic lowering on a
machine without TPU). Mosaic's layout passes run only in the TPU compiler, so they are unchecked here: untimed and
uncompiled on real hardware.

Precision: float32 throughout; matrix products with preferred_element_type=float32 and Precision.HIGHEST (float32
operands, also for the 0/1 triangular products that form segment sums). Written for the TPU lowering (2-D arrays,
static aligned slices of values, no cumsum / gather / dynamic value slicing in the kernels); on other backends it runs
in interpret mode, which the tests use.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from gateloop_jax.ops import kernel_util as ku
from gateloop_jax.ops.common import cmul, polar_pair, reset_gates

LANES = 128  # TPU vector lane width: the last dim of a VMEM block
SUBLANES = 8  # TPU sublane count: row offsets of value slices stay multiples of it
# log|a| is clamped here (|a| = e^{-1e30} is 0 in float32 all the same): the segment sums are 0/1 matrix products, and
# a log|a| of -inf would give 0 * -inf = NaN in them. Sums of up to C of these stay far from the float32 limit.
LOG_MAGNITUDE_FLOOR = -1e30


class Config(NamedTuple):
    """Static kernel parameters (hashable: one compiled kernel per config and shape).

    Defaults are untimed (no TPU was available when this was written): C = 64 keeps the (C, C) score and mask tiles
    and the per-chunk saved states moderate ((t / 64) d_qk d_v per head, half of what the GPU kernel's C = 16 saves);
    c = 8 is the smallest sub-block a value slice can start at without sublane shifts, and the diagonal sub-blocks
    cost C c d per chunk on the VPU, so smaller is cheaper.
    """

    chunk: int = 64  # C: rows per grid step; a multiple of sub_block (chunk_size arguments are rounded up to one)
    sub_block: int = 8  # c: a multiple of SUBLANES dividing chunk
    lane_multiple: int = LANES  # d_qk and d_v are padded to a multiple of this


def supported(q_shape, v_shape, platform: str) -> bool:
    """Multi-head shapes (rank 4, any d_qk / d_v) on TPU, or anywhere in interpret mode (CPU, for tests)."""
    return len(q_shape) == 4 and len(v_shape) == 4 and platform in ("tpu", "cpu")


class _Plan(NamedTuple):
    chunk: int
    sub: int
    interpret: bool


# --------------------------------------------------------------------------------------------------------------------
# In-kernel helpers: 2-D float32 tiles, rows = time inside the chunk, lanes = channels.
# --------------------------------------------------------------------------------------------------------------------

_HIGHEST = jax.lax.Precision.HIGHEST
# Every product at float32 accuracy: Mosaic's MXU passes at HIGHEST (the Triton kernels pick theirs per Config).
_dot = functools.partial(ku.dot, precision=_HIGHEST)  # a @ b
_dot_nt = functools.partial(ku.dot_nt, precision=_HIGHEST)  # a @ b.T
_dot_tn = functools.partial(ku.dot_tn, precision=_HIGHEST)  # a.T @ b
_iota, _wrap, _put_row = ku.iota, ku.wrap, ku.put_row


def _sub_index(rows, c, nb):
    """rows // c for int rows in [0, nb c), as a sum of nb - 1 comparisons: plain VPU compares and adds, where `//`
    lowers through a generation-specific query that cross-platform export (no TPU attached) cannot make."""
    out = jnp.zeros_like(rows)
    for s in range(1, nb):
        out = out + (rows >= s * c).astype(jnp.int32)
    return out


def _select(mask, pair, other):
    """Complex select on (re, im) pairs; other is a pair or a (re, im) of scalars."""
    return jnp.where(mask, pair[0], other[0]), jnp.where(mask, pair[1], other[1])


class _Gates(NamedTuple):
    """A chunk's transition factors (module docstring), all (re, im) pairs of (C, d) tiles unless noted."""

    rho: tuple  # e^{..} over n's sub-block up to n (inclusive)
    sigma: tuple  # e^{..} over m's sub-block after m (exclusive)
    eps: tuple  # prod of T over the sub-blocks before n's
    after: tuple  # prod of T over the sub-blocks after m's
    blocks: tuple  # T_s per sub-block, (1, d) pairs
    total: tuple  # T_chunk, a (1, d) pair
    sub_idx: jax.Array  # (C, d) int: the sub-block of each row


def _chunk_gates(lr, th, c):
    """lr, th: (C, d) log|a| and wrapped phase of one chunk. Segment sums inside sub-blocks are 0/1 matrix products
    (direct sums of their own segment); everything spanning sub-blocks is a running product of the T_s."""
    size, d = lr.shape
    nb = size // c
    r, m = _iota((size, size), 0), _iota((size, size), 1)
    same = _sub_index(r, c, nb) == _sub_index(m, c, nb)
    prefix = (same & (m <= r)).astype(jnp.float32)
    suffix = (same & (m > r)).astype(jnp.float32)
    whole = same.astype(jnp.float32)
    rho = polar_pair(_dot(prefix, lr), _dot(prefix, th))  # |phase| <= c pi
    sigma = polar_pair(_dot(suffix, lr), _dot(suffix, th))
    tot_lr, tot_th = _dot(whole, lr), _dot(whole, th)  # each row: its sub-block's totals
    blocks = tuple(polar_pair(tot_lr[s * c:s * c + 1], tot_th[s * c:s * c + 1]) for s in range(nb))  # aligned rows
    sub_idx = _sub_index(_iota((size, d), 0), c, nb)
    ones = (jnp.ones((size, d), jnp.float32), jnp.zeros((size, d), jnp.float32))
    eps, after = ones, ones
    total = blocks[0]
    for s in range(nb - 1):
        eps = _select(sub_idx > s, cmul(*eps, *blocks[s]), eps)
        after = _select(sub_idx < nb - 1 - s, cmul(*after, *blocks[nb - 1 - s]), after)
        total = cmul(*total, *blocks[s + 1])
    return _Gates(rho, sigma, eps, after, blocks, total, sub_idx)


def _diagonal_rows(lr_ref, th_ref, r0, c, d, body, carry):
    """Walk rows n of the diagonal sub-block starting at row r0 with the exact complex decay w[m] = Z_nm (m <= n,
    w[n] = 1, rows m > n zero), carried multiplicatively: Z_nm = Z_{n-1,m} a_n. Calls carry = body(n, carry, w)
    for each row (a static loop: c = 8 rows, and ref rows at static offsets are plain loads)."""
    m_idx = _iota((c, d), 0)
    w = (jnp.zeros((c, d), jnp.float32), jnp.zeros((c, d), jnp.float32))
    for n in range(c):
        a_n = polar_pair(lr_ref[r0 + n:r0 + n + 1, :], _wrap(th_ref[r0 + n:r0 + n + 1, :]))
        w = cmul(*_select(m_idx == n - 1, (1.0, 0.0), w), *a_n)  # rows >= n stay 0; row n-1 restarts at a_n
        carry = body(n, carry, _select(m_idx == n, (1.0, 0.0), w))
    return carry


# --------------------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------------------


def _forward_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, h0r_ref, h0i_ref, y_ref, sr_out, si_out, fr_ref, fi_ref,
                    sr_acc, si_acc, *, c):
    """One chunk of one (batch, head): y, the chunk-start state (saved), the state update, the final state."""
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _():
        sr_acc[...] = h0r_ref[...]
        si_acc[...] = h0i_ref[...]

    state = (sr_acc[...], si_acc[...])  # (d_v, d_qk): transposed
    sr_out[...], si_out[...] = state
    q, k, v, lr = q_ref[...], k_ref[...], v_ref[...], lr_ref[...]
    size, d = q.shape
    dv = v.shape[1]
    g = _chunk_gates(lr, _wrap(th_ref[...]), c)
    qr = (q * g.rho[0], q * g.rho[1])
    q0 = cmul(*qr, *g.eps)
    y_state = _dot_nt(q0[0], state[0]) - _dot_nt(q0[1], state[1])  # Re(q rho eps S)
    ks = (k * g.sigma[0], k * g.sigma[1])
    kap = _select(g.sub_idx == 0, ks, (0.0, 0.0))  # keys of sub-blocks < i, times sigma gamma_i: for i = 1

    for i in range(size // c):
        rows = slice(i * c, (i + 1) * c)
        vv, kk = v[rows], k[rows]

        def row_out(n, acc, w, r0=i * c, vv=vv, kk=kk):
            q_n = q_ref[r0 + n:r0 + n + 1, :]
            a_col = jnp.sum(q_n * w[0] * kk, axis=1, keepdims=True)  # A[n, m], m in the sub-block
            return _put_row(acc, n, jnp.sum(a_col * vv, axis=0, keepdims=True))

        yi = _diagonal_rows(lr_ref, th_ref, i * c, c, d, row_out, jnp.zeros((c, dv), jnp.float32))
        if i:
            scores = _dot_nt(qr[0][rows], kap[0]) - _dot_nt(qr[1][rows], kap[1])  # (c, C), zero for keys >= i c
            yi = yi + _dot(scores, v)
            kap = _select(g.sub_idx < i, cmul(*kap, *g.blocks[i]), _select(g.sub_idx == i, ks, (0.0, 0.0)))
        y_ref[rows, :] = yi + y_state[rows]

    # S' = T_chunk S + sum_m (k_m sigma_m after_m)^T v_m, in the transposed layout.
    k_end = cmul(*ks, *g.after)
    new = cmul(*state, *g.total)
    new = (new[0] + _dot_tn(v, k_end[0]), new[1] + _dot_tn(v, k_end[1]))
    sr_acc[...], si_acc[...] = new

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        fr_ref[...], fi_ref[...] = new


def _backward_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, dy_ref, sr_ref, si_ref, gfr_ref, gfi_ref, endg_ref,
                     endp_ref, dq_ref, dk_ref, dv_ref, dlr_ref, dth_ref, dh0r_ref, dh0i_ref, er_acc, ei_acc, cg_acc,
                     cp_acc, *, c):
    """One chunk, chunks in reverse. E (er_acc, ei_acc; (d_v, d_qk) transposed) is the cotangent of the chunk's end
    state, in the convention L = ... + Re(sum conj(E) H); cg, cp hold the sums of dL/dG, dL/dPhi over later rows."""
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _():
        er_acc[...], ei_acc[...] = gfr_ref[...], gfi_ref[...]
        cg_acc[...], cp_acc[...] = endg_ref[...], endp_ref[...]

    q, k, v, dy, lr = q_ref[...], k_ref[...], v_ref[...], dy_ref[...], lr_ref[...]
    state = (sr_ref[...], si_ref[...])
    e_end = (er_acc[...], ei_acc[...])
    size, d = q.shape
    dv_w = v.shape[1]
    g = _chunk_gates(lr, _wrap(th_ref[...]), c)
    qr = (q * g.rho[0], q * g.rho[1])
    q0 = cmul(*qr, *g.eps)
    ks = (k * g.sigma[0], k * g.sigma[1])
    k_end = cmul(*ks, *g.after)
    zero = (0.0, 0.0)

    # The chunk-start state: Dq += rho eps (dy S^T). The end state: Dk += sigma after (v conj(E)^T), dv += Re(k_end E).
    dq_state = cmul(*g.rho, *g.eps)
    dq_state = cmul(*dq_state, _dot(dy, state[0]), _dot(dy, state[1]))
    dk_end = cmul(*g.sigma, *g.after)
    dk_end = cmul(*dk_end, _dot(v, e_end[0]), -_dot(v, e_end[1]))
    dv_acc = _dot_nt(k_end[0], e_end[0]) + _dot_nt(k_end[1], e_end[1])

    gam = _select(g.sub_idx == 0, (1.0, 0.0), zero)  # gamma_i on the rows of sub-blocks < i (0 elsewhere), i = 1
    dk_off = (jnp.zeros((size, d), jnp.float32), jnp.zeros((size, d), jnp.float32))
    dq_parts, dk_parts, dv_parts = [], [], []
    for i in range(size // c):
        rows = slice(i * c, (i + 1) * c)
        vv, kk = v[rows], k[rows]

        def row_grad(n, acc, w, r0=i * c, vv=vv, kk=kk):
            dq_re, dq_im, dk_re, dk_im, dvd = acc
            q_n, dy_n = q_ref[r0 + n:r0 + n + 1, :], dy_ref[r0 + n:r0 + n + 1, :]
            w_col = jnp.sum(vv * dy_n, axis=1, keepdims=True)  # W[n, m] = dy_n . v_m
            dq_re = _put_row(dq_re, n, jnp.sum(w[0] * kk * w_col, axis=0, keepdims=True))
            dq_im = _put_row(dq_im, n, jnp.sum(w[1] * kk * w_col, axis=0, keepdims=True))
            qw = q_n * w_col
            a_col = jnp.sum(q_n * w[0] * kk, axis=1, keepdims=True)  # A[n, m]
            return dq_re, dq_im, dk_re + w[0] * qw, dk_im + w[1] * qw, dvd + a_col * dy_n

        zc = jnp.zeros((c, d), jnp.float32)
        dq_re, dq_im, dk_re, dk_im, dvd = _diagonal_rows(lr_ref, th_ref, i * c, c, d, row_grad,
                                                         (zc, zc, zc, zc, jnp.zeros((c, dv_w), jnp.float32)))
        dq_i = (dq_re + dq_state[0][rows], dq_im + dq_state[1][rows])
        if i:
            kap = cmul(*ks, *gam)
            qr_i = (qr[0][rows], qr[1][rows])
            wmat = _dot_nt(dy[rows], v)  # (c, C): W[n, m]; kap is zero for keys >= i c
            off = cmul(g.rho[0][rows], g.rho[1][rows], _dot(wmat, kap[0]), _dot(wmat, kap[1]))
            dq_i = (dq_i[0] + off[0], dq_i[1] + off[1])
            u = cmul(*gam, _dot_tn(wmat, qr_i[0]), _dot_tn(wmat, qr_i[1]))  # gamma (W^T q rho); sigma applied below
            dk_off = (dk_off[0] + u[0], dk_off[1] + u[1])
            scores_t = _dot_nt(kap[0], qr_i[0]) - _dot_nt(kap[1], qr_i[1])  # A^T (C, c)
            dv_acc = dv_acc + _dot(scores_t, dy[rows])
            gam = _select(g.sub_idx < i, cmul(*gam, *g.blocks[i]), _select(g.sub_idx == i, (1.0, 0.0), zero))
        dq_parts.append(dq_i)
        dk_parts.append((dk_re, dk_im))
        dv_parts.append(dvd)

    cat = lambda parts, part: jnp.concatenate([p[part] for p in parts], axis=0)  # noqa: E731
    dq_c = (cat(dq_parts, 0), cat(dq_parts, 1))
    dk_off = cmul(*g.sigma, *dk_off)
    dk_c = (cat(dk_parts, 0) + dk_off[0] + dk_end[0], cat(dk_parts, 1) + dk_off[1] + dk_end[1])
    dq_ref[...] = dq_c[0]
    dk_ref[...] = dk_c[0]
    dv_ref[...] = dv_acc + jnp.concatenate(dv_parts, axis=0)

    # dlog_r, dtheta: reverse cumulative sums of dL/dG, dL/dPhi (inside the chunk a triangular product, direct sums).
    dg = q * dq_c[0] - k * dk_c[0]
    dp = k * dk_c[1] - q * dq_c[1]
    r, m = _iota((size, size), 0), _iota((size, size), 1)
    upper = (m >= r).astype(jnp.float32)
    dlr_ref[...] = _dot(upper, dg) + cg_acc[...]
    dth_ref[...] = _dot(upper, dp) + cp_acc[...]
    cg_acc[...] = cg_acc[...] + jnp.sum(dg, axis=0, keepdims=True)
    cp_acc[...] = cp_acc[...] + jnp.sum(dp, axis=0, keepdims=True)

    # The cotangent of the chunk's start state: conj(T_chunk) E + sum_n dy_n^T conj(q_n rho_n eps_n) (transposed).
    e_start = cmul(*e_end, g.total[0], -g.total[1])
    e_start = (e_start[0] + _dot_tn(dy, q0[0]), e_start[1] - _dot_tn(dy, q0[1]))
    er_acc[...], ei_acc[...] = e_start

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        dh0r_ref[...], dh0i_ref[...] = e_start


# --------------------------------------------------------------------------------------------------------------------
# pallas_call wrappers on padded (b, h, t, d) arrays
# --------------------------------------------------------------------------------------------------------------------


def _f32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def _specs(plan, b, h, n, reverse):
    """BlockSpec factories: time blocks of one chunk (forward or reversed order), per-chunk states, per-(b, h)."""
    chunk_of = (lambda j: n - 1 - j) if reverse else (lambda j: j)

    def rows(width):
        return pl.BlockSpec((None, None, plan.chunk, width), lambda bi, hi, j: (bi, hi, chunk_of(j), 0))

    def per_chunk(r, cols):
        return pl.BlockSpec((None, None, None, r, cols), lambda bi, hi, j: (bi, hi, chunk_of(j), 0, 0))

    def per_head(r, cols):
        return pl.BlockSpec((None, None, r, cols), lambda bi, hi, j: (bi, hi, 0, 0))

    return rows, per_chunk, per_head


def _call(plan, kernel, grid, in_specs, out_specs, out_shape, scratch, *args, name):
    params = None
    if not plan.interpret:  # b, h independent (megacore may split them); chunks carry the state in scratch
        params = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                          scratch_shapes=scratch, compiler_params=params, interpret=plan.interpret, name=name)(*args)


def _forward(plan, q, k, v, lr, th, h0r, h0i):
    """Padded (b, h, t, d) inputs, h0 transposed (b, h, dv, dk). Returns y, final (re, im), chunk-start states."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    n = t // plan.chunk
    rows, per_chunk, per_head = _specs(plan, b, h, n, reverse=False)
    in_specs = [rows(dk), rows(dk), rows(dv), rows(dk), rows(dk), per_head(dv, dk), per_head(dv, dk)]
    out_specs = [rows(dv), per_chunk(dv, dk), per_chunk(dv, dk), per_head(dv, dk), per_head(dv, dk)]
    out_shape = [_f32(b, h, t, dv), _f32(b, h, n, dv, dk), _f32(b, h, n, dv, dk), _f32(b, h, dv, dk),
                 _f32(b, h, dv, dk)]
    scratch = [pltpu.VMEM((dv, dk), jnp.float32)] * 2
    kernel = functools.partial(_forward_kernel, c=plan.sub)
    y, s_re, s_im, f_re, f_im = _call(plan, kernel, (b, h, n), in_specs, out_specs, out_shape, scratch,
                                      q, k, v, lr, th, h0r, h0i, name="gateloop_tpu_fwd")
    return y, f_re, f_im, (s_re, s_im)


def _backward(plan, q, k, v, lr, th, states, final, dy, gf_re, gf_im):
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    n = t // plan.chunk
    s_re, s_im = states
    f_re, f_im = final
    # The final state scales with e^{G_T + i Phi_T}: its cotangent adds Re<gf, H_T>, Re<gf, i H_T> to every
    # position's dlog_r, dtheta (the seed of the reverse cumulative sum). (b, h, 1, dk): lanes = d_qk.
    end_g = jnp.sum(gf_re * f_re + gf_im * f_im, axis=2, keepdims=True)
    end_p = jnp.sum(gf_im * f_re - gf_re * f_im, axis=2, keepdims=True)
    rows, per_chunk, per_head = _specs(plan, b, h, n, reverse=True)
    in_specs = [rows(dk), rows(dk), rows(dv), rows(dk), rows(dk), rows(dv), per_chunk(dv, dk), per_chunk(dv, dk),
                per_head(dv, dk), per_head(dv, dk), per_head(1, dk), per_head(1, dk)]
    out_specs = [rows(dk), rows(dk), rows(dv), rows(dk), rows(dk), per_head(dv, dk), per_head(dv, dk)]
    out_shape = [_f32(b, h, t, dk), _f32(b, h, t, dk), _f32(b, h, t, dv), _f32(b, h, t, dk), _f32(b, h, t, dk),
                 _f32(b, h, dv, dk), _f32(b, h, dv, dk)]
    scratch = [pltpu.VMEM((dv, dk), jnp.float32)] * 2 + [pltpu.VMEM((1, dk), jnp.float32)] * 2
    kernel = functools.partial(_backward_kernel, c=plan.sub)
    return _call(plan, kernel, (b, h, n), in_specs, out_specs, out_shape, scratch,
                 q, k, v, lr, th, dy, s_re, s_im, gf_re, gf_im, end_g, end_p, name="gateloop_tpu_bwd")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(plan, q, k, v, lr, th, h0r, h0i):
    y, f_re, f_im, _ = _forward(plan, q, k, v, lr, th, h0r, h0i)
    return y, f_re, f_im


def _core_fwd(plan, q, k, v, lr, th, h0r, h0i):
    y, f_re, f_im, states = _forward(plan, q, k, v, lr, th, h0r, h0i)
    return (y, f_re, f_im), (q, k, v, lr, th, states, (f_re, f_im))


def _core_bwd(plan, res, cts):
    q, k, v, lr, th, states, final = res
    dy, gf_re, gf_im = (x.astype(jnp.float32) for x in cts)
    return tuple(_backward(plan, q, k, v, lr, th, states, final, dy, gf_re, gf_im))


_core.defvjp(_core_fwd, _core_bwd)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def make_plan(cfg: Config, t: int, *, interpret: bool, chunk_size: int | None = None) -> _Plan:
    """chunk = chunk_size (default cfg.chunk) capped at the length, rounded up to a multiple of the sub-block."""
    if cfg.sub_block % SUBLANES or (chunk_size is not None and chunk_size < 1):
        raise ValueError(f"gateloop_pallas_tpu: bad sub_block {cfg.sub_block} or chunk_size {chunk_size}")
    chunk = _round_up(min(chunk_size or cfg.chunk, _round_up(t, cfg.sub_block)), cfg.sub_block)
    return _Plan(chunk, cfg.sub_block, bool(interpret))


def gateloop_pallas_tpu(q, k, v, log_r, theta, h0, *, chunk_size: int | None = None, interpret: bool | None = None,
                        config: Config | None = None, reset=None):
    """Mode contract: q, k, log_r, theta (b, t, h, dk), v (b, t, h, dv) real; h0 (b, h, dk, dv) complex or None.

    Returns (y (b, t, h, dv) float32, final state (b, h, dk, dv) complex64); differentiable in every argument
    (custom_vjp). chunk_size (default Config.chunk) is rounded up to a multiple of Config.sub_block. interpret=None
    runs interpret mode unless the default backend is TPU. reset: (b, t) bool or None, True where a segment starts
    (the state restarts there: a = 0).
    """
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    cfg = config or Config()
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    plan = make_plan(cfg, t, interpret=interpret, chunk_size=chunk_size)
    tp = _round_up(t, plan.chunk)
    dkp, dvp = _round_up(dk, cfg.lane_multiple), _round_up(dv, cfg.lane_multiple)

    def prep(x, width):  # (b, t, h, d) -> (b, h, tp, width), float32, zero padded (identity steps)
        x = jnp.transpose(x.astype(jnp.float32), (0, 2, 1, 3))
        return jnp.pad(x, ((0, 0), (0, 0), (0, tp - t), (0, width - x.shape[-1])))

    if reset is not None:  # exact here: every exponent of these kernels is a direct sum over its own span
        log_r, theta = reset_gates(log_r, theta, reset)
    log_r = jnp.maximum(log_r.astype(jnp.float32), LOG_MAGNITUDE_FLOOR)
    args = [prep(x, dkp) for x in (q, k)] + [prep(v, dvp)] + [prep(x, dkp) for x in (log_r, theta)]
    if h0 is None:
        h0r = h0i = jnp.zeros((b, h, dvp, dkp), jnp.float32)
    else:
        pad = ((0, 0), (0, 0), (0, dvp - dv), (0, dkp - dk))
        h0t = jnp.swapaxes(h0, -1, -2)
        h0r = jnp.pad(jnp.real(h0t).astype(jnp.float32), pad)
        h0i = jnp.pad(jnp.imag(h0t).astype(jnp.float32), pad)
    y, f_re, f_im = _core(plan, *args, h0r, h0i)
    final = jax.lax.complex(jnp.swapaxes(f_re[:, :, :dv, :dk], -1, -2), jnp.swapaxes(f_im[:, :, :dv, :dk], -1, -2))
    return jnp.transpose(y[:, :, :t, :dv], (0, 2, 1, 3)), final


__all__ = ["Config", "gateloop_pallas_tpu", "supported"]
