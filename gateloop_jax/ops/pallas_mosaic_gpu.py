"""Multi-head GateLoop as a Pallas Mosaic GPU kernel (Hopper: wgmma, TMA), mode="mosaic_gpu".

Per head, H_n = diag(a_n) H_{n-1} + k_n^T v_n and y_n = Re(q_n H_n), a = e^{log_r + i theta} per key channel.
Time is cut into chunks of C = 64 rows (one wgmma M tile). The intra-chunk kernels take one program per (batch x
head x chunk, d_qk tile of 64 channels), all independent, each walking the d_v tiles of 64; what passes between
chunks is the state, carried by the state pass. With G, Phi the cumulative log|a| and phase from the chunk start:

- Intra-chunk scores S[n, m] = sum_d q_nd k_md e^{G_nd - G_md} cos(Phi_nd - Phi_md), m <= n, by diagonals: for each
  offset delta = n - m the decay of every row is extended by one step, R <- R + log_r[n - delta + 1] (a running sum
  over the pair's own segment, never a difference of prefix sums, so no cancellation and no overflow: every exponent
  is <= 0 and any gate in [0, 1] is exact, |a| = 0 included), the phase likewise (wrapped each step), and the keys
  are read shifted by delta rows from shared memory (64 zero rows above the chunk make rows n < delta vanish).
  That is C - 1 elementwise passes over a (C, 64) tile on the CUDA cores; y_intra = S V on the tensor cores, with
  bfloat16 operands split in two (x = hi + lo; hi*hi + hi*lo + lo*hi, float32 accumulation): ~16 significant bits
  per operand, float32-level results (~1e-5). The d_qk tiles of a head each add their share (summed in XLA).
- Between chunks, the state pass (`_state_pass`): per chunk y's inter-chunk part Re(q e^{G + i Phi} H_start) (the
  rotation identity, [Re; -Im] products), then H <- T H + K_end^T V, K_end = k e^{(G_C - G_m) + i (Phi_C - Phi_m)}
  (every factor e^{<= 0}). Either a serial kernel (the default), one program per (batch x head, segment of chunks,
  d_qk tile, d_v tile) walking the chunks with the state (Re, Im of a 64 x 64 tile, float32) in registers and its
  operands (bf16 pairs formed in XLA) fetched two chunks ahead, or ("_scan" variants) XLA's associative scan over
  chunks.

Backward (custom VJP): the backward kernel, per chunk and tile pair, takes the query-row diagonals (dq and Im Dq) and
the key-row diagonals (queries read shifted up: dk, Im Dk, and the transposed scores for dv = A^T dy). The state
pass rebuilds the chunk-start states and, run in reverse with conjugated factors, carries the state's cotangent E
(E_start = conj(T) E_end + (q conj(P))^T dy) and gives dv's inter-chunk part Re(k conj(F) E_end) on the way; the
other inter-chunk terms are batched products in XLA. The VJP saves only the operands as the caller passed them and
rebuilds the padded copies and the chunk-start states (t / 64 x d_qk x d_v complex per head) in the backward
(`_core_bwd`). dlog|a| and darg a follow from those coefficients (y depends on the gates only through q e^{G + i Phi},
k e^{-G - i Phi} and the chunk's end factors), each term summed over the positions whose decay it crosses, so none is
a difference of large numbers: float32-level accuracy for |a| ~ 1e-6 too (those sums: mosaic_gpu_gates.gate_grad_sums,
in XLA or one kernel).

The intra-chunk kernels: one warpgroup per program, every product three bf16 wgmmas, the diagonals on the CUDA cores
(C - 1 elementwise passes per chunk and direction); the "_stream" variants fetch their tiles two ahead. The
"_subblock" variants (VARIANTS) walk the diagonals only within 16-row sub-blocks (15 passes) and take the pairs
between sub-blocks on the tensor cores, from factored decays. Every decay factor outside the walks (the chunk's
e^{G + i Phi} from its start and to its end, the sub-block factors) comes from one more kernel, which sums the gates
over each window on the tensor cores (mosaic_gpu_gates.py).

Shapes: the mode contract of ops/ (legend b t h k v): q, k, log_r, theta (b, t, h, k), v (b, t, h, v), h0
(b, h, k, v) complex. d_qk and d_v are padded to multiples of 64 and t to a multiple of 64 with identity steps
(a = 1, q = k = v = 0), which change nothing.

The code: this module has the op (padding, the custom VJP and the XLA between the kernels); mosaic_gpu_gates.py the
decay factors, mosaic_gpu_intra.py the intra-chunk kernels and the variants, mosaic_gpu_state_pass.py the state
pass, mosaic_gpu_common.py what they share.

Needs jax >= 0.11 (the Pallas Mosaic GPU API used here and its GPU interpret mode, which runs the kernel on CPU for
tests); elsewhere `unavailable_reason()` says why and mode="auto" does not pick it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gateloop_jax.ops.kernel_util import pad_operands
from gateloop_jax.ops.mosaic_gpu_common import _IMPORT_ERROR, CHUNK, TILE, _einsum, _wrap
from gateloop_jax.ops.mosaic_gpu_gates import gate_factors, gate_grad_sums
from gateloop_jax.ops.mosaic_gpu_intra import VARIANTS, _backward_intra, _forward_intra, _split_variant
from gateloop_jax.ops.mosaic_gpu_state_pass import _state_pass

MIN_JAX = (0, 11)
# The default variant: sub-blocks, tiles fetched two ahead, the serial state-pass kernel, the backward's products
# across sub-blocks in a loop. On an H100 (experiments/results/mosaic_gpu_h100/gate_kernels/, jax 0.11.2), with the
# gate-factor kernel, it matched the float64 oracle at d_qk = d_v = 32, 64, 96, 128 and 256 and at the mixed pairs
# (32, 96) and (256, 64), in all four gate regimes: worst relative error 6.2e-5 over y, the final state and every
# gradient (with the gate-gradient-sums kernel too, checked at 32 and 64: 4.8e-5). Its fwd+bwd at 32768 tokens x 8
# heads of 64 (bf16) was 8.65, 9.14 and 9.29 ms at L = 1024, 8192 and 32768, against 5.53-6.27 for the Triton kernel
# and 1.31-2.03 for jax-linear-attention's real-gated GLA in the same run. So mode="auto" keeps the Triton kernel for
# heads up to 64 and picks this one on Hopper only for wider heads, where it was faster than the Triton kernel (23.8
# ms against 38.6 at heads of 128, an earlier form of these kernels) and the alternative is "chunked"
# (dispatch.resolve_mode).
VARIANT = "padded_subblock_stream_rolled"


def unavailable_reason() -> str | None:
    """None when this jax can build the kernel (jax >= 0.11 with Pallas Mosaic GPU), else why not."""
    version = tuple(int(x) for x in jax.__version__.split(".")[:2])
    if version < MIN_JAX:
        return f"mode='mosaic_gpu' needs jax >= 0.11 (Pallas Mosaic GPU, its interpret mode), found {jax.__version__}"
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


def _gate_factors(lr, th, opts):
    """mosaic_gpu_gates.gate_factors for this variant: the sub-block factors only where its kernels take them."""
    interpret, variant = opts
    return gate_factors(lr, th, sub=_split_variant(variant)[3], interpret=interpret)


def _chunk_starts(k, v, gates, h0re, h0im, *, opts):
    """Every chunk's start state (b, h, n, k, v) as (Re, Im) and the final state (Re, Im), by _state_pass (the
    backward's rebuild). gates: _gate_factors of the gates."""
    _, fin_re, fin_im, s_re, s_im = _state_pass(None, None, k * gates.f_re, k * gates.f_im, v, gates.t_re, gates.t_im,
                                                h0re, h0im, opts=opts, rows_out=False, save=True)
    return s_re, s_im, fin_re, fin_im


