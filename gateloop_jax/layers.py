"""Small Flax NNX modules: the GateLoop mixer, causal self-attention, feed-forward, and the residual block.

Shape legend: b batch, t length, d d_model, h heads, k d_qk, v d_v, f mlp_dim, V vocab.
Every mixer implements the same protocol, so the LM shell and the decoder are shared by all architectures:
  __call__(x, *, mask=None, mode=None, segment_ids=None) -> y                 x, y: (b, t, d)
  init_cache(batch_size, max_len) -> cache
  prefill(x, *, mask=None, mode=None, max_len, segment_ids=None) -> (y, cache)
  step(x_t, cache) -> (y_t, cache)                                            x_t, y_t: (b, d)
`mask` (b, t) marks real tokens; padded positions must come after the real ones of their row (right padding).
`segment_ids` (b, t) int packs several documents into one row: a new segment starts wherever the id differs from the
previous position, and each segment is mixed as if it were alone (the recurrence restarts, attention stays inside it,
RoPE positions restart). After a prefill, step() continues the row's last segment.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from gateloop_jax import context_parallel, ops
from gateloop_jax.model_config import ModelConfig
from gateloop_jax.ops.common import segment_starts
from gateloop_jax.sharding import BATCH, EMBED, HEADS, LENGTH, MLP, QK, V, constrain, map_over_batch_and_heads


# ----------------------------------------------------------------------------------------------------------------
# Packed rows: segment boundaries as pure functions of segment_ids (b, t); ops.common.segment_starts marks where the
# id changes (never at position 0, where every row's first segment begins anyway).


def segment_start_index(segment_ids: jax.Array) -> jax.Array:
    """(b, t) int32: the index where each position's segment begins."""
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    return jax.lax.cummax(jnp.where(segment_starts(segment_ids), index, 0), axis=1)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """(b, t) int32: each position's index within its own segment (the RoPE positions of a packed row)."""
    return jnp.arange(segment_ids.shape[1], dtype=jnp.int32) - segment_start_index(segment_ids)


def same_segment(segment_ids: jax.Array) -> jax.Array:
    """(b, t, t) bool: query i and key j lie in the same segment. Compares segment ordinals rather than the ids
    themselves, so a row whose ids repeat (1, 1, 2, 1) still has three separate segments."""
    ordinal = jnp.cumsum(segment_starts(segment_ids), axis=1)
    return ordinal[:, :, None] == ordinal[:, None, :]


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """y_n = sum_j kernel_j x_{n-j} per channel, over the taps j < w that stay inside the row (and, with
    segment_ids, inside position n's segment). x: (b, t, h, c); kernel: (w, h, c), tap 0 the current position."""
    t = x.shape[1]
    kernel = kernel.astype(x.dtype)
    positions = jnp.arange(t, dtype=jnp.int32)
    start = None if segment_ids is None else segment_start_index(segment_ids)
    y = x * kernel[0]
    for j in range(1, min(kernel.shape[0], t)):  # a tap longer than the row sees only zeros
        shifted = jnp.pad(x, ((0, 0), (j, 0), (0, 0), (0, 0)))[:, :t]
        if start is not None:
            shifted = jnp.where((positions - j >= start)[:, :, None, None], shifted, 0)
        y = y + shifted * kernel[j]
    return y


