"""Multi-head GateLoop as a Pallas Mosaic GPU kernel (Hopper: wgmma, TMA), mode="mosaic_gpu".

Per head, H_n = diag(a_n) H_{n-1} + k_n^T v_n and y_n = Re(q_n H_n), a = e^{log_r + i theta} per key channel.
Time is cut into chunks of C = 64 rows (one wgmma M tile). One program per (batch x head, d_qk tile of 64 channels,
d_v tile of 64 values) walks the chunks in order with the state tile (64 x 64, real and imaginary parts) in float32
registers. Per chunk, with G, Phi the cumulative log|a| and phase from the chunk start:

- Intra-chunk scores S[n, m] = sum_d q_nd k_md e^{G_nd - G_md} cos(Phi_nd - Phi_md), m <= n, by diagonals: for each
  offset delta = n - m the decay of every row is extended by one step, R <- R + log_r[n - delta + 1] (a running sum
  over the pair's own segment, never a difference of prefix sums, so no cancellation and no overflow: every exponent
  is <= 0 and any gate in [0, 1] is exact, |a| = 0 included), the phase likewise (wrapped each step), and the keys
  are read shifted by delta rows from shared memory (64 zero rows above the chunk make rows n < delta vanish).
  That is C - 1 elementwise passes over a (C, 64) tile on the CUDA cores; y_intra = S V on the tensor cores.
- Inter-chunk: y += Re(q e^{G + i Phi} H_start) = [q e^G cos Phi, -q e^G sin Phi] [Re H; Im H] (the rotation
  identity: real operands of key width 2 x 64), and H_end = T H_start + [Re; Im](K_end^T V) with K_end = k e^{(G_C -
  G_m) + i (Phi_C - Phi_m)} (every factor e^{<= 0}) and T the chunk's total transition.
- Tensor-core products take bfloat16 operands split in two (x = hi + lo, both bf16; hi*hi + hi*lo + lo*hi with float32
  accumulation): about 16 significant bits per operand, float32-level results (relative error ~1e-5) at three wgmmas
  per product. The chunk-relative prefix / suffix sums of the gates (G, Phi, G_C - G_m, ...) are one XLA pass.
- The d_qk tiles of one head each add their share of y; their partial outputs are summed in XLA.

Backward (custom VJP): one kernel walking the chunks in reverse with the state's cotangent E in registers (its
docstring has the terms): the query-row diagonals give dq and Im(Dq), the key-row diagonals (queries read shifted up)
dk, Im(Dk) and the transposed scores for dv; the forward saves every chunk's start state (t / 64 x d_qk x d_v per head)
for the inter-chunk terms. dlog|a| and darg a follow in XLA from those coefficients (y depends on the gates only
through q e^{G + i Phi}, k e^{-G - i Phi} and the chunk's end factors), each term summed over the positions whose
decay it crosses, so none is a difference of large numbers: float32-level accuracy for |a| ~ 1e-6 too.

Untuned: one warpgroup per program, no TMA double buffering, every product three bf16 wgmmas, the diagonals on the
CUDA cores (C - 1 elementwise passes per chunk and direction).

Shapes: the mode contract of ops/ (legend b t h k v): q, k, log_r, theta (b, t, h, k), v (b, t, h, v), h0
(b, h, k, v) complex. d_qk and d_v are padded to multiples of 64 and t to a multiple of 64 with identity steps
(a = 1, q = k = v = 0), which change nothing.

Needs jax >= 0.11 (the Pallas Mosaic GPU API used here and its GPU interpret mode, which runs the kernel on CPU for
tests); elsewhere `unavailable_reason()` says why and mode="auto" does not pick it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gateloop_jax.ops.common import reverse_exclusive_cumsum

try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _IMPORT_ERROR = None if hasattr(plgpu, "InterpretGPUParams") else "jax.experimental.pallas.mosaic_gpu lacks "
    if _IMPORT_ERROR:
        _IMPORT_ERROR += "InterpretGPUParams"
except ImportError as e:  # pragma: no cover - depends on the installed jax
    pl = plgpu = None
    _IMPORT_ERROR = f"jax.experimental.pallas.mosaic_gpu does not import ({e})"

CHUNK = 64  # rows per chunk: the wgmma M tile
TILE = 64  # d_qk and d_v tile: 128-byte swizzled bf16 rows
MIN_JAX = (0, 11)
_TWO_PI = 2.0 * math.pi


def unavailable_reason() -> str | None:
    """None when this jax can build the kernel (jax >= 0.11 with Pallas Mosaic GPU), else why not."""
    version = tuple(int(x) for x in jax.__version__.split(".")[:2])
    if version < MIN_JAX:
        return f"mode='mosaic_gpu' needs jax >= 0.11 (Pallas Mosaic GPU and its interpret mode), found {jax.__version__}"
    return _IMPORT_ERROR


def serves_default_device() -> bool:
    """True on a Hopper GPU (compute capability 9.x: wgmma) with a jax that has Pallas Mosaic GPU."""
    if unavailable_reason() is not None or jax.default_backend() != "gpu":
        return False
    capability = str(getattr(jax.devices()[0], "compute_capability", ""))
    return capability.split(".")[0] == "9"


def supported(q_shape, v_shape, platform: str) -> bool:
    """Multi-head shapes on a GPU (Hopper) or on CPU (interpret mode), when this jax has Mosaic GPU."""
    return len(q_shape) == 4 and platform in ("gpu", "cuda", "cpu") and unavailable_reason() is None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _wrap(x):
    """Phase mapped to [-pi, pi] (e^{i x} unchanged): sums of wrapped phases stay small, so cos/sin stay accurate."""
    return x - _TWO_PI * jnp.round(x * (1.0 / _TWO_PI))


# --------------------------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------------------------


def _split(x):
    """float32 -> (hi, lo) bfloat16 with hi + lo = x to ~16 significant bits."""
    hi = x.astype(jnp.bfloat16)
    return hi, (x - hi.astype(jnp.float32)).astype(jnp.bfloat16)


class _Ctx:
    """Per-program helpers shared by the forward and backward kernels: WGMMA-layout tiles, TMA fetches, bf16-split
    products."""

    def __init__(self, bars, h):
        self.wg = plgpu.Layout.WGMMA
        self.bars = bars
        pid = jax.lax.axis_index("bh")
        self.bi, self.hi = pid // h, pid % h
        self.kt, self.vt = jax.lax.axis_index("dk"), jax.lax.axis_index("dv")
        self.d0, self.e0 = self.kt * TILE, self.vt * TILE
        self.rows = plgpu.broadcasted_iota(jnp.int32, (CHUNK, TILE), 0, layout=self.wg)
        self.cols = plgpu.broadcasted_iota(jnp.int32, (CHUNK, TILE), 1, layout=self.wg)
        self.zeros = plgpu.layout_cast(jnp.zeros((CHUNK, TILE), jnp.float32), self.wg)

    def load(self, ref):
        return plgpu.load(ref, layout=self.wg)

    def fetch(self, src, dst, slot=0):
        # The warpgroup barrier in commit_smem: every thread is done reading dst (the staging buffers are reused),
        # and its plain SMEM stores (the zero rows) are visible to the other threads and to the TMA unit.
        plgpu.commit_smem()
        plgpu.copy_gmem_to_smem(src, dst, self.bars.at[slot])
        plgpu.barrier_wait(self.bars.at[slot])

    def get(self, src, staging, slot=0):
        """A (64, 64) float32 tile of GMEM, through SMEM, into registers."""
        self.fetch(src, staging, slot)
        return self.load(staging)

    def put(self, x, staging, dst):
        """A (64, 64) float32 register tile to GMEM through SMEM (waits: the staging buffer is reused at once)."""
        plgpu.commit_smem()  # every thread is done reading the staging buffer
        staging[...] = x
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(staging, dst)
        plgpu.wait_smem_to_gmem(0)

    def seq(self, ref, t0, col0):
        """The (64 rows, 64 columns) window of a (b, t, h, d) array at this program's batch row and head."""
        return ref.at[self.bi, pl.ds(t0, CHUNK), self.hi, pl.ds(col0, TILE)]

    def state(self, ref, *lead):
        """This program's (d_qk tile, d_v tile) of a (b, h, ..., k, v) state array."""
        return ref.at[(self.bi, self.hi, *lead, pl.ds(self.d0, TILE), pl.ds(self.e0, TILE))]

    def diagonal(self, mat, delta):
        """mat[n, n - delta] (delta may be negative) as a (64,) column, 0 where that column does not exist."""
        return jnp.sum(jnp.where(self.cols == self.rows - delta, mat, 0.0), axis=1)

    def bcast(self, col):
        return jax.lax.broadcast_in_dim(col, (CHUNK, TILE), [0])


