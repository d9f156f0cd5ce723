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

Backward (custom VJP): the VJP of the pure-JAX chunked form (ops/chunked.py) on the same arguments, pending a Mosaic
GPU backward kernel; it is exact for every gate but runs in XLA.

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

from gateloop_jax.ops import chunked
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


def _kernel(q_ref, k_ref, v_ref, lr_ref, th_ref, gp_ref, pp_ref, gs_ref, ps_ref, tr_ref, ti_ref, h0re_ref, h0im_ref,
            y_ref, fre_ref, fim_ref, kpad, lrpad, thpad, g1, g2, g3, a_hi, a_lo, b_hi, b_lo, s_bufs, bars, *, h, n_chunks,
            n_dk, n_dv):
    c = CHUNK
    wg = plgpu.Layout.WGMMA
    pid = jax.lax.axis_index("bh")
    bi, hi_ = pid // h, pid % h
    kt = jax.lax.axis_index("dk")
    vt = jax.lax.axis_index("dv")
    d0, e0 = kt * TILE, vt * TILE
    rows = plgpu.broadcasted_iota(jnp.int32, (c, TILE), 0, layout=wg)
    cols = plgpu.broadcasted_iota(jnp.int32, (c, TILE), 1, layout=wg)
    zeros = plgpu.layout_cast(jnp.zeros((c, TILE), jnp.float32), wg)

    def load(ref):
        return plgpu.load(ref, layout=wg)

    def fetch(src, dst, slot):
        plgpu.copy_gmem_to_smem(src, dst, bars.at[slot])
        plgpu.barrier_wait(bars.at[slot])

    # The 64 rows above each chunk stay zero (keys) or finite (gates): the shifted reads of the diagonals land there.
    for buf in (kpad, lrpad, thpad):
        buf[pl.ds(0, c)] = zeros

    def put_state(s_re, s_im):
        for i, x in enumerate((s_re, s_im)):
            x_hi, x_lo = _split(x)
            s_bufs[2 * i] = x_hi
            s_bufs[2 * i + 1] = x_lo

    fetch(h0re_ref.at[bi, hi_, pl.ds(d0, TILE), pl.ds(e0, TILE)], g1, 0)
    fetch(h0im_ref.at[bi, hi_, pl.ds(d0, TILE), pl.ds(e0, TILE)], g2, 1)
    s_re0, s_im0 = load(g1), load(g2)
    put_state(s_re0, s_im0)
    plgpu.commit_smem()

    def mm3(acc, a, b_pair, transpose_a=False):
        """acc += a @ b for a float32 register tile a (bf16-split through a_hi / a_lo) and a split b in SMEM."""
        x_hi, x_lo = _split(a)
        a_hi[...] = x_hi
        a_lo[...] = x_lo
        plgpu.commit_smem()
        ah, al = (a_hi.T, a_lo.T) if transpose_a else (a_hi, a_lo)
        bh, bl = b_pair
        plgpu.wgmma(acc, ah, bh)
        plgpu.wgmma(acc, ah, bl)
        plgpu.wgmma(acc, al, bh)
        plgpu.wgmma_wait(0)  # a_hi / a_lo are rewritten by the next product

    def chunk(j, state):
        s_re, s_im = state
        t0 = j * c
        rows_in = (bi, pl.ds(t0, c), hi_)
        plgpu.wait_smem_to_gmem(0)  # g1 held the previous chunk's y
        fetch(k_ref.at[rows_in + (pl.ds(d0, TILE),)], kpad.at[pl.ds(c, c)], 0)
        fetch(lr_ref.at[rows_in + (pl.ds(d0, TILE),)], lrpad.at[pl.ds(c, c)], 1)
        fetch(th_ref.at[rows_in + (pl.ds(d0, TILE),)], thpad.at[pl.ds(c, c)], 2)
        fetch(q_ref.at[rows_in + (pl.ds(d0, TILE),)], g1, 3)
        fetch(v_ref.at[rows_in + (pl.ds(e0, TILE),)], g2, 4)
        v = load(g2)
        v_hi, v_lo = _split(v)
        b_hi[...] = v_hi
        b_lo[...] = v_lo
        q = load(g1)
        k = load(kpad.at[pl.ds(c, c)])

        # Intra-chunk scores by diagonals (module docstring): row n of step delta pairs query n with key n - delta.
        diag0 = jnp.sum(q * k, axis=1)
        scores = jnp.where(rows == cols, jax.lax.broadcast_in_dim(diag0, (c, TILE), [0]), 0.0)

        def offset(delta, carry):
            r, p, scores = carry
            r = r + load(lrpad.at[pl.ds(c + 1 - delta, c)])
            p = _wrap(p + load(thpad.at[pl.ds(c + 1 - delta, c)]))
            k_s = load(kpad.at[pl.ds(c - delta, c)])
            w = jnp.sum(q * k_s * jnp.exp(r) * jnp.cos(p), axis=1)
            scores = jnp.where(cols == rows - delta, jax.lax.broadcast_in_dim(w, (c, TILE), [0]), scores)
            return r, p, scores

        _, _, scores = jax.lax.fori_loop(1, c, offset, (zeros, zeros, scores))

        # Inter-chunk factors of the queries.
        fetch(gp_ref.at[rows_in + (pl.ds(d0, TILE),)], g2, 4)
        fetch(pp_ref.at[rows_in + (pl.ds(d0, TILE),)], g3, 5)
        qg = q * jnp.exp(load(g2))
        phase = load(g3)
        q_re, q_im = qg * jnp.cos(phase), -qg * jnp.sin(phase)

        def y_products(acc):
            mm3(acc, scores, (b_hi, b_lo))
            mm3(acc, q_re, (s_bufs.at[0], s_bufs.at[1]))
            mm3(acc, q_im, (s_bufs.at[2], s_bufs.at[3]))
            return acc[...]

        y = pl.run_scoped(y_products, plgpu.ACC((c, TILE), jnp.float32))
        g1[...] = y
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(g1, y_ref.at[(kt, bi, pl.ds(t0, c), hi_, pl.ds(e0, TILE))])

        # The chunk's increment to the state, relative to its end, and the carry H_end = T H_start + increment.
        fetch(gs_ref.at[rows_in + (pl.ds(d0, TILE),)], g2, 4)
        fetch(ps_ref.at[rows_in + (pl.ds(d0, TILE),)], g3, 5)
        kg = k * jnp.exp(load(g2))
        phase = load(g3)
        k_re, k_im = kg * jnp.cos(phase), kg * jnp.sin(phase)

        def increment(x):
            def body(acc):
                mm3(acc, x, (b_hi, b_lo), transpose_a=True)
                return acc[...]

            return pl.run_scoped(body, plgpu.ACC((TILE, TILE), jnp.float32))

        inc_re, inc_im = increment(k_re), increment(k_im)
        tile = (bi, hi_, j, pl.ds(d0, TILE), pl.ds(0, TILE))
        fetch(tr_ref.at[tile], g2, 4)
        fetch(ti_ref.at[tile], g3, 5)
        tr, ti = load(g2), load(g3)
        s_re, s_im = tr * s_re - ti * s_im + inc_re, tr * s_im + ti * s_re + inc_im
        put_state(s_re, s_im)
        plgpu.commit_smem()
        return s_re, s_im

    s_re, s_im = jax.lax.fori_loop(0, n_chunks, chunk, (s_re0, s_im0))
    plgpu.wait_smem_to_gmem(0)
    g2[...] = s_re
    g3[...] = s_im
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(g2, fre_ref.at[bi, hi_, pl.ds(d0, TILE), pl.ds(e0, TILE)])
    plgpu.copy_smem_to_gmem(g3, fim_ref.at[bi, hi_, pl.ds(d0, TILE), pl.ds(e0, TILE)])
    plgpu.wait_smem_to_gmem(0)
    del n_dk, n_dv


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