def conv_history(x: jax.Array, width: int, lengths: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """The last `width` inputs of each row before position lengths (b,), oldest first, zero where they lie before
    the row (or before its last segment): the decode cache of causal_depthwise_conv. x: (b, t, h, c)."""
    offsets = jnp.arange(width, dtype=jnp.int32) - width  # -width .. -1
    index = lengths[:, None].astype(jnp.int32) + offsets[None, :]  # (b, width)
    first = jnp.zeros_like(lengths, dtype=jnp.int32)
    if segment_ids is not None:
        last = jnp.clip(lengths - 1, 0, x.shape[1] - 1).astype(jnp.int32)
        first = jnp.take_along_axis(segment_start_index(segment_ids), last[:, None], axis=1)[:, 0]
    valid = index >= first[:, None]
    gathered = jnp.take_along_axis(x, jnp.clip(index, 0, x.shape[1] - 1)[:, :, None, None], axis=1)
    return jnp.where(valid[:, :, None, None], gathered, 0)


# ----------------------------------------------------------------------------------------------------------------
# The transition parametrisation: pure functions, shared by the mixer, its initialisers and the inspection tools.


def log_magnitude(gamma: jax.Array, activation: str, temperature: float) -> jax.Array:
    """log|a| from the gate pre-activation, computed in log space (exact where |a| itself would underflow)."""
    if activation == "sigmoid":
        return -jax.nn.softplus(-gamma)
    if activation == "sigmoid_tempered":
        return -jax.nn.softplus(-gamma) / temperature
    if activation == "lru_exp":
        return -jnp.exp(gamma)
    raise ValueError(f"magnitude_activation={activation!r} is not supported.")


def inverse_log_magnitude(log_r: jax.Array, activation: str, temperature: float) -> jax.Array:
    """The gamma with log_magnitude(gamma) = log_r (for initialisation)."""
    if activation == "sigmoid_tempered":
        log_r = log_r * temperature
        activation = "sigmoid"
    if activation == "sigmoid":
        return log_r - jnp.log(-jnp.expm1(log_r))  # logit(r)
    if activation == "lru_exp":
        return jnp.log(-log_r)
    raise ValueError(f"magnitude_activation={activation!r} is not supported.")


def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
    """x in the forward pass (exactly); the gradient flowing back through it multiplied by `scale`."""
    if scale == 1.0:
        return x
    frozen = jax.lax.stop_gradient(x)
    return frozen + scale * (x - frozen)


def phase(theta: jax.Array, activation: str) -> jax.Array:
    if activation == "identity":
        return theta
    if activation == "tanh_pi":
        return jnp.pi * jnp.tanh(theta)
    raise ValueError(f"phase_activation={activation!r} is not supported.")


def inverse_phase(phi: jax.Array, activation: str) -> jax.Array:
    if activation == "identity":
        return phi
    return jnp.arctanh(jnp.clip(phi / jnp.pi, -0.999, 0.999))


def transition_bias_init(config: ModelConfig):
    """Initialisers (key, shape, dtype) for the gamma and theta biases, per config.init."""
    lo, hi = config.init_min_magnitude, config.init_max_magnitude

    def gamma_init(key, shape, dtype=jnp.float32):
        if config.init == "default":
            return jnp.zeros(shape, dtype)
        if config.init == "slow_forget":
            # Memory timescales -1/log|a| log-uniform between those of lo and hi (10 to 1000 steps by default).
            t_lo, t_hi = -1.0 / math.log(lo), -1.0 / math.log(hi)
            timescale = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(t_lo), math.log(t_hi)))
            log_r = -1.0 / timescale
        else:  # lru_ring: |a|^2 uniform on the ring [lo^2, hi^2].
            log_r = 0.5 * jnp.log(jax.random.uniform(key, shape, jnp.float32, lo * lo, hi * hi))
        return inverse_log_magnitude(log_r, config.magnitude_activation, config.magnitude_temperature).astype(dtype)

    def theta_init(key, shape, dtype=jnp.float32):
        if config.init == "default":
            return jnp.zeros(shape, dtype)
        max_phase = config.init_max_phase if config.init == "slow_forget" else 2.0 * math.pi
        phi = jax.random.uniform(key, shape, jnp.float32, 0.0, max_phase)
        return inverse_phase(phi, config.phase_activation).astype(dtype)

    return gamma_init, theta_init


def _dtype(name: str):
    return jnp.dtype(name)


def _projection(einsum: str, shape, axes, config: ModelConfig, rngs: nnx.Rngs, *, bias_shape=None, scale=1.0,
                bias_init=nnx.initializers.zeros_init()):
    """nnx.Einsum with logical-axis sharding metadata; `scale` shrinks the initial weights' variance."""
    kernel_init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                                    in_axis=0 if einsum.startswith("btd") else (0, 1),
                                                    out_axis=tuple(range(1, len(shape))) if einsum.startswith("btd")
                                                    else -1)
    return nnx.Einsum(
        einsum,
        kernel_shape=shape,
        bias_shape=bias_shape,
        dtype=_dtype(config.dtype),
        param_dtype=_dtype(config.param_dtype),
        kernel_init=nnx.with_partitioning(kernel_init, axes),
        bias_init=nnx.with_partitioning(bias_init, axes[-len(bias_shape):] if bias_shape else ()),
        rngs=rngs,
    )