def _store_split(pair, x):
    x_hi, x_lo = _split(x)
    pair[0][...] = x_hi
    pair[1][...] = x_lo


def _mm(a_pair, b_pair):
    """a @ b for bf16-split operands in SMEM (refs, possibly transposed): hi hi + hi lo + lo hi, float32
    accumulation. Waits for the products, so the operands may be rewritten right after."""
    plgpu.commit_smem()

    def body(acc):
        plgpu.wgmma(acc, a_pair[0], b_pair[0])
        plgpu.wgmma(acc, a_pair[0], b_pair[1])
        plgpu.wgmma(acc, a_pair[1], b_pair[0])
        plgpu.wgmma_wait(0)
        return acc[...]

    return pl.run_scoped(body, plgpu.ACC((CHUNK, TILE), jnp.float32))


def _t(pair):
    return pair[0].T, pair[1].T


def _forward_kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, gp_ref, pp_ref, gs_ref, ps_ref, tr_ref, ti_ref, h0re_ref,
                    h0im_ref, y_ref, fre_ref, fim_ref, sre_ref, sim_ref, kpad, lrpad, thpad, g1, g2, g3, a_hi, a_lo,
                    b_hi, b_lo, s_bufs, bars, *, h, n_chunks):
    c = CHUNK
    x = _Ctx(bars, h)
    a_pair, b_pair = (a_hi, a_lo), (b_hi, b_lo)
    re_pair, im_pair = (s_bufs.at[0], s_bufs.at[1]), (s_bufs.at[2], s_bufs.at[3])
    # The 64 rows above each chunk stay zero (keys) or finite (gates): the shifted reads of the diagonals land there.
    for buf in (kpad, lrpad, thpad):
        buf[pl.ds(0, c)] = x.zeros
    s_re0, s_im0 = x.get(x.state(h0re_ref), g1), x.get(x.state(h0im_ref), g2)

    def chunk(j, state):
        s_re, s_im = state
        t0 = j * c
        # The chunk's start state: saved for the backward, and the right operand of the inter-chunk product.
        x.put(s_re, g1, x.state(sre_ref, j))
        x.put(s_im, g2, x.state(sim_ref, j))
        _store_split(re_pair, s_re)
        _store_split(im_pair, s_im)
        x.fetch(x.seq(k_ref, t0, x.d0), kpad.at[pl.ds(c, c)], 0)
        x.fetch(x.seq(lr_ref, t0, x.d0), lrpad.at[pl.ds(c, c)], 1)
        x.fetch(x.seq(th_ref, t0, x.d0), thpad.at[pl.ds(c, c)], 2)
        _store_split(b_pair, x.get(x.seq(v_ref, t0, x.e0), g2, 4))
        q = x.get(x.seq(q_ref, t0, x.d0), g1, 3)
        k = x.load(kpad.at[pl.ds(c, c)])

        # Intra-chunk scores by diagonals (module docstring): row n of step delta pairs query n with key n - delta.
        scores = jnp.where(x.rows == x.cols, x.bcast(jnp.sum(q * k, axis=1)), 0.0)

        def offset(delta, carry):
            r, p, scores = carry
            r = r + x.load(lrpad.at[pl.ds(c + 1 - delta, c)])
            p = _wrap(p + x.load(thpad.at[pl.ds(c + 1 - delta, c)]))
            k_s = x.load(kpad.at[pl.ds(c - delta, c)])
            w = jnp.sum(q * k_s * jnp.exp(r) * jnp.cos(p), axis=1)
            return r, p, jnp.where(x.cols == x.rows - delta, x.bcast(w), scores)

        _, _, scores = jax.lax.fori_loop(1, c, offset, (x.zeros, x.zeros, scores))
        _store_split(a_pair, scores)
        y = _mm(a_pair, b_pair)

        # Inter-chunk: [q e^G cos Phi, -q e^G sin Phi] [Re H; Im H].
        qg = q * jnp.exp(x.get(x.seq(gp_ref, t0, x.d0), g2, 4))
        phase = x.get(x.seq(pp_ref, t0, x.d0), g3, 5)
        _store_split(a_pair, qg * jnp.cos(phase))
        y = y + _mm(a_pair, re_pair)
        _store_split(a_pair, -qg * jnp.sin(phase))
        y = y + _mm(a_pair, im_pair)
        x.put(y, g1, y_ref.at[(x.kt, x.bi, pl.ds(t0, c), x.hi, pl.ds(x.e0, TILE))])

        # The chunk's increment to the state, relative to its end, and the carry H_end = T H_start + increment.
        kg = k * jnp.exp(x.get(x.seq(gs_ref, t0, x.d0), g2, 4))
        phase = x.get(x.seq(ps_ref, t0, x.d0), g3, 5)
        _store_split(a_pair, kg * jnp.cos(phase))
        inc_re = _mm(_t(a_pair), b_pair)
        _store_split(a_pair, kg * jnp.sin(phase))
        inc_im = _mm(_t(a_pair), b_pair)
        tr = x.get(tr_ref.at[x.bi, x.hi, j, pl.ds(x.d0, TILE), pl.ds(0, TILE)], g2, 4)
        ti = x.get(ti_ref.at[x.bi, x.hi, j, pl.ds(x.d0, TILE), pl.ds(0, TILE)], g3, 5)
        return tr * s_re - ti * s_im + inc_re, tr * s_im + ti * s_re + inc_im

    s_re, s_im = jax.lax.fori_loop(0, n_chunks, chunk, (s_re0, s_im0))
    x.put(s_re, g2, x.state(fre_ref))
    x.put(s_im, g3, x.state(fim_ref))


