"""The Pallas kernels under a sharded jit: run per (batch, head) shard through shard_map (XLA cannot partition a
pallas_call), with the same outputs and gradients as on one device. 8 fake CPU devices, interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gateloop_jax import layers
from gateloop_jax.models import preset_config
from gateloop_jax.sharding import DEFAULT_RULES, make_mesh, map_over_batch_and_heads


def _mixer_loss_and_grads(config, x, mode, segment_ids=None):
    mixer = layers.GateLoopMixer(config, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mixer, nnx.Param)

    def loss(params, x, segment_ids):
        y = nnx.merge(graphdef, params)(x, mode=mode, segment_ids=segment_ids)
        return jnp.sum(jnp.sin(y)), y

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x, segment_ids)


@pytest.mark.parametrize("layout", ["multihead", "maxheaded", "multihead_segments"])
def test_pallas_mixer_sharded_matches_one_device(layout):
    dims = dict(num_heads=16, d_qk=1, d_v=1) if layout == "maxheaded" else dict(num_heads=4, d_qk=8, d_v=8)
    config = preset_config("test", name="gateloop", d_model=16, **dims)
    x = jax.random.normal(jax.random.key(0), (4, 21, 16))
    # Packed rows (segment_ids travel to each shard with their rows): boundaries at different places per row.
    segment_ids = jnp.arange(21)[None, :] // jnp.array([[5], [7], [21], [2]]) if "segments" in layout else None
    (loss, y), grads = _mixer_loss_and_grads(config, x, "pallas", segment_ids)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        (loss_s, y_s), grads_s = _mixer_loss_and_grads(config, x, "pallas", segment_ids)
    np.testing.assert_allclose(y_s, y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    # Gradients of parameters sum over the batch, which the sharded run reduces in another order: compare relative
    # to each gradient's scale (float32 sums of ~100 terms: ~1e-6), as the oracle tests do.
    for g, g_s in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_s)):
        np.testing.assert_allclose(g_s, g, rtol=0, atol=2e-5 * float(np.max(np.abs(g))))


def test_map_over_batch_and_heads_runs_per_shard():
    """Inside the map every call sees its shard: batch / (data x fsdp) rows and heads / tensor heads."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    seen = []

    def fn(x):
        seen.append(x.shape)
        return x * 2.0

    x = jnp.ones((4, 3, 6, 5))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        y = jax.jit(lambda x: map_over_batch_and_heads(fn, x, out_kinds=("sequence",)))(x)
    assert seen == [(1, 3, 3, 5)]
    np.testing.assert_array_equal(y, 2.0 * x)
    # Without a mesh: a plain call.
    seen.clear()
    map_over_batch_and_heads(fn, x, out_kinds=("sequence",))
    assert seen == [(4, 3, 6, 5)]


def test_map_over_batch_and_heads_drops_axes_that_do_not_divide():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    seen = []
    x = jnp.ones((2, 3, 3, 5))  # batch 2: only "data" divides it; 3 heads: "tensor" does not
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        jax.jit(lambda x: map_over_batch_and_heads(lambda z: seen.append(z.shape) or z, x, out_kinds=("sequence",)))(x)
    assert seen == [(1, 3, 3, 5)]


def test_map_over_batch_and_heads_splits_a_batch_by_length_argument_by_batch_only():
    """segment_ids (b, t) travel with q, k, v: split over the batch like them, never over heads."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    seen = []

    def fn(x, segment_ids):
        seen.append((x.shape, segment_ids.shape))
        return x * segment_ids[:, :, None, None]

    x, segment_ids = jnp.ones((4, 3, 6, 5)), jnp.arange(12).reshape(4, 3)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(DEFAULT_RULES):
        y = jax.jit(lambda x, s: map_over_batch_and_heads(fn, x, s, out_kinds=("sequence",)))(x, segment_ids)
    assert seen == [((1, 3, 3, 5), (1, 3))]
    np.testing.assert_array_equal(y, x * segment_ids[:, :, None, None])