class GateLoopMixer(nnx.Module):
    """q, k, v, gamma, theta projections -> GateLoop recurrence -> output norm -> SiLU gate -> output projection."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h = config.d_model, config.num_heads
        dk, dv = config.head_dims
        bias = (h, dk) if config.use_bias else None
        bias_v = (h, dv) if config.use_bias else None
        self.q_proj = _projection("btd,dhk->bthk", (d, h, dk), (EMBED, HEADS, QK), config, rngs, bias_shape=bias)
        self.k_proj = _projection("btd,dhk->bthk", (d, h, dk), (EMBED, HEADS, QK), config, rngs, bias_shape=bias)
        self.v_proj = _projection("btd,dhv->bthv", (d, h, dv), (EMBED, HEADS, V), config, rngs, bias_shape=bias_v)
        # The short convolutions' taps, PyTorch Conv1d's default init (uniform in +-1/sqrt(taps)).
        self.q_conv = self.k_conv = self.v_conv = nnx.data(None)
        if config.short_conv_size:
            w = config.short_conv_size
            conv_init = nnx.initializers.uniform(2.0 / math.sqrt(w))

            def taps(width, axis):
                kernel = conv_init(rngs.params(), (w, h, width), _dtype(config.param_dtype)) - 1.0 / math.sqrt(w)
                return nnx.Param(kernel, out_sharding=(None, HEADS, axis))

            self.q_conv, self.k_conv, self.v_conv = taps(dk, QK), taps(dk, QK), taps(dv, V)
        gamma_init, theta_init = transition_bias_init(config)
        # The data-dependent part of the transition starts small (weights at 1% of the usual variance) unless
        # init="default", so the biases set the initial memory timescales and phases.
        scale = 1.0 if config.init == "default" else 0.01
        # Optional sub-modules are wrapped in nnx.data so that None and a module share one pytree status.
        self.gamma_proj = self.theta_proj = nnx.data(None)
        self.gamma_bias = self.theta_bias = nnx.data(None)
        if config.transition in ("data_controlled", "real"):
            self.gamma_proj = _projection("btd,dhk->bthk", (d, h, dk), (EMBED, HEADS, QK), config, rngs,
                                          bias_shape=(h, dk), scale=scale, bias_init=gamma_init)
        if config.transition == "data_controlled":
            self.theta_proj = _projection("btd,dhk->bthk", (d, h, dk), (EMBED, HEADS, QK), config, rngs,
                                          bias_shape=(h, dk), scale=scale, bias_init=theta_init)
        if config.transition == "fixed":
            self.gamma_bias = nnx.Param(gamma_init(rngs.params(), (h, dk)), out_sharding=(HEADS, QK))
            self.theta_bias = nnx.Param(theta_init(rngs.params(), (h, dk)), out_sharding=(HEADS, QK))
        self.norm = nnx.data(None)
        if config.output_norm == "layernorm":
            self.norm = nnx.LayerNorm(h * dv, dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype),
                                      rngs=rngs)
        elif config.output_norm == "groupnorm":
            self.norm = nnx.GroupNorm(h * dv, num_groups=h, dtype=_dtype(config.dtype),
                                      param_dtype=_dtype(config.param_dtype), rngs=rngs)
        self.gate_proj = nnx.data(None)
        if config.output_gate:
            self.gate_proj = _projection("btd,dhv->bthv", (d, h, dv), (EMBED, HEADS, V), config, rngs,
                                         bias_shape=bias_v)
        self.out_proj = _projection("bthv,hvd->btd", (h, dv, d), (HEADS, V, EMBED), config, rngs,
                                    bias_shape=(d,) if config.use_bias else None)

    # -- pieces ------------------------------------------------------------------------------------------------
    def transition(self, x: jax.Array) -> ops.PolarTransition:
        """(log|a|, arg a), each (b, t, h, k) float32, for inputs x (b, t, d)."""
        config = self.config
        b, t, _ = x.shape
        shape = (b, t, config.num_heads, config.head_dims[0])
        zeros = jnp.zeros(shape, jnp.float32)
        if config.transition == "none":
            return ops.PolarTransition(zeros, zeros)
        if config.transition == "fixed":
            gamma = jnp.broadcast_to(self.gamma_bias[...].astype(jnp.float32), shape)
            theta = jnp.broadcast_to(self.theta_bias[...].astype(jnp.float32), shape)
        else:
            gamma = self.gamma_proj(x).astype(jnp.float32)
            theta = None
            if self.theta_proj is not None:
                theta = self.theta_proj(scale_gradient(x, config.phase_input_grad)).astype(jnp.float32)
        log_r = log_magnitude(gamma, config.magnitude_activation, config.magnitude_temperature)
        phi = zeros if theta is None else phase(theta, config.phase_activation)
        if theta is not None and config.phase_coupling == "decay":
            phi = phi * -log_r
        if theta is not None and config.phased_channels < shape[-1]:
            phi = jnp.where(jnp.arange(shape[-1]) < config.phased_channels, phi, 0.0)
        return ops.PolarTransition(log_r, phi)

    def _projections(self, x):
        """q, k, v before the short convolution: (b, t, h, k), (b, t, h, k), (b, t, h, v)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _short_conv(self, projections, segment_ids=None):
        """The short convolution then SiLU on (q, k, v) before the recurrence; the identity without one."""
        if not self.config.short_conv_size:
            return projections
        kernels = (self.q_conv[...], self.k_conv[...], self.v_conv[...])
        return tuple(jax.nn.silu(causal_depthwise_conv(z, kernel, segment_ids))
                     for z, kernel in zip(projections, kernels))

    def _inputs(self, x, mask, qkv):
        """(q, k, v, a) of the recurrence from x (b, t, d) and the convolved projections qkv (_short_conv)."""
        dk = self.config.head_dims[0]
        q, k, v = qkv
        q = q * (dk ** -0.5)
        a = self.transition(x)
        if mask is not None:
            # Padded positions become identity steps (a = 1, k = 0): they leave the state untouched, so the state
            # after a right-padded row equals the state at that row's last real token.
            keep = mask[:, :, None, None]
            k = jnp.where(keep, k, 0)
            a = ops.PolarTransition(jnp.where(keep, a.log_magnitude, 0.0), jnp.where(keep, a.phase, 0.0))
        q, k, v = (constrain(z, (BATCH, LENGTH, HEADS, None)) for z in (q, k, v))
        return q, k, v, a

    def _output(self, x, y):
        b, t, h, dv = y.shape
        if self.norm is not None:
            y = self.norm(y.reshape(b, t, h * dv)).reshape(b, t, h, dv)
        if self.gate_proj is not None:
            y = y * jax.nn.silu(self.gate_proj(x))
        return constrain(self.out_proj(y), (BATCH, LENGTH, None))

    # -- the mixer protocol ----------------------------------------------------------------------------------------
    def _recurrence(self, q, k, v, a, mode, return_state=False, segment_ids=None):
        """ops.gateloop; a kernel mode (a pallas_call XLA cannot partition) runs per (batch, head) shard, and a length
        split over the mesh (context parallelism) per (batch, length, head) shard."""
        mode = mode or self.config.mode
        resolved = ops.resolve_mode(mode, q.shape, v.shape)
        # config.chunk_size is for the chunked modes; a run whose mode (given, or what "auto" resolved to on this
        # platform and shape, or the eval / prefill override) does not chunk ignores it (ModelConfig.chunk_size).
        chunk_size = self.config.chunk_size if resolved in ops.CHUNKED_MODES else None
        if context_parallel.sequence_axes()[0] is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids with a length split over the mesh (mesh.sequence > 1) is not supported; "
                                 "set mesh.sequence=1 or train without packed documents.")
            return context_parallel.gateloop(q, k, v, a, mode=mode, chunk_size=chunk_size,
                                             return_state=return_state)

        def fn(q, k, v, a, *segments):
            # segment_ids only when given, so a row without segments traces exactly the unsegmented op.
            kw = {"segment_ids": segments[0]} if segments else {}
            return ops.gateloop(q, k, v, a, mode=mode, chunk_size=chunk_size, return_state=return_state, **kw)

        args = (q, k, v, a) + (() if segment_ids is None else (segment_ids,))
        if resolved not in ops.KERNEL_MODES:
            return fn(*args)
        out_kinds = ("sequence", "state") if return_state else ("sequence",)
        return map_over_batch_and_heads(fn, *args, out_kinds=out_kinds)

    def __call__(self, x, *, mask=None, mode=None, segment_ids=None):
        q, k, v, a = self._inputs(x, mask, self._short_conv(self._projections(x), segment_ids))
        return self._output(x, self._recurrence(q, k, v, a, mode, segment_ids=segment_ids))

    def init_cache(self, batch_size: int, max_len: int | None = None):
        """The recurrent state (b, h, k, v) complex64, O(1) in the length; with a short convolution a dict that also
        holds the last short_conv_size - 1 inputs of q, k and v (b, w - 1, h, k|v), oldest first."""
        del max_len
        dk, dv = self.config.head_dims
        state = jnp.zeros((batch_size, self.config.num_heads, dk, dv), jnp.complex64)
        if not self.config.short_conv_size:
            return state
        shape = (batch_size, self.config.short_conv_size - 1, self.config.num_heads)
        history = tuple(jnp.zeros(shape + (width,), _dtype(self.config.dtype)) for width in (dk, dk, dv))
        return {"state": state, "conv": history}

    def prefill(self, x, *, mask=None, mode=None, max_len=None, segment_ids=None):
        del max_len
        projections = self._projections(x)
        q, k, v, a = self._inputs(x, mask, self._short_conv(projections, segment_ids))
        # The final state is the last segment's (ops.gateloop), so decoding continues that segment.
        y, state = self._recurrence(q, k, v, a, mode, return_state=True, segment_ids=segment_ids)
        if not self.config.short_conv_size:
            return self._output(x, y), state
        b, t, _ = x.shape
        lengths = jnp.full((b,), t, jnp.int32) if mask is None else jnp.sum(mask, axis=1, dtype=jnp.int32)
        width = self.config.short_conv_size - 1
        history = tuple(conv_history(z, width, lengths, segment_ids) for z in projections)
        return self._output(x, y), {"state": state, "conv": history}

    def step(self, x_t, cache):
        x = x_t[:, None, :]
        projections = self._projections(x)
        if not self.config.short_conv_size:
            qkv, state = projections, cache
        else:
            # The cached inputs and this token's, (b, w, h, c) oldest first; the convolution's last position is this
            # token's.
            windows = tuple(jnp.concatenate([past, now.astype(past.dtype)], axis=1)
                            for past, now in zip(cache["conv"], projections))
            qkv, state = tuple(z[:, -1:] for z in self._short_conv(windows)), cache["state"]
        q, k, v, a = self._inputs(x, None, qkv)
        y_t, state = ops.gateloop_step(q[:, 0], k[:, 0], v[:, 0],
                                       ops.PolarTransition(a.log_magnitude[:, 0], a.phase[:, 0]), state)
        if self.config.short_conv_size:
            state = {"state": state, "conv": tuple(window[:, 1:] for window in windows)}
        return self._output(x, y_t[:, None])[:, 0], state