def _backward_kernel(q_ref, k_ref, v_ref, dy_ref, lr_ref, th_ref, gp_ref, pp_ref, gs_ref, ps_ref, tr_ref, ti_ref,
                     sre_ref, sim_ref, gfre_ref, gfim_ref, dq_ref, xim_ref, dk_ref, yim_ref, dkf_ref, yimf_ref, dv_ref,
                     ere_ref, eim_ref,
                     dh0re_ref, dh0im_ref, xpad, lrpad, thpad, g1, a_hi, a_lo, b_hi, b_lo, c_hi, c_lo, m_bufs, bars, *,
                     h, n_chunks):
    """Chunks in reverse order with E, the cotangent of the state (dL/dRe + i dL/dIm), carried in registers.

    Per chunk (W = dy v^T, Z_nm = e^{(G_n - G_m) + i(Phi_n - Phi_m)}, P = e^{G + i Phi} from the chunk start, F =
    e^{(G_C - G_m) + i(..)} to its end, H its start state):
      query rows n: Dq_n = sum_{m<n} W[n, m] k_m Z_nm + P_n (dy_n H^T)  -> dq (its real part, less the m = n term,
                    added in XLA) and Im Dq;
      key rows m:   Dk_m = sum_{n>m} W[n, m] q_n Z_nm + F_m (v_m conj(E)^T) -> real and imaginary parts of the two
                    terms apart (the gate gradients sum the second over other positions than the first);
                    dv_m = sum_{n>=m} A[n, m] dy_n + Re(k_m F_m E) with A the forward's scores;
      carry:        E_start = conj(T) E_end + sum_n conj(P_n) q_n^T dy_n.
    The key-row diagonals read q shifted up (64 zero rows below the chunk) and the gates from row m + 1 on.
    """
    c = CHUNK
    x = _Ctx(bars, h)
    dy_pair, v_pair, tmp = (a_hi, a_lo), (b_hi, b_lo), (c_hi, c_lo)
    re_pair, im_pair = (m_bufs.at[0], m_bufs.at[1]), (m_bufs.at[2], m_bufs.at[3])
    e_re0, e_im0 = x.get(x.state(gfre_ref), g1), x.get(x.state(gfim_ref), g1)

    def chunk(i, carry):
        e_re, e_im = carry
        j = n_chunks - 1 - i
        t0 = j * c
        x.put(e_re, g1, x.state(ere_ref, j))
        x.put(e_im, g1, x.state(eim_ref, j))
        dy = x.get(x.seq(dy_ref, t0, x.e0), g1)
        _store_split(dy_pair, dy)
        _store_split(v_pair, x.get(x.seq(v_ref, t0, x.e0), g1))
        w = _mm(dy_pair, _t(v_pair))  # W[n, m] = dy_n . v_m
        w_t = _mm(v_pair, _t(dy_pair))  # W^T

        # Query rows: keys shifted down by delta, gates from row n - delta + 1 to n.
        for buf in (xpad, lrpad, thpad):
            buf[pl.ds(0, c)] = x.zeros
        x.fetch(x.seq(k_ref, t0, x.d0), xpad.at[pl.ds(c, c)], 0)
        x.fetch(x.seq(lr_ref, t0, x.d0), lrpad.at[pl.ds(c, c)], 1)
        x.fetch(x.seq(th_ref, t0, x.d0), thpad.at[pl.ds(c, c)], 2)
        q = x.get(x.seq(q_ref, t0, x.d0), g1)

        def query_offset(delta, carry):
            r, p, dq, xim = carry
            r = r + x.load(lrpad.at[pl.ds(c + 1 - delta, c)])
            p = _wrap(p + x.load(thpad.at[pl.ds(c + 1 - delta, c)]))
            f = x.bcast(x.diagonal(w, delta)) * x.load(xpad.at[pl.ds(c - delta, c)]) * jnp.exp(r)
            return r, p, dq + f * jnp.cos(p), xim + f * jnp.sin(p)

        _, _, dq, xim = jax.lax.fori_loop(1, c, query_offset, (x.zeros,) * 4)
        pg = jnp.exp(x.get(x.seq(gp_ref, t0, x.d0), g1))
        phase = x.get(x.seq(pp_ref, t0, x.d0), g1)
        p_re, p_im = pg * jnp.cos(phase), pg * jnp.sin(phase)
        _store_split(re_pair, x.get(x.state(sre_ref, j), g1))
        _store_split(im_pair, x.get(x.state(sim_ref, j), g1))
        d_re, d_im = _mm(dy_pair, _t(re_pair)), _mm(dy_pair, _t(im_pair))  # dy H^T
        dq = dq + p_re * d_re - p_im * d_im
        xim = xim + p_im * d_re + p_re * d_im
        x.put(dq, g1, dq_ref.at[(x.vt,) + (x.bi, pl.ds(t0, c), x.hi, pl.ds(x.d0, TILE))])
        x.put(xim, g1, xim_ref.at[(x.vt,) + (x.bi, pl.ds(t0, c), x.hi, pl.ds(x.d0, TILE))])
        _store_split(tmp, q * p_re)
        es_re = _mm(_t(tmp), dy_pair)
        _store_split(tmp, q * p_im)
        es_im = -_mm(_t(tmp), dy_pair)

        # Key rows: queries shifted up by delta, gates from row m + 1 to m + delta.
        for buf in (xpad, lrpad, thpad):
            buf[pl.ds(c, c)] = x.zeros
        x.fetch(x.seq(q_ref, t0, x.d0), xpad.at[pl.ds(0, c)], 0)
        x.fetch(x.seq(lr_ref, t0, x.d0), lrpad.at[pl.ds(0, c)], 1)
        x.fetch(x.seq(th_ref, t0, x.d0), thpad.at[pl.ds(0, c)], 2)
        k = x.get(x.seq(k_ref, t0, x.d0), g1)
        a_t = jnp.where(x.rows == x.cols, x.bcast(jnp.sum(q * k, axis=1)), 0.0)  # scores transposed, m = n

        def key_offset(delta, carry):
            r, p, dk, yim, a_t = carry
            r = r + x.load(lrpad.at[pl.ds(delta, c)])
            p = _wrap(p + x.load(thpad.at[pl.ds(delta, c)]))
            qz = x.load(xpad.at[pl.ds(delta, c)]) * jnp.exp(r)
            qc, qs = qz * jnp.cos(p), qz * jnp.sin(p)
            wcol = x.bcast(x.diagonal(w_t, -delta))
            a_col = jnp.sum(qc * k, axis=1)
            a_t = jnp.where(x.cols == x.rows + delta, x.bcast(a_col), a_t)
            return r, p, dk + wcol * qc, yim + wcol * qs, a_t

        _, _, dk, yim, a_t = jax.lax.fori_loop(1, c, key_offset, (x.zeros,) * 4 + (a_t,))
        fg = jnp.exp(x.get(x.seq(gs_ref, t0, x.d0), g1))
        phase = x.get(x.seq(ps_ref, t0, x.d0), g1)
        f_re, f_im = fg * jnp.cos(phase), fg * jnp.sin(phase)
        _store_split(re_pair, e_re)
        _store_split(im_pair, e_im)
        u_re, u_im = _mm(v_pair, _t(re_pair)), -_mm(v_pair, _t(im_pair))  # v conj(E)^T
        for out, val in ((dk_ref, dk), (yim_ref, yim), (dkf_ref, f_re * u_re - f_im * u_im),
                         (yimf_ref, f_re * u_im + f_im * u_re)):
            x.put(val, g1, out.at[(x.vt,) + (x.bi, pl.ds(t0, c), x.hi, pl.ds(x.d0, TILE))])
        _store_split(tmp, a_t)
        dv = _mm(tmp, dy_pair)
        _store_split(tmp, k * f_re)
        dv = dv + _mm(tmp, re_pair)
        _store_split(tmp, k * f_im)
        dv = dv + _mm(tmp, im_pair)
        x.put(dv, g1, dv_ref.at[(x.kt,) + (x.bi, pl.ds(t0, c), x.hi, pl.ds(x.e0, TILE))])

        tr = x.get(tr_ref.at[x.bi, x.hi, j, pl.ds(x.d0, TILE), pl.ds(0, TILE)], g1)
        ti = x.get(ti_ref.at[x.bi, x.hi, j, pl.ds(x.d0, TILE), pl.ds(0, TILE)], g1)
        return tr * e_re + ti * e_im + es_re, tr * e_im - ti * e_re + es_im

    e_re, e_im = jax.lax.fori_loop(0, n_chunks, chunk, (e_re0, e_im0))
    x.put(e_re, g1, x.state(dh0re_ref))
    x.put(e_im, g1, x.state(dh0im_ref))