def _forward(q, k, v, lr, th, h0re, h0im, *, opts):
    """Padded float32 inputs (t, d_qk, d_v multiples of 64), th wrapped -> y (b, t, h, v) and the final state (re,
    im): the gate factors, the intra-chunk kernel, then the state pass (the inter-chunk part of y and the states)."""
    g = _gate_factors(lr, th, opts)
    y = _forward_intra(q, k, v, lr, th, g.sub, opts=opts)
    y_inter, fin_re, fin_im = _state_pass(q * g.p_re, q * g.p_im, k * g.f_re, k * g.f_im, v, g.t_re, g.t_im, h0re,
                                          h0im, opts=opts)
    return y + y_inter, fin_re, fin_im


def _backward(q, k, v, lr, th, gates, s_re, s_im, dy, gf_re, gf_im, *, opts):
    """-> (dq, dk, dv, dlog_r, dtheta, dh0 re, dh0 im), all float32. th is wrapped; gates: _gate_factors(lr, th);
    (s_re, s_im) the chunk-start states (_chunk_starts)."""
    b, tp, h, _ = q.shape
    n = tp // CHUNK
    dq_in, xim_in, dk_in, yim_in, dv = _backward_intra(q, k, v, lr, th, dy, gates.sub, opts=opts)

    # Between chunks: the cotangent E of each chunk's end state, E_end[n-1] = the final state's cotangent, E_start[j] =
    # conj(T_j) E_end[j] + sum_n conj(P_n) q_n^T dy_n (P = e^{G + i Phi} from the chunk start), by the state pass
    # run in reverse, which also gives dv's inter-chunk part Re(k conj(F) E_end) and dh0 = E_start[0].
    chunks = lambda z: z.reshape(b, n, CHUNK, h, z.shape[-1])  # noqa: E731
    flat = lambda z: z.reshape(b, tp, h, z.shape[-1])  # noqa: E731
    qc, kc, vc, dyc = chunks(q), chunks(k), chunks(v), chunks(dy)
    p_re, p_im, f_re_, f_im_ = (chunks(z) for z in gates[:4])
    t_re, t_im = gates.t_re, gates.t_im
    kf_re, kf_im, qp_re, qp_im = (flat(x * y) for x, y in ((kc, f_re_), (kc, f_im_), (qc, p_re), (qc, p_im)))
    dv_inter, dh0_re, dh0_im, e_re, e_im = _state_pass(kf_re, -kf_im, qp_re, -qp_im, dy, t_re, -t_im, gf_re, gf_im,
                                                       opts=opts, reverse=True, save=True)

    # The inter-chunk coefficients: Dq += P (dy H^T), Dk_F = F (v conj(E)^T), dv += Re(k F E).
    d_re, d_im = _einsum("bnchv,bhnkv->bnchk", dyc, s_re), _einsum("bnchv,bhnkv->bnchk", dyc, s_im)
    dq_off = dq_in + flat(p_re * d_re - p_im * d_im)
    xim = xim_in + flat(p_im * d_re + p_re * d_im)
    u_re, u_im = _einsum("bnchv,bhnkv->bnchk", vc, e_re), -_einsum("bnchv,bhnkv->bnchk", vc, e_im)
    dk_f, yim_f = flat(f_re_ * u_re - f_im_ * u_im), flat(f_re_ * u_im + f_im_ * u_re)
    dv = dv + dv_inter

    # The m = n terms (weight 1, no phase) are added here and left out of dL/dG below, where they cancel exactly.
    w_diag = jnp.sum(dy * v, axis=-1, keepdims=True)
    dq, dk = dq_off + w_diag * k, dk_in + dk_f + w_diag * q

    # y and the end state depend on the gates only through q e^{G + i Phi}, k e^{-G - i Phi}, F = e^{(G_C - G_m) +
    # i(..)} and T (G, Phi summed from the chunk start), so with the coefficients Dq, Dk above, per chunk:
    #   dlog_r_j = sum_{n >= j} (q Re Dq - k Re Dk_intra)_n + sum_{m < j} (k Re Dk_F)_m + Re<E_end, T H_start>,
    #   dtheta_j = sum_{n >= j} (-q Im Dq + k Im Dk_intra)_n - sum_{m < j} (k Im Dk_F)_m + Re<E_end, i T H_start>.
    # The F terms enter only for keys before j (those whose path to the chunk end crosses step j): summed that way,
    # a key's own large term (F = 1 for the chunk's last row) is never added and then cancelled.
    # (gate_grad_sums: in XLA or one kernel.)
    th_re = t_re[..., None] * s_re - t_im[..., None] * s_im  # T H_start, (b, h, n, k, v)
    th_im = t_re[..., None] * s_im + t_im[..., None] * s_re
    start_g = jnp.transpose(jnp.sum(e_re * th_re + e_im * th_im, axis=-1), (0, 2, 1, 3))[:, :, None]
    start_p = jnp.transpose(jnp.sum(e_im * th_re - e_re * th_im, axis=-1), (0, 2, 1, 3))[:, :, None]
    dlr, dth = gate_grad_sums(q, k, dq_off, dk_in, dk_f, xim, yim_in, yim_f, interpret=opts[0])
    return dq, dk, dv, flat(chunks(dlr) + start_g), flat(chunks(dth) + start_p), dh0_re, dh0_im


