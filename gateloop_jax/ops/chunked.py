"""mode="chunked": the chunkwise form (spec section 2.4).

Time is split into chunks of C positions (chunk_size). Inside a chunk, outputs use the surrogate-attention form
relative to the chunk start; between chunks only the state H (b, h, k, v) is carried. Memory O(t * C + (t / C) d_qk d_v)
per head (plus O(t * c * d_qk) transient for the diagonal sub-blocks, below), instead of O(t d_qk d_v).

Multi-head shapes use secondary chunking: each chunk is split into sub-blocks of c = SUB_BLOCK positions.
- Query sub-block i against key sub-block j < i: with B_i the position just before sub-block i, the decay factors
  exactly as e^{l_n - l_m} = e^{l_n - l_B} e^{l_B - l_m}, where l is the cumulative log|a|; both exponents are <= 0
  (the first is a sum over n's own sub-block, the second a sum over (m, B]), so queries and keys are scaled by factors
  in [0, 1] and the scores are one real matrix product per row of sub-blocks. The complex phase factors through the
  rotation identity: Re(q_n k_m e^{i(Phi_n - Phi_m)}) = (q_n cos a_n)(k_m cos b_m) - (q_n sin a_n)(k_m sin b_m) with
  a_n = Phi_n - Phi_B and b_m = Phi_B - Phi_m, so the key width is 2 d_qk and all arithmetic is real.
- Diagonal sub-blocks (m < n inside one sub-block of c): the exact per-channel decay e^{l_n - l_m} cos(Phi_n - Phi_m),
  c x c x d_qk per sub-block. l_n - l_m is taken as a difference of within-sub-block prefix sums kept in double-float
  (hi + lo, error-free two-sums), so there is no cancellation however negative the prefix sums get (|a| ~ 0 gives
  log|a| ~ -69 per step); entries m >= n are zeroed before the exp. The m = n term is q_n . k_n exactly.
- Between chunks: the state at each chunk start, H_{c+1} = A_c H_c + S_c, by an associative scan over chunks
  (log depth; CARRY = "sequential" selects the lax.scan of t / C steps instead).
Every exponent of a magnitude is a sum of log|a| <= 0 over a segment (or a double-float difference that equals one),
so nothing overflows for any gate in [0, 1]. Phases are wrapped per step, per sub-block total and per chunk, and are
taken relative to the sub-block (or chunk) start, so cos/sin never see large angles.

Segments (reset): a restart cannot enter the log-space sums (a log|a| of -inf gives inf - inf in the differences
above), so the sums are left as they are and the terms that cross a segment start are masked after they are formed:
pairs (n, m) of one chunk in different segments, queries after a start in their chunk (the chunk-start state),
keys before a later start in their chunk (the chunk's increment), and the transition of every chunk holding a start
(exactly 0, so the carry restarts). Max-headed, a = 0 at a start in the complex scans does it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gateloop_jax.ops.common import polar_to_complex, reverse_exclusive_cumsum, segsum, wrap_phase
from gateloop_jax.ops.scan import scan_elementwise

# Defaults from the H200 sweep of experiments/kernel_dev/bench_chunked.py (experiments/perf_notes.md; 32768 tokens,
# 8 heads, d_qk = d_v = 64, fwd+bwd): C = 64 / c = 16 11.6 ms at L = 1024 and 8192; c = 32 ~19.9 ms (the per-channel
# diagonal dominates); C = 128 2% faster but 6% more memory and longer compiles; sequential carry +1.5 ms at L = 8192.
DEFAULT_CHUNK_SIZE = 64  # multi-head outer chunk C
SUB_BLOCK = 16  # multi-head sub-block c; chunk sizes above it are rounded up to a multiple of it
CARRY = "associative"  # "associative" (jax.lax.associative_scan over chunks) or "sequential" (jax.lax.scan)
# Precision of the real matrix products (accumulation is float32 either way). HIGHEST keeps float32 operands (no tf32
# on GPU), which the oracle tolerances need; DEFAULT lets the backend use tf32 (H200: 3% faster, 300x the error).
MATMUL_PRECISION = jax.lax.Precision.HIGHEST


def _pad_time(x, pad, value=0.0):
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


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


def _carry_states_associative(transitions, increments, h0):
    """Same contract as _carry_states, by jax.lax.associative_scan over the chunk axis (depth log(t / C))."""

    def combine(x, y):
        (a1, s1), (a2, s2) = x, y
        return a2 * a1, a2[..., None] * s1 + s2

    cum_a, local = jax.lax.associative_scan(combine, (transitions, increments), axis=2)
    ends = local + cum_a[..., None] * h0[:, :, None]  # state at the end of each chunk
    starts = jnp.concatenate([h0[:, :, None], ends[:, :, :-1]], axis=2)
    return starts, ends[:, :, -1]


def _resolve_sizes(t, chunk_size, sub_block):
    """(outer chunk C, sub-block c): C = min(chunk_size, t) rounded up to a multiple of c when C > c, else c = C."""
    chunk = min(chunk_size, t)
    if chunk <= sub_block:
        return chunk, chunk
    return -(-chunk // sub_block) * sub_block, sub_block


def gateloop_chunked(q, k, v, log_r, theta, h0, chunk_size=None, reset=None):
    """Same contract as ops.scan.gateloop_scan. Lengths that are not a multiple of chunk_size are padded internally
    with identity steps (a = 1, k = v = 0), which change neither the outputs nor the final state.

    chunk_size is the outer chunk C (default DEFAULT_CHUNK_SIZE multi-head, 256 max-headed), capped at the length;
    multi-head chunks longer than SUB_BLOCK are rounded up to a multiple of it. q, k, v are used in float32.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    elementwise = dk == 1 and dv == 1
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE if not elementwise else 256
    if elementwise:
        chunk_size, sub_block = min(chunk_size, t), None
    else:
        chunk_size, sub_block = _resolve_sizes(t, chunk_size, SUB_BLOCK)
    pad = -t % chunk_size
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    if reset is not None and not elementwise:
        # The masks below do the reset; the start's own gate only enters sums of masked terms. Neutral (a = 1) there,
        # its gradients are exactly 0 (as the oracle's), not the rounding noise of terms that cancel.
        start = reset[:, :, None, None]
        log_r, theta = jnp.where(start, 0.0, log_r), jnp.where(start, 0.0, theta)
    if pad:
        q, k, v, log_r, theta = (_pad_time(x, pad) for x in (q, k, v, log_r, theta))
        if reset is not None:
            reset = jnp.pad(reset, ((0, 0), (0, pad)))
    if h0 is None:
        h0 = jnp.zeros((b, h, dk, dv), jnp.complex64)
    if elementwise:
        y, final = _chunked_elementwise(q, k, v, log_r, theta, h0, chunk_size, reset)
    else:
        y, final = _chunked_matrix(q, k, v, log_r, theta, h0, chunk_size, sub_block, reset)
    return y[:, :t], final