@functools.partial(jax.jit, static_argnames=("interpret",))
def _forward(q, k, v, lr, th, h0re, h0im, *, interpret):
    """Padded float32 inputs (t, d_qk, d_v multiples of 64) -> (y (b, t, h, v), final re, final im)."""
    b, tp, h, dkp = q.shape
    dvp = v.shape[-1]
    n_chunks, n_dk, n_dv = tp // CHUNK, dkp // TILE, dvp // TILE
    th = _wrap(th)
    gp, pp, gs, ps, tr, ti = _gate_sums(lr, th, tp, dkp)
    swizzled = (plgpu.TilingTransform((8, TILE)), plgpu.SwizzleTransform(128))
    f32 = lambda *s: plgpu.SMEM(s, jnp.float32)
    bf16 = lambda *s: plgpu.SMEM(s, jnp.bfloat16, transforms=swizzled)
    # In the kernel's argument order: kpad, lrpad, thpad (64 rows above the chunk), g1-g3 (float32 staging), the
    # bf16 hi / lo operands a (left) and b (right), the split state [Re hi, Re lo, Im hi, Im lo], the TMA barriers.
    scratch = (
        f32(2 * CHUNK, TILE), f32(2 * CHUNK, TILE), f32(2 * CHUNK, TILE),
        f32(CHUNK, TILE), f32(CHUNK, TILE), f32(CHUNK, TILE),
        bf16(CHUNK, TILE), bf16(CHUNK, TILE), bf16(CHUNK, TILE), bf16(CHUNK, TILE),
        bf16(4, TILE, TILE), plgpu.Barrier(num_barriers=6),
    )
    out_type = (
        jax.ShapeDtypeStruct((n_dk, b, tp, h, dvp), jnp.float32),
        jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32),
        jax.ShapeDtypeStruct((b, h, dkp, dvp), jnp.float32),
    )
    body = functools.partial(_kernel, h=h, n_chunks=n_chunks, n_dk=n_dk, n_dv=n_dv)
    y_parts, f_re, f_im = plgpu.kernel(
        body,
        out_type=out_type,
        grid=(b * h, n_dk, n_dv),
        grid_names=("bh", "dk", "dv"),
        scratch_types=scratch,
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(q, k, v, lr, th, gp, pp, gs, ps, tr, ti, h0re, h0im)
    return jnp.sum(y_parts, axis=0), f_re, f_im


# --------------------------------------------------------------------------------------------------------------------
# Differentiable wrapper
# --------------------------------------------------------------------------------------------------------------------


def _reference(q, k, v, lr, th, h0re, h0im):
    """The same function in pure JAX (ops/chunked.py): what the backward differentiates."""
    y, final = chunked.gateloop_chunked(q, k, v, lr, th, jax.lax.complex(h0re, h0im))
    return y, jnp.real(final), jnp.imag(final)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(interpret, q, k, v, lr, th, h0re, h0im):
    return _forward(q, k, v, lr, th, h0re, h0im, interpret=interpret)


def _core_fwd(interpret, q, k, v, lr, th, h0re, h0im):
    out = _forward(q, k, v, lr, th, h0re, h0im, interpret=interpret)
    return out, (q, k, v, lr, th, h0re, h0im)


def _core_bwd(interpret, res, cts):
    del interpret
    _, vjp = jax.vjp(_reference, *res)
    return vjp(cts)


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
