"""mode="attention": the O(t^2) surrogate-attention form, in its stable log-space version.

y_n = Re(sum_{m<=n} q_n diag(prod_{j=m+1..n} a_j) k_m^T v_m). The textbook form ((Q * P)(K / P)^T * M) V with
P_n = prod_{j<=n} a_j over/underflows within ~100 steps in float32. Here every decay is exp(S[n, m]) with
S[n, m] = sum_{j=m+1..n} log|a_j| <= 0, summed per segment (ops.common.segsum) and masked to -inf above the diagonal
before the exp, so it is finite at any length. Phases are wrapped to [-pi, pi) before summing to keep sums small.
The decay depends on the key channel, so memory is t^2 * d_qk per head: a reference and small-length mode.
Segments (reset): pairs (n, m) of different segments, and the carried state beyond the first segment, are masked to 0
after the (finite) decays are formed, so the log-space sums themselves are untouched.
"""

from __future__ import annotations

import jax.numpy as jnp

from gateloop_jax.ops.common import segsum, wrap_phase


def gateloop_attention(q, k, v, log_r, theta, h0, reset=None):
    """Same contract as ops.scan.gateloop_scan."""
    theta = wrap_phase(theta)
    # (b, t, h, k) -> (b, h, k, t): the segment sums run over the last axis.
    log_r_t = jnp.transpose(log_r, (0, 2, 3, 1))
    theta_t = jnp.transpose(theta, (0, 2, 3, 1))
    seg_r = segsum(log_r_t)  # (b, h, k, n, m), -inf where m > n
    # Phases carry no -inf; the magnitude's exp(-inf) = 0 masks them. Unmasked phases keep cos() NaN-free.
    seg_theta = jnp.where(jnp.isfinite(seg_r), segsum(theta_t), 0.0)
    decay = jnp.exp(seg_r) * jnp.cos(seg_theta)
    scores = jnp.einsum("bnhk,bmhk,bhknm->bhnm", q, k, decay)
    if reset is not None:
        segment = jnp.cumsum(reset, axis=1)  # (b, t): the segment index of each position within its row
        scores = jnp.where((segment[:, :, None] == segment[:, None, :])[:, None], scores, 0.0)
    y = jnp.einsum("bhnm,bmhv->bnhv", scores, v)

    # Final state: H_t = prod_all a * H_0 + sum_m exp(S[t, m]) e^{i Theta[t, m]} k_m^T v_m (last row of the segsums).
    last_r = seg_r[..., -1, :]  # (b, h, k, m)
    last_theta = seg_theta[..., -1, :]
    weight = jnp.exp(last_r)
    if reset is not None:  # only the last segment's keys reach the final state
        weight = jnp.where((segment == segment[:, -1:])[:, None, None, :], weight, 0.0)
    kv_re = jnp.einsum("bhkm,bmhk,bmhv->bhkv", weight * jnp.cos(last_theta), k, v)
    kv_im = jnp.einsum("bhkm,bmhk,bmhv->bhkv", weight * jnp.sin(last_theta), k, v)
    final = kv_re + 1j * kv_im

    if h0 is not None:
        # Contribution of the carried state: Re(q_n diag(e^{L_n + i Phi_n}) H_0), L and Phi inclusive prefix sums
        # from the start (L <= 0, so the factor is bounded).
        cum_r = jnp.cumsum(log_r, axis=1)
        cum_theta = jnp.cumsum(theta, axis=1)
        scale = q * jnp.exp(cum_r)
        if reset is not None:  # the carried state reaches the first segment only
            scale = jnp.where((segment == 0)[:, :, None, None], scale, 0.0)
        y = y + jnp.einsum("bthk,bhkv->bthv", scale * jnp.cos(cum_theta), jnp.real(h0))
        y = y - jnp.einsum("bthk,bhkv->bthv", scale * jnp.sin(cum_theta), jnp.imag(h0))
        total = jnp.exp(cum_r[:, -1] + 1j * cum_theta[:, -1])  # (b, h, k)
        if reset is not None:
            total = jnp.where((segment[:, -1] == 0)[:, None, None], total, 0.0)
        final = final + total[..., None] * h0
    return y, final.astype(jnp.complex64)