def _gate_sums(lr, th, tp, dkp):
    """Chunk-relative sums of the gates, each summed directly over its own segment (no prefix differences):
    inclusive prefix G, Phi from the chunk start, exclusive suffix to the chunk end, and the chunk's total transition
    (tr, ti) of shape (b, h, n, k, TILE), broadcast along the d_v tile so that the kernel reads it as a tile."""
    b, _, h, _ = lr.shape
    n = tp // CHUNK
    lr_c = lr.reshape(b, n, CHUNK, h, dkp)
    th_c = th.reshape(b, n, CHUNK, h, dkp)
    gp = jnp.cumsum(lr_c, axis=2)
    pp = _wrap(jnp.cumsum(th_c, axis=2))
    gs = reverse_exclusive_cumsum(lr_c, axis=2)
    ps = _wrap(reverse_exclusive_cumsum(th_c, axis=2))
    tot_r = jnp.sum(lr_c, axis=2)  # (b, n, h, k)
    tot_p = _wrap(jnp.sum(th_c, axis=2))
    tr = jnp.exp(tot_r) * jnp.cos(tot_p)
    ti = jnp.exp(tot_r) * jnp.sin(tot_p)
    tr, ti = (jnp.broadcast_to(jnp.transpose(x, (0, 2, 1, 3))[..., None], (b, h, n, dkp, TILE)) for x in (tr, ti))
    flat = lambda x: x.reshape(b, tp, h, dkp)
    return flat(gp), flat(pp), flat(gs), flat(ps), tr, ti