def rope(x: jax.Array, positions: jax.Array, base: float, rotary_dims: int | None = None) -> jax.Array:
    """Rotary position embedding on the first `rotary_dims` channels (all by default; GPT-NeoX's partial rotary).

    x: (b, t, h, k); positions: (b, t) int; rotary_dims even, <= k. The other channels pass through unrotated.
    """
    rotary_dims = x.shape[-1] if rotary_dims is None else rotary_dims
    if rotary_dims == 0:
        return x
    half = rotary_dims // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None, None].astype(jnp.float32) * freqs  # (b, t, 1, half)
    x1, x2 = jnp.split(x[..., :rotary_dims].astype(jnp.float32), 2, axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([rotated, x[..., rotary_dims:]], axis=-1)


class CausalSelfAttention(nnx.Module):
    """Softmax attention with RoPE through jax.nn.dot_product_attention; a KV cache for decoding."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, h = config.d_model, config.num_heads
        dk, dv = config.head_dims
        if dk % 2:
            raise ValueError(f"model config: RoPE needs an even d_qk, got d_qk={dk}.")
        bias = (h, dk) if config.use_bias else None
        bias_v = (h, dv) if config.use_bias else None
        self.q_proj = _projection("btd,dhk->bthk", (d, h, dk), (EMBED, HEADS, QK), config, rngs, bias_shape=bias)
        self.k_proj = _projection("btd,dhk->bthk", (d, h, dk), (EMBED, HEADS, QK), config, rngs, bias_shape=bias)
        self.v_proj = _projection("btd,dhv->bthv", (d, h, dv), (EMBED, HEADS, V), config, rngs, bias_shape=bias_v)
        self.out_proj = _projection("bthv,hvd->btd", (h, dv, d), (HEADS, V, EMBED), config, rngs,
                                    bias_shape=(d,) if config.use_bias else None)

    def _implementation(self):
        impl = self.config.attention_impl
        return None if impl == "auto" else impl

    def _qkv(self, x, positions):
        rotary = self.config.rotary_channels
        q = rope(self.q_proj(x), positions, self.config.rope_base, rotary)
        k = rope(self.k_proj(x), positions, self.config.rope_base, rotary)
        return q, k, self.v_proj(x)

    def _attend(self, x, segment_ids):
        """(q, k, v, y) of causal self-attention over x (b, t, d); with segment_ids, within each segment only."""
        b, t, _ = x.shape
        if segment_ids is None:
            q, k, v = self._qkv(x, jnp.broadcast_to(jnp.arange(t), (b, t)))
            y = context_parallel.causal_attention(q, k, v, implementation=self._implementation())
        else:
            # jax.nn.dot_product_attention has no segment-id argument: a (b, 1, t, t) block-diagonal mask, ANDed
            # with the causal one. It costs what the t x t logits already cost.
            q, k, v = self._qkv(x, segment_positions(segment_ids))
            y = jax.nn.dot_product_attention(q, k, v, mask=same_segment(segment_ids)[:, None], is_causal=True,
                                             implementation=self._implementation())
        return q, k, v, y

    def __call__(self, x, *, mask=None, mode=None, segment_ids=None):
        del mode, mask  # Right padding never influences earlier (real) positions under a causal mask.
        y = self._attend(x, segment_ids)[-1]
        return constrain(self.out_proj(y), (BATCH, LENGTH, None))

    def init_cache(self, batch_size: int, max_len: int | None = None):
        if max_len is None:
            raise ValueError("CausalSelfAttention.init_cache: max_len is required for the KV cache.")
        dk, dv = self.config.head_dims
        h, dtype = self.config.num_heads, _dtype(self.config.dtype)
        return {
            "k": jnp.zeros((batch_size, max_len, h, dk), dtype),
            "v": jnp.zeros((batch_size, max_len, h, dv), dtype),
            "length": jnp.zeros((batch_size,), jnp.int32),
            # Where the row's current segment begins: decoding attends to keys in [start, length) only.
            "start": jnp.zeros((batch_size,), jnp.int32),
        }

    def prefill(self, x, *, mask=None, mode=None, max_len=None, segment_ids=None):
        b, t, _ = x.shape
        if max_len is None or max_len < t:
            raise ValueError(
                f"prefill: max_len={max_len} must be given and cover the prompt ({t}) plus the tokens to decode: "
                "the KV cache has a fixed size.")
        _, k, v, y = self._attend(x, segment_ids)
        cache = self.init_cache(b, max_len)
        cache["k"] = cache["k"].at[:, :t].set(k.astype(cache["k"].dtype))
        cache["v"] = cache["v"].at[:, :t].set(v.astype(cache["v"].dtype))
        cache["length"] = (jnp.full((b,), t, jnp.int32) if mask is None else mask.sum(-1).astype(jnp.int32))
        if segment_ids is not None:  # the segment of each row's last real token
            last = jnp.maximum(cache["length"] - 1, 0)[:, None]
            cache["start"] = jnp.take_along_axis(segment_start_index(segment_ids), last, axis=1)[:, 0]
        return self.out_proj(y), cache

    def step(self, x_t, cache):
        length, start = cache["length"], cache["start"]  # (b,): where this token goes / its segment begins, per row
        q, k, v = self._qkv(x_t[:, None, :], (length - start)[:, None])
        write = jax.vmap(lambda buf, new, pos: jax.lax.dynamic_update_slice_in_dim(buf, new, pos, axis=0))
        cache = {
            "k": write(cache["k"], k.astype(cache["k"].dtype), length),
            "v": write(cache["v"], v.astype(cache["v"].dtype), length),
            "length": length + 1,
            "start": start,
        }
        index = jnp.arange(cache["k"].shape[1])
        visible = (index >= start[:, None]) & (index <= length[:, None])  # (b, max_len)
        y = jax.nn.dot_product_attention(q, cache["k"], cache["v"], mask=visible[:, None, None, :],
                                         implementation="xla")
        return self.out_proj(y)[:, 0], cache


class FeedForward(nnx.Module):
    """Point-wise feed-forward: GELU (d -> f -> d, the paper's) or SwiGLU."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        d, f = config.d_model, config.hidden_dim
        kw = dict(dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype), rngs=rngs)
        init = nnx.initializers.lecun_normal()
        use_bias = config.ffn == "gelu"
        self.up = nnx.Linear(d, f, use_bias=use_bias, kernel_init=nnx.with_partitioning(init, (EMBED, MLP)),
                             bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (MLP,)), **kw)
        self.gate = nnx.data(None)
        if config.ffn == "swiglu":
            self.gate = nnx.Linear(d, f, use_bias=False, kernel_init=nnx.with_partitioning(init, (EMBED, MLP)), **kw)
        self.down = nnx.Linear(f, d, use_bias=use_bias, kernel_init=nnx.with_partitioning(init, (MLP, EMBED)),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (EMBED,)), **kw)

    def __call__(self, x):
        hidden = self.up(x)
        hidden = jax.nn.gelu(hidden) if self.gate is None else jax.nn.silu(self.gate(x)) * hidden
        return self.down(constrain(hidden, (BATCH, LENGTH, MLP)))


