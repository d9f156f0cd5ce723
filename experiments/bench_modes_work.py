"""What bench_modes.py times: the inputs, the op and layer functions (fwd, fwd+bwd), the settings' shapes.

Shape legend: b batch, t length, h heads, k d_qk, v d_v.
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_modes_peers import PEERS_SOFTMAX, csv  # noqa: E402


def setting_dims(args, setting: str) -> dict[str, int]:
    if setting == "multihead":
        return {"heads": args.heads, "d_qk": args.d_head, "d_v": args.d_head, "d_model": args.heads * args.d_head}
    if setting == "maxheaded":
        return {"heads": args.d_model, "d_qk": 1, "d_v": 1, "d_model": args.d_model}
    raise ValueError(f"--settings: unknown setting {setting!r}; choose multihead or maxheaded.")


@functools.lru_cache(maxsize=None)
def _jit_maker(kind: str, b: int, t: int, h: int, dk: int, dv: int, dtype: str):
    """One jitted input generator per shape (a fresh closure per call would recompile every time)."""
    import jax
    import jax.numpy as jnp

    def make_op(key):
        kq, kk, kv, kg, kp, kd = jax.random.split(key, 6)
        qk_shape, v_shape = (b, t, h, dk), (b, t, h, dv)
        return {
            "q": (jax.random.normal(kq, qk_shape, jnp.float32) * dk**-0.5).astype(dtype),
            "k": jax.random.normal(kk, qk_shape, jnp.float32).astype(dtype),
            "v": jax.random.normal(kv, v_shape, jnp.float32).astype(dtype),
            "log_magnitude": -jax.nn.softplus(-jax.random.uniform(kg, qk_shape, jnp.float32, 0.0, 6.0)),
            "phase": jax.random.uniform(kp, qk_shape, jnp.float32, -jnp.pi, jnp.pi),
            "dy": jax.random.normal(kd, v_shape, jnp.float32).astype(dtype),
        }

    def make_layer(key):
        kx, kd = jax.random.split(key)
        return {
            "x": jax.random.normal(kx, (b, t, dk), jnp.float32).astype(dtype),
            "dy": jax.random.normal(kd, (b, t, dk), jnp.float32).astype(dtype),
        }

    return jax.jit(make_op if kind == "op" else make_layer)


def op_inputs(
    seed: int, b: int, t: int, dims: dict, dtype: str, gates_file: str = "", segment_length: int = 0
) -> dict:
    """Random op inputs on the device (never zeros): q (scaled by d_qk^-1/2), k, v, the cotangent dy in `dtype`;
    log|a| = log sigmoid(U[0, 6]) (|a| in [0.5, 0.9975]) and phases U[-pi, pi) in float32. With gates_file
    ("path.npz:layerN", tame_fraction.py --save_gates), log|a| is a trained model's instead, tiled to the shape."""
    import jax
    import jax.numpy as jnp

    inputs = _jit_maker("op", b, t, dims["heads"], dims["d_qk"], dims["d_v"], dtype)(jax.random.key(seed))
    if gates_file:
        gates = bc.tile_gates(bc.load_gates(gates_file), b, t, dims["heads"], dims["d_qk"])
        inputs["log_magnitude"] = jnp.asarray(gates)
    if segment_length:  # a segment starts at each position with probability 1 / segment_length
        starts = jax.random.bernoulli(jax.random.key(seed + 1), 1.0 / segment_length, (b, t))
        inputs["segment_ids"] = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    return inputs