def _swizzled_bf16(*shape):
    return plgpu.SMEM(shape, jnp.bfloat16, transforms=(plgpu.TilingTransform((8, TILE)), plgpu.SwizzleTransform(128)))


def _f32_smem(*shape):
    return plgpu.SMEM(shape, jnp.float32)


def _call(body, out_type, scratch, grid, interpret, *args):
    return plgpu.kernel(body, out_type=out_type, grid=grid, grid_names=("bh", "dk", "dv"), scratch_types=scratch,
                        interpret=plgpu.InterpretGPUParams() if interpret else False)(*args)


def _forward(q, k, v, lr, th, h0re, h0im, *, interpret):
    """Padded float32 inputs (t, d_qk, d_v multiples of 64) -> y (b, t, h, v), the final state (re, im) and the
    residuals of the backward: the gate sums and every chunk's start state (b, h, n, k, v) (re, im)."""
    b, tp, h, dkp = q.shape
    dvp = v.shape[-1]
    n_chunks, n_dk, n_dv = tp // CHUNK, dkp // TILE, dvp // TILE
    th = _wrap(th)
    gates = _gate_sums(lr, th, tp, dkp)
    # In the kernel's argument order: kpad, lrpad, thpad (64 rows above the chunk), g1-g3 (float32 staging), the
    # bf16 hi / lo operands a (left) and b (right), the split state [Re hi, Re lo, Im hi, Im lo], the TMA barriers.
    scratch = (
        _f32_smem(2 * CHUNK, TILE), _f32_smem(2 * CHUNK, TILE), _f32_smem(2 * CHUNK, TILE),
        _f32_smem(CHUNK, TILE), _f32_smem(CHUNK, TILE), _f32_smem(CHUNK, TILE),
        _swizzled_bf16(CHUNK, TILE), _swizzled_bf16(CHUNK, TILE), _swizzled_bf16(CHUNK, TILE),
        _swizzled_bf16(CHUNK, TILE), _swizzled_bf16(4, TILE, TILE), plgpu.Barrier(num_barriers=6),
    )
    state = jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32)
    states = jax.ShapeDtypeStruct((b, h, n_chunks, dkp, dvp), jnp.float32)
    out_type = (jax.ShapeDtypeStruct((n_dk, b, tp, h, dvp), jnp.float32), state, state, states, states)
    body = functools.partial(_forward_kernel, h=h, n_chunks=n_chunks)
    y_parts, f_re, f_im, s_re, s_im = _call(body, out_type, scratch, (b * h, n_dk, n_dv), interpret,
                                            q, k, v, lr, th, *gates, h0re, h0im)
    return jnp.sum(y_parts, axis=0), f_re, f_im, (th, gates, s_re, s_im)