class Block(nnx.Module):
    """Mixer and feed-forward, each with a residual connection, LayerNorm (pre or post) and dropout."""

    def __init__(self, config: ModelConfig, mixer_cls, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=_dtype(config.dtype), param_dtype=_dtype(config.param_dtype), rngs=rngs)
        self.mixer_norm = nnx.LayerNorm(config.d_model, **kw)
        self.mixer = mixer_cls(config, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(config.d_model, **kw)
        self.ffn = FeedForward(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout_rate, rngs=rngs)

    def _residual(self, x, norm, fn, deterministic):
        if self.config.norm_position == "pre":
            out = fn(norm(x))
            return x + self.dropout(out, deterministic=deterministic), out
        out = fn(x)
        return norm(x + self.dropout(out, deterministic=deterministic)), out

    def __call__(self, x, *, mask=None, mode=None, deterministic=True, segment_ids=None):
        mix = lambda z: self.mixer(z, mask=mask, mode=mode, segment_ids=segment_ids)  # noqa: E731
        x, _ = self._residual(x, self.mixer_norm, mix, deterministic)
        x, _ = self._residual(x, self.ffn_norm, self.ffn, deterministic)
        return x

    def prefill(self, x, *, mask=None, mode=None, max_len=None, segment_ids=None):
        caches = []

        def mix(z):
            y, cache = self.mixer.prefill(z, mask=mask, mode=mode, max_len=max_len, segment_ids=segment_ids)
            caches.append(cache)
            return y

        x, _ = self._residual(x, self.mixer_norm, mix, True)
        x, _ = self._residual(x, self.ffn_norm, self.ffn, True)
        return x, caches[0]

    def step(self, x_t, cache):
        caches = []

        def mix(z):
            y, new_cache = self.mixer.step(z, cache)
            caches.append(new_cache)
            return y

        x_t, _ = self._residual(x_t, self.mixer_norm, mix, True)
        x_t, _ = self._residual(x_t, self.ffn_norm, self.ffn, True)
        return x_t, caches[0]
