"""mode="chunked": the chunkwise form (spec section 2.4).

Time is split into chunks of C positions. Inside a chunk, outputs use the surrogate-attention form relative to the
chunk start; between chunks only the state H (b, h, k, v) is carried. Memory O(t * C * d_qk + (t / C) d_qk d_v)
per head instead of O(t d_qk d_v).

The complex transition factors exactly through the rotation identity: with a_j = r_j e^{i theta_j} and Phi the
cumulative phase, Re(q_n k_m e^{i(Phi_n - Phi_m)}) = (q_n cos Phi_n)(k_m cos Phi_m) + (q_n sin Phi_n)(k_m sin Phi_m),
so only real arithmetic is needed. Phases are chunk-relative so cos/sin never see large angles, and every
exponent is a sum of log|a| <= 0 over a segment, so nothing overflows for any gate in [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gateloop_jax.ops.common import polar_to_complex, reverse_exclusive_cumsum, segsum, wrap_phase
from gateloop_jax.ops.scan import scan_elementwise

DEFAULT_CHUNK_SIZE = 32


def _pad_time(x, pad, value=0.0):
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _to_chunks(x, chunk_size):
    """(b, t, h, d) -> (b, h, c, C, d)."""
    b, t, h, d = x.shape
    return jnp.transpose(x.reshape(b, t // chunk_size, chunk_size, h, d), (0, 3, 1, 2, 4))


def _from_chunks(x):
    """(b, h, c, C, d) -> (b, t, h, d)."""
    b, h, c, cs, d = x.shape
    return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, c * cs, h, d)


def _carry_states(transitions, increments, h0):
    """Chunk-start states: H_{c+1} = A_c * H_c + S_c. transitions: (b, h, c, k) c64; increments: (b, h, c, k, v).

    Returns (starts (b, h, c, k, v), final state (b, h, k, v)). Sequential over chunks: t / C steps.
    """

    def body(state, xs):
        transition, increment = xs
        return transition[..., None] * state + increment, state

    xs = (jnp.moveaxis(transitions, 2, 0), jnp.moveaxis(increments, 2, 0))
    final, starts = jax.lax.scan(body, h0, xs)
    return jnp.moveaxis(starts, 0, 2), final


def gateloop_chunked(q, k, v, log_r, theta, h0, chunk_size=None):
    """Same contract as ops.scan.gateloop_scan. Lengths that are not a multiple of chunk_size are padded internally
    with identity steps (a = 1, k = v = 0), which change neither the outputs nor the final state."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    elementwise = dk == 1 and dv == 1
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE if not elementwise else 256
    chunk_size = min(chunk_size, t)
    pad = -t % chunk_size
    if pad:
        q, k, v, log_r, theta = (_pad_time(x, pad) for x in (q, k, v, log_r, theta))
    if h0 is None:
        h0 = jnp.zeros((b, h, dk, dv), jnp.complex64)
    if elementwise:
        y, final = _chunked_elementwise(q, k, v, log_r, theta, h0, chunk_size)
    else:
        y, final = _chunked_matrix(q, k, v, log_r, theta, h0, chunk_size)
    return y[:, :t], final


def _chunked_matrix(q, k, v, log_r, theta, h0, chunk_size):
    q, k, v, log_r, theta = (_to_chunks(x, chunk_size) for x in (q, k, v, log_r, wrap_phase(theta)))
    # Inclusive within-chunk prefix sums: the transition from the chunk start to position n.
    cum_r = jnp.cumsum(log_r, axis=3)
    cum_theta = jnp.cumsum(theta, axis=3)

    # Intra-chunk: exact per-channel decay between every pair m <= n of the chunk.
    log_r_t = jnp.swapaxes(log_r, -1, -2)  # (b, h, c, k, C)
    seg_r = segsum(log_r_t)  # (b, h, c, k, n, m)
    seg_theta = jnp.where(jnp.isfinite(seg_r), segsum(jnp.swapaxes(theta, -1, -2)), 0.0)
    decay = jnp.exp(seg_r) * jnp.cos(seg_theta)
    scores = jnp.einsum("bhcnk,bhcmk,bhcknm->bhcnm", q, k, decay)
    y = jnp.einsum("bhcnm,bhcmv->bhcnv", scores, v)

    # What each chunk adds to the state, relative to its end: sum_m e^{(l_C - l_m) + i(Phi_C - Phi_m)} k_m^T v_m,
    # with the exponents summed directly from the end (no cancellation of large prefix sums).
    to_end_r = reverse_exclusive_cumsum(log_r, axis=3)
    to_end_theta = reverse_exclusive_cumsum(theta, axis=3)
    k_to_end = k * jnp.exp(to_end_r)
    inc_re = jnp.einsum("bhcmk,bhcmv->bhckv", k_to_end * jnp.cos(to_end_theta), v)
    inc_im = jnp.einsum("bhcmk,bhcmv->bhckv", k_to_end * jnp.sin(to_end_theta), v)
    transitions = polar_to_complex(cum_r[..., -1, :], cum_theta[..., -1, :])  # (b, h, c, k)
    starts, final = _carry_states(transitions, jax.lax.complex(inc_re, inc_im), h0)

    # Inter-chunk: Re(q_n diag(e^{l_n + i Phi_n}) H_start), rotated queries against the real and imaginary state.
    q_scaled = q * jnp.exp(cum_r)
    y = y + jnp.einsum("bhcnk,bhckv->bhcnv", q_scaled * jnp.cos(cum_theta), jnp.real(starts))
    y = y - jnp.einsum("bhcnk,bhckv->bhcnv", q_scaled * jnp.sin(cum_theta), jnp.imag(starts))
    return _from_chunks(y), final


def _chunked_elementwise(q, k, v, log_r, theta, h0, chunk_size):
    """Max-headed: an associative scan inside each chunk, then a short sequential carry across chunks.

    Memory O(t) per channel like mode="scan", but the scan depth is log C and the carry touches t / C states.
    """
    b, tp, h, _ = q.shape
    n_chunks = tp // chunk_size
    a = polar_to_complex(log_r[..., 0], theta[..., 0]).reshape(b, n_chunks, chunk_size, h)
    x = (k[..., 0] * v[..., 0]).astype(jnp.complex64).reshape(b, n_chunks, chunk_size, h)
    # Within-chunk prefix: local states (from a zero start) and the cumulative transition since the chunk start.
    flat = lambda z: z.reshape(b * n_chunks, chunk_size, h)
    local = scan_elementwise(flat(x), flat(a), None).reshape(x.shape)
    cum_a = jax.lax.associative_scan(jnp.multiply, a, axis=2)
    starts, final = _carry_states(
        jnp.moveaxis(cum_a[:, :, -1], 2, 1)[..., None],  # (b, h, c, 1)
        jnp.moveaxis(local[:, :, -1], 2, 1)[..., None, None],  # (b, h, c, 1, 1)
        h0,
    )
    starts = jnp.moveaxis(starts[..., 0, 0], 1, 2)[:, :, None, :]  # (b, c, 1, h)
    states = (local + cum_a * starts).reshape(b, tp, h)
    y = q[..., 0] * jnp.real(states)
    return y[..., None], final