def _backward(q, k, v, lr, th, s_re, s_im, f_re, f_im, dy, gf_re, gf_im, *, interpret):
    """The kernel's partial sums -> (dq, dk, dv, dlog_r, dtheta, dh0 re, dh0 im), all float32. th is wrapped."""
    b, tp, h, dkp = q.shape
    dvp = v.shape[-1]
    n_chunks, n_dk, n_dv = tp // CHUNK, dkp // TILE, dvp // TILE
    gates = _gate_sums(lr, th, tp, dkp)  # recomputed (one cheap XLA pass) rather than kept from the forward
    scratch = (
        _f32_smem(2 * CHUNK, TILE), _f32_smem(2 * CHUNK, TILE), _f32_smem(2 * CHUNK, TILE), _f32_smem(CHUNK, TILE),
        *(_swizzled_bf16(CHUNK, TILE) for _ in range(6)), _swizzled_bf16(4, TILE, TILE), plgpu.Barrier(num_barriers=3),
    )
    per_k = jax.ShapeDtypeStruct((n_dv, b, tp, h, dkp), jnp.float32)
    state = jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32)
    states = jax.ShapeDtypeStruct((b, h, n_chunks, dkp, dvp), jnp.float32)
    out_type = (per_k,) * 6 + (jax.ShapeDtypeStruct((n_dk, b, tp, h, dvp), jnp.float32), states, states, state,
                                state)
    body = functools.partial(_backward_kernel, h=h, n_chunks=n_chunks)
    outs = _call(body, out_type, scratch, (b * h, n_dk, n_dv), interpret,
                 q, k, v, dy, lr, th, *gates, s_re, s_im, gf_re, gf_im)
    dq_off, xim, dk_in, yim_in, dk_f, yim_f, dv = (jnp.sum(z, axis=0) for z in outs[:7])
    e_re, e_im, dh0_re, dh0im = outs[7:]

    # The m = n terms (weight 1, no phase) are added here and left out of dL/dG below, where they cancel exactly.
    w_diag = jnp.sum(dy * v, axis=-1, keepdims=True)
    dq, dk = dq_off + w_diag * k, dk_in + dk_f + w_diag * q

    # y and the end state depend on the gates only through q e^{G + i Phi}, k e^{-G - i Phi}, F = e^{(G_C - G_m) +
    # i(..)} and T (G, Phi summed from the chunk start), so with the coefficients Dq, Dk above, per chunk:
    #   dlog_r_j = sum_{n >= j} (q Re Dq - k Re Dk_intra)_n + sum_{m < j} (k Re Dk_F)_m + Re<E_end, T H_start>,
    #   dtheta_j = sum_{n >= j} (-q Im Dq + k Im Dk_intra)_n - sum_{m < j} (k Im Dk_F)_m + Re<E_end, i T H_start>.
    # The F terms enter only for keys before j (those whose path to the chunk end crosses step j): summed that way,
    # a key's own large term (F = 1 for the chunk's last row) is never added and then cancelled.
    n = n_chunks
    view = lambda z: z.reshape(b, n, CHUNK, h, dkp)  # noqa: E731
    suffix = lambda z: jnp.flip(jnp.cumsum(jnp.flip(view(z), 2), axis=2), 2)  # noqa: E731

    def prefix(z):  # exclusive, summed directly (a total minus the own term would cancel)
        z = view(z)
        return jnp.concatenate([jnp.zeros_like(z[:, :, :1]), jnp.cumsum(z[:, :, :-1], axis=2)], axis=2)

    _, _, _, _, tr, ti = gates
    th_re = tr[..., :1] * s_re - ti[..., :1] * s_im  # T H_start, (b, h, n, k, v)
    th_im = tr[..., :1] * s_im + ti[..., :1] * s_re
    start_g = jnp.transpose(jnp.sum(e_re * th_re + e_im * th_im, axis=-1), (0, 2, 1, 3))[:, :, None]
    start_p = jnp.transpose(jnp.sum(e_im * th_re - e_re * th_im, axis=-1), (0, 2, 1, 3))[:, :, None]
    dlr = suffix(q * dq_off - k * dk_in) + prefix(k * dk_f) + start_g
    dth = suffix(-q * xim + k * yim_in) - prefix(k * yim_f) + start_p
    flat = lambda z: z.reshape(b, tp, h, dkp)  # noqa: E731
    return dq, dk, dv, flat(dlr), flat(dth), dh0_re, dh0im


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(interpret, q, k, v, lr, th, h0re, h0im):
    y, f_re, f_im, _ = _forward(q, k, v, lr, th, h0re, h0im, interpret=interpret)
    return y, f_re, f_im