def _padded(q, k, v, log_r, theta, h0re, h0im):
    """The kernels' operands: float32, t to a multiple of CHUNK, d_qk and d_v to multiples of TILE, theta wrapped."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    tp, dkp, dvp = _round_up(t, CHUNK), _round_up(dk, TILE), _round_up(dv, TILE)
    (q, k, v, lr, th), _, _ = pad_operands(q, k, v, log_r, theta, None, tp, dkp, dvp, dtype=jnp.float32)
    widths = ((0, 0), (0, 0), (0, dkp - dk), (0, dvp - dv))
    return q, k, v, lr, _wrap(th), jnp.pad(h0re, widths), jnp.pad(h0im, widths)


def _pad_to(x, shape):
    """x zero-padded at the end of every axis to `shape` (the kernels' padded shape)."""
    return jnp.pad(x, [(0, p - n) for p, n in zip(shape, x.shape)])


def _unpad_like(x, like):
    """x (padded, float32) cut to like's shape and cast to its dtype."""
    return x[tuple(slice(0, n) for n in like.shape)].astype(like.dtype)


# The custom VJP takes the operands as the caller has them (unpadded, q, k, v in their own dtype) and saves only those:
# the padded float32 copies and the chunk-start states (b, h, t / 64, k, v complex, as large as q and k together at
# d = 64 and more for wider heads) are rebuilt in the backward, which costs one more pass of the XLA carry and keeps
# a many-layer model's saved activations to what its layers hold anyway.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(opts, q, k, v, log_r, theta, h0re, h0im):
    return _core_fwd(opts, q, k, v, log_r, theta, h0re, h0im)[0]


def _core_fwd(opts, q, k, v, log_r, theta, h0re, h0im):
    y, f_re, f_im = _forward(*_padded(q, k, v, log_r, theta, h0re, h0im), opts=opts)
    outs = (y[:, :v.shape[1], :, :v.shape[-1]], _unpad_like(f_re, h0re), _unpad_like(f_im, h0im))
    return outs, (q, k, v, log_r, theta, h0re, h0im)


def _core_bwd(opts, res, cts):
    # One barrier over the saved operands and this op's cotangents: XLA can neither merge the rebuilt operands and
    # states with the forward's (common-subexpression elimination would keep those alive from the forward on) nor
    # rebuild them before the backward has reached this op (every layer's copies alive at once).
    res, cts = jax.lax.optimization_barrier((res, cts))
    q, k, v, lr, th, h0re, h0im = padded = _padded(*res)
    gates = _gate_factors(lr, th, opts)
    s_re, s_im, _, _ = _chunk_starts(k, v, gates, h0re, h0im, opts=opts)
    dy, gf_re, gf_im = cts
    grads = _backward(*padded[:5], gates, s_re, s_im, _pad_to(dy, v.shape), _pad_to(gf_re, h0re.shape),
                      _pad_to(gf_im, h0re.shape), opts=opts)
    return tuple(_unpad_like(g, x) for g, x in zip(grads, res))


_core.defvjp(_core_fwd, _core_bwd)


def gateloop_mosaic_gpu(q, k, v, log_r, theta, h0, *, interpret: bool | None = None, variant: str | None = None):
    """Mode contract: q, k, log_r, theta (b, t, h, k), v (b, t, h, v) real; h0 (b, h, k, v) complex or None.

    Returns (y (b, t, h, v) float32, final state (b, h, k, v) complex64); differentiable in every argument. Inputs
    are used in float32 (bf16 ones are upcast). interpret: Mosaic GPU's GPU interpret mode (default on CPU).
    variant: one of VARIANTS (default VARIANT), for kernel development.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(f"gateloop: {reason}; use mode='pallas' or 'chunked' here.")
    variant = VARIANT if variant is None else variant
    _split_variant(variant)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    b, _, h, dk = q.shape
    dv = v.shape[-1]
    if h0 is None:
        h0re = h0im = jnp.zeros((b, h, dk, dv), jnp.float32)
    else:
        h0re, h0im = jnp.real(h0).astype(jnp.float32), jnp.imag(h0).astype(jnp.float32)
    y, f_re, f_im = _core((bool(interpret), variant), q, k, v, log_r, theta, h0re, h0im)
    return y, jax.lax.complex(f_re, f_im)


__all__ = ["VARIANT", "VARIANTS", "gateloop_mosaic_gpu", "serves_default_device", "supported", "unavailable_reason"]