def _prefix_sum2(x, axis):
    """Inclusive prefix sums along axis as a double-float pair (hi, lo): hi + lo equals the exact sum of the float32
    inputs to ~eps^2, so differences hi_n - hi_m + (lo_n - lo_m) carry no cancellation error. lo has no gradient
    (its exact derivative is 0)."""

    def add(x1, x2):
        (h1, l1), (h2, l2) = x1, x2
        s = h1 + h2
        bb = s - h1
        err = (h1 - (s - bb)) + (h2 - bb)  # two-sum: s + err == h1 + h2 exactly
        return s, err + l1 + l2

    hi, lo = jax.lax.associative_scan(add, (x, jnp.zeros_like(x)), axis=axis)
    return hi, jax.lax.stop_gradient(lo)


def _exclusive_cumsum(x, axis):
    """out[j] = sum_{i < j} x[i] along axis."""
    if x.shape[axis] == 1:  # avoid a zero-size slice
        return jnp.zeros_like(x)
    sums = jax.lax.slice_in_dim(jnp.cumsum(x, axis=axis), 0, x.shape[axis] - 1, axis=axis)
    return jnp.concatenate([jnp.zeros_like(jax.lax.slice_in_dim(x, 0, 1, axis=axis)), sums], axis=axis)


def _chunked_matrix(q, k, v, log_r, theta, h0, chunk_size, sub_block, reset=None):
    """Multi-head chunked form with secondary chunking (module docstring). Shapes below: n chunks, nb = C / c
    sub-blocks per chunk, positions (c) inside a sub-block; i indexes query sub-blocks, j key sub-blocks."""
    b, tp, h, dk = q.shape
    dv = v.shape[-1]
    c = sub_block
    nb = chunk_size // c
    n = tp // chunk_size
    dot = lambda spec, *xs: jnp.einsum(spec, *xs, precision=MATMUL_PRECISION)

    def blocks(x):  # (b, t, h, d) -> (b, h, n, nb, c, d)
        return jnp.transpose(x.reshape(b, n, nb, c, h, x.shape[-1]), (0, 4, 1, 2, 3, 5))

    q, k, v, lr, th = (blocks(x) for x in (q, k, v, log_r, wrap_phase(theta)))

    # Within a sub-block: inclusive prefix (l_n - l_B, double-float) and phase, and the exclusive suffix to its end.
    l_hi, l_lo = _prefix_sum2(lr, axis=4)
    l_in = l_hi + l_lo  # <= 0: sum over the sub-block up to n
    phi = jnp.cumsum(th, axis=4)
    tail_r = reverse_exclusive_cumsum(lr, axis=4)  # <= 0: sum over (m, end of sub-block]
    tail_p = reverse_exclusive_cumsum(th, axis=4)
    # Sub-block totals, and their sums before / after each sub-block of the chunk (each a direct sum, no cancellation).
    tot_r = jnp.sum(lr, axis=4)  # (b, h, n, nb, k)
    tot_p = wrap_phase(jnp.sum(th, axis=4))
    pre_r, pre_p = _exclusive_cumsum(tot_r, 3), wrap_phase(_exclusive_cumsum(tot_p, 3))
    post_r = reverse_exclusive_cumsum(tot_r, axis=3)
    post_p = wrap_phase(reverse_exclusive_cumsum(tot_p, axis=3))

    # Diagonal sub-blocks: exact per-channel decay e^{l_n - l_m} cos(Phi_n - Phi_m) for m < n, masked before the exp;
    # m = n is q_n . k_n exactly (decay 1, no phase), so its (zero) derivative in log|a| and phase is exactly zero
    # rather than rounding noise of the size of the largest term.
    strict = jnp.tril(jnp.ones((c, c), dtype=bool), k=-1)[:, :, None]
    diff = (l_hi[..., :, None, :] - l_hi[..., None, :, :]) + (l_lo[..., :, None, :] - l_lo[..., None, :, :])
    decay = jnp.where(strict, jnp.exp(jnp.where(strict, diff, 0.0)), 0.0)  # (b, h, n, nb, c, c, k)
    # (A broadcast-multiply-sum over k instead of this einsum, with either the rotation identity or cos of the phase
    # difference, compiled to a gradient that segfaulted XLA:CPU at some shapes, jax 0.10.2.)
    weight = decay * jnp.cos(phi[..., :, None, :] - phi[..., None, :, :])  # |Phi| <= c pi inside a sub-block
    diag = dot("...nk,...mk,...nmk->...nm", q, k, weight)  # (b, h, n, nb, c, c)
    diag = diag + jnp.eye(c, dtype=diag.dtype) * jnp.sum(q * k, axis=-1)[..., :, None]

    # Off-diagonal sub-blocks, one row of key sub-blocks j < i per query sub-block i, relative to B_i.
    # Queries: q_n e^{l_n - l_B} [cos, sin](Phi_n - Phi_B).
    # Keys of sub-block j: k_m e^{l_B - l_m} [cos, -sin](Phi_B - Phi_m)
    # with l_B - l_m = tail_m + (totals of the sub-blocks strictly between j and i).
    q_off = q * jnp.exp(l_in)
    q_off = jnp.concatenate([q_off * jnp.cos(phi), q_off * jnp.sin(phi)], axis=-1)  # (b, h, n, nb, c, 2k)
    between_r = segsum(jnp.swapaxes(tot_r, -1, -2))  # (b, h, n, k, nb, nb): [i', j] = sum over (j, i']
    between_p = segsum(jnp.swapaxes(tot_p, -1, -2))
    rows = []
    for i in range(nb):
        parts = []
        if i:
            gap_r = jnp.swapaxes(between_r[..., i - 1, :i], -1, -2)[..., None, :]  # (b, h, n, i, 1, k), finite
            gap_p = jnp.swapaxes(wrap_phase(between_p[..., i - 1, :i]), -1, -2)[..., None, :]
            beta = tail_p[:, :, :, :i] + gap_p
            k_row = k[:, :, :, :i] * jnp.exp(tail_r[:, :, :, :i] + gap_r)
            k_row = jnp.concatenate([k_row * jnp.cos(beta), -k_row * jnp.sin(beta)], axis=-1)  # (b, h, n, i, c, 2k)
            k_row = k_row.reshape(b, h, n, i * c, 2 * dk)
            parts.append(dot("bhnqd,bhnmd->bhnqm", q_off[:, :, :, i], k_row))  # (b, h, n, c, i c)
        parts.append(diag[:, :, :, i])
        if i < nb - 1:
            parts.append(jnp.zeros((b, h, n, c, (nb - 1 - i) * c), diag.dtype))
        rows.append(jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0])
    scores = jnp.stack(rows, axis=3).reshape(b, h, n, chunk_size, chunk_size)  # block lower-triangular
    if reset is not None:
        # begun[b, j, n]: segment starts in chunk j up to position n inclusive; equal counts share a segment.
        begun = jnp.cumsum(reset.reshape(b, n, chunk_size), axis=-1)
        scores = jnp.where((begun[..., :, None] == begun[..., None, :])[:, None], scores, 0.0)
        per_row = lambda mask: mask.reshape(b, 1, n, nb, c, 1)  # noqa: E731 - (b, n, C) -> the blocks' layout
    v_chunk = v.reshape(b, h, n, chunk_size, dv)
    y = dot("bhnqm,bhnmv->bhnqv", scores, v_chunk)

    # What each chunk adds to the state, relative to its end: sum_m e^{(l_C - l_m) + i(Phi_C - Phi_m)} k_m^T v_m,
    # the exponent summed directly from the end (tail in the sub-block + totals of the later sub-blocks).
    to_end_r = tail_r + post_r[..., None, :]
    to_end_p = tail_p + post_p[..., None, :]
    k_end = k * jnp.exp(to_end_r)
    k_end = jnp.concatenate([k_end * jnp.cos(to_end_p), k_end * jnp.sin(to_end_p)], axis=-1)
    if reset is not None:  # keys followed by a segment start in their chunk do not reach its end state
        k_end = jnp.where(per_row(begun == begun[..., -1:]), k_end, 0.0)
    inc = dot("bhnmd,bhnmv->bhndv", k_end.reshape(b, h, n, chunk_size, 2 * dk), v_chunk)
    increments = jax.lax.complex(inc[..., :dk, :], inc[..., dk:, :])  # (b, h, n, k, v)
    transitions = polar_to_complex(jnp.sum(tot_r, axis=3), wrap_phase(jnp.sum(tot_p, axis=3)))  # (b, h, n, k)
    if reset is not None:  # a chunk holding a segment start passes nothing of its start state on
        transitions = jnp.where((begun[..., -1] == 0)[:, None, :, None], transitions, 0.0)
    carry = _carry_states_associative if CARRY == "associative" else _carry_states
    starts, final = carry(transitions, increments, h0)

    # Inter-chunk: Re(q_n diag(e^{l_n + i Phi_n}) H_start) with l, Phi from the chunk start: rotated queries against
    # the real and imaginary parts of the state, one product of width 2 d_qk.
    from_start_r = pre_r[..., None, :] + l_in
    from_start_p = pre_p[..., None, :] + phi
    q_start = q * jnp.exp(from_start_r)
    q_start = jnp.concatenate([q_start * jnp.cos(from_start_p), -q_start * jnp.sin(from_start_p)], axis=-1)
    if reset is not None:  # queries after a segment start in their chunk do not see the chunk-start state
        q_start = jnp.where(per_row(begun == 0), q_start, 0.0)
    state = jnp.concatenate([jnp.real(starts), jnp.imag(starts)], axis=-2)  # (b, h, n, 2k, v)
    y = y + dot("bhnqd,bhndv->bhnqv", q_start.reshape(b, h, n, chunk_size, 2 * dk), state)
    y = jnp.transpose(y, (0, 2, 3, 1, 4)).reshape(b, tp, h, dv)
    return y, final


def _chunked_elementwise(q, k, v, log_r, theta, h0, chunk_size, reset=None):
    """Max-headed: an associative scan inside each chunk, then a short sequential carry across chunks.

    Memory O(t) per channel like mode="scan", but the scan depth is log C and the carry touches t / C states.
    """
    b, tp, h, _ = q.shape
    n_chunks = tp // chunk_size
    a = polar_to_complex(log_r[..., 0], theta[..., 0])
    if reset is not None:  # a segment start: a = 0 exactly in the complex scans and products below
        a = jnp.where(reset[:, :, None], 0.0, a)
    a = a.reshape(b, n_chunks, chunk_size, h)
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