def _core_fwd(interpret, q, k, v, lr, th, h0re, h0im):
    y, f_re, f_im, (th_wrapped, _, s_re, s_im) = _forward(q, k, v, lr, th, h0re, h0im, interpret=interpret)
    return (y, f_re, f_im), (q, k, v, lr, th_wrapped, s_re, s_im, f_re, f_im)


def _core_bwd(interpret, res, cts):
    dy, gf_re, gf_im = cts
    return _backward(*res, dy, gf_re, gf_im, interpret=interpret)


_core.defvjp(_core_fwd, _core_bwd)


def gateloop_mosaic_gpu(q, k, v, log_r, theta, h0, *, interpret: bool | None = None):
    """Mode contract: q, k, log_r, theta (b, t, h, k), v (b, t, h, v) real; h0 (b, h, k, v) complex or None.

    Returns (y (b, t, h, v) float32, final state (b, h, k, v) complex64); differentiable in every argument. Inputs
    are used in float32 (bf16 ones are upcast). interpret: Mosaic GPU's GPU interpret mode (default on CPU).
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"gateloop: {reason}; use mode='pallas' or 'chunked' here.")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    tp, dkp, dvp = _round_up(t, CHUNK), _round_up(dk, TILE), _round_up(dv, TILE)

    def prep(x, width):
        x = x.astype(jnp.float32)
        if tp != t or width != x.shape[-1]:
            x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, width - x.shape[-1])))
        return x

    args = [prep(x, dkp) for x in (q, k)] + [prep(v, dvp)] + [prep(x, dkp) for x in (log_r, theta)]
    if h0 is None:
        h0re = h0im = jnp.zeros((b, h, dkp, dvp), jnp.float32)
    else:
        pad = ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv))
        h0re = jnp.pad(jnp.real(h0).astype(jnp.float32), pad)
        h0im = jnp.pad(jnp.imag(h0).astype(jnp.float32), pad)
    y, f_re, f_im = _core(bool(interpret), *args, h0re, h0im)
    final = jax.lax.complex(f_re[:, :, :dk, :dv], f_im[:, :, :dk, :dv])
    return y[:, :t, :, :dv], final


__all__ = ["gateloop_mosaic_gpu", "serves_default_device", "supported", "unavailable_reason"]