def op_fn(mode: str, pass_: str, chunk_size, *, upcast: bool = False, segments: bool = False):
    """(fn, argument names). fwd -> y; fwdbwd -> (y, the five input gradients): what a training step computes.

    y must be an output of fwdbwd: GateLoop's backward does not read y, so with only the gradients returned XLA drops
    the kernels that compute nothing but y (the multi-head Pallas op's forward query side, ~0.7 ms of ~4.7 on an
    H200) and the timing flatters GateLoop against attention, whose backward reads its output (the results in
    results/kernel_dev/modes_h200_without_y.json were timed so)."""
    import jax
    import jax.numpy as jnp

    from gateloop_jax import ops
    from gateloop_jax.ops import gla_rotation

    if mode in PEERS_SOFTMAX:
        impl = mode.split("_", 1)[1]

        def forward(q, k, v):
            if upcast:
                q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

        names = ("q", "k", "v")
    elif mode == "jla_gla":
        # Real gates at key width d_qk: a different function (no phase), timed for its speed only.
        def forward(q, k, v, log_magnitude):
            return gla_rotation.jla_gla(q, k, v, log_magnitude, None)[0]

        names = ("q", "k", "v", "log_magnitude")
    elif mode.startswith("mosaic_gpu:"):
        # A kernel-development variant of mode "mosaic_gpu" (ops/pallas_mosaic_gpu.VARIANTS), beside the default in
        # one run; op scope only (the layer takes the library's modes).
        from gateloop_jax.ops import pallas_mosaic_gpu

        variant = mode.split(":", 1)[1]

        def forward(q, k, v, log_magnitude, phase):
            if upcast:
                q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
            return pallas_mosaic_gpu.gateloop_mosaic_gpu(q, k, v, log_magnitude, phase, None, variant=variant)[0]

        names = ("q", "k", "v", "log_magnitude", "phase")
    else:
        kw = {"chunk_size": chunk_size} if (mode == "chunked" and chunk_size) else {}

        def forward(q, k, v, log_magnitude, phase, segment_ids=None):
            if upcast:
                q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
            return ops.gateloop(
                q, k, v, ops.PolarTransition(log_magnitude, phase), mode=mode, segment_ids=segment_ids, **kw
            )

        names = ("q", "k", "v", "log_magnitude", "phase") + (("segment_ids",) if segments else ())
    if pass_ == "fwd":
        return forward, names

    def fwdbwd(*xs):
        *inputs, dy = xs
        fn = forward
        if segments:  # integer ids: not differentiated
            *inputs, ids = inputs
            fn = functools.partial(forward, segment_ids=ids)
        y, vjp = jax.vjp(fn, *inputs)
        return y, *vjp(dy.astype(y.dtype))

    return fwdbwd, names + ("dy",)


def layer_module(mode: str, dims: dict, dtype: str):
    """A GateLoopMixer (or, for the softmax peers, a CausalSelfAttention layer) at the setting's shape."""
    from flax import nnx

    import gateloop_jax.models  # noqa: F401 - first: importing layers before models is a circular import
    from gateloop_jax.layers import CausalSelfAttention, GateLoopMixer
    from gateloop_jax.models.config import ModelConfig

    shape = dict(d_model=dims["d_model"], num_heads=dims["heads"], d_qk=dims["d_qk"], d_v=dims["d_v"], dtype=dtype)
    if mode in PEERS_SOFTMAX:
        config = ModelConfig(name="transformer", attention_impl=mode.split("_", 1)[1], **shape)
        return CausalSelfAttention(config, rngs=nnx.Rngs(0))
    config = ModelConfig(name="gateloop", **shape)
    return GateLoopMixer(config, rngs=nnx.Rngs(0))


def layer_fn(graphdef, mode: str, pass_: str):
    """fwd(params, x) -> y; fwdbwd(params, x, dy) -> (y, grads of params, grad of x): y too, see op_fn."""
    import jax
    from flax import nnx

    call_mode = None if mode in PEERS_SOFTMAX else mode

    def forward(params, x):
        return nnx.merge(graphdef, params)(x, mode=call_mode)

    if pass_ == "fwd":
        return forward, ("params", "x")

    def fwdbwd(params, x, dy):
        y, vjp = jax.vjp(forward, params, x)
        return y, *vjp(dy.astype(y.dtype))

    return fwdbwd, ("params", "x", "dy")


def layer_inputs(seed: int, b: int, t: int, d_model: int, dtype: str) -> dict:
    """x and the cotangent dy, (b, t, d_model), N(0, 1) in `dtype`."""
    import jax

    return _jit_maker("layer", b, t, 0, d_model, 0, dtype)(jax.random.key(seed))


def nbytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def key_of(c: dict) -> str:
    return f"{c['scope']}/{c['setting']}/{c['dtype']}/{c['length']}/{c['mode']}/{c['pass']}"


def gateloop_modes(args) -> list[str]:
    from gateloop_jax import ops

    # Kernel modes (e.g. "pallas") are listed apart from the portable MODES by the dispatcher; both are benchmarked,
    # and a mode that does not apply to a shape is reported as skipped with the dispatcher's own error.
    return csv(args.modes) if args.modes else list(ops.MODES) + list(getattr(ops, "KERNEL_MODES", ())) + ["auto"]


def resolve_auto(dims: dict, t: int, b: int) -> str | None:
    """The concrete mode "auto" stands for at this shape, or None when the dispatcher does not say."""
    import jax

    from gateloop_jax import ops

    q_shape = (b, t, dims["heads"], dims["d_qk"])
    v_shape = (b, t, dims["heads"], dims["d_v"])
    try:
        try:
            return ops.resolve_mode("auto", q_shape, v_shape, platform=jax.default_backend())
        except TypeError:
            return ops.resolve_mode("auto", q_shape, v_shape)
    except Exception:  # noqa: BLE001 - an older or newer dispatcher: measure "auto" as its own config
        return None
