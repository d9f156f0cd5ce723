"""The Pallas TPU (Mosaic) kernels of ops/pallas_tpu.py: numerics in interpret mode (CPU) against the float64 oracle,
and the TPU lowering itself through cross-platform export (no TPU needed).

The export runs the Pallas -> Mosaic lowering of both kernels on this machine; Mosaic's layout passes and the TPU
compiler only run on a TPU, so a passing export is necessary, not sufficient, for compiling on one.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pallas_test import F32_RTOL, _check, _inputs

from gateloop_jax.ops import pallas_tpu as pt


@pytest.mark.parametrize(
    "t,dk,dv,chunk,with_h0",
    [
        (1, 4, 3, None, True),  # one step: the default chunk capped to one sub-block, mostly padding
        (37, 4, 3, 16, False),  # odd length (time padding), 3 chunks of 2 sub-blocks: the carried state
        (64, 5, 16, 32, True),  # 2 chunks of 4 sub-blocks: off-diagonal sub-blocks; d_qk != d_v
        (50, 16, 2, 24, True),  # chunk of 3 sub-blocks (not a power of two), 3 chunks, padded length
    ],
)
def test_matches_oracle(t, dk, dv, chunk, with_h0):
    """Batch rows cycle through the gate regimes of _inputs (|a| in [0.3, 1], ~1e-26..1e-13, within 1e-6 of 1, both
    extremes interleaved): y, the final state and all gradients (dh0 and a final-state cotangent included)."""
    rng = np.random.default_rng([t, dk, dv, chunk or 0])
    args = _inputs(rng, 4, t, 2, dk, dv, with_h0=with_h0)
    fn = lambda *a: pt.gateloop_pallas_tpu(*a, chunk_size=chunk, interpret=True)  # noqa: E731
    _check(fn, args, F32_RTOL)


def test_zero_gates_and_wide_heads():
    """|a| = 0 exactly (log|a| = -inf on 30% of the entries, clamped inside: no 0 * inf NaN in the segment sums), and
    d_qk above one lane tile (130 -> 256 padded): the channel padding of keys and of the transposed state."""
    rng = np.random.default_rng(130)
    q, k, v, log_r, theta, h0, dy, dfinal = _inputs(rng, 4, 21, 1, 130, 3)
    log_r = np.where(rng.uniform(size=log_r.shape) < 0.3, -np.inf, log_r).astype(np.float32)
    fn = lambda *a: pt.gateloop_pallas_tpu(*a, chunk_size=16, interpret=True)  # noqa: E731
    _check(fn, (q, k, v, log_r, theta, h0, dy, dfinal), F32_RTOL)


def test_plan_and_supported():
    cfg = pt.Config()
    assert pt.make_plan(cfg, 1, interpret=True).chunk == 8  # capped at the length, rounded up to a sub-block
    assert pt.make_plan(cfg, 1000, interpret=True).chunk == cfg.chunk
    assert pt.make_plan(cfg, 1000, interpret=True, chunk_size=20).chunk == 24
    assert pt.supported((2, 8, 4, 64), (2, 8, 4, 64), "tpu")
    assert not pt.supported((2, 8, 4, 64), (2, 8, 4, 64), "gpu")


def _export_args(b=2, t=200, h=2, dk=64, dv=32):
    f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    qk = f32(b, t, h, dk)
    return [qk, qk, f32(b, t, h, dv), qk, qk, jax.ShapeDtypeStruct((b, h, dk, dv), jnp.complex64)]


@pytest.mark.parametrize("what", ["forward", "grad"])
def test_tpu_export(what):
    """The kernels lower for TPU (interpret=False forced): forward, and jax.grad of a scalar loss (fwd + bwd kernel).
    t = 200 with C = 64: several chunks and time padding; d_qk = 64, d_v = 32: lane padding."""

    def forward(*a):
        return pt.gateloop_pallas_tpu(*a, interpret=False)

    def loss(*a):
        y, final = forward(*a)
        return jnp.sum(y * y) + jnp.sum(jnp.abs(final) ** 2)

    fn = forward if what == "forward" else jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5))
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*_export_args())
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    assert text.count("tpu_custom_call") == (1 if what == "forward" else 2)


@pytest.mark.parametrize("dk,dv", [(6, 5), (1, 1)], ids=["multihead", "maxheaded"])
def test_dispatch_routes_tpu_to_this_kernel(dk, dv):
    """mode="pallas" on a TPU platform runs this kernel for every shape (here in interpret mode): same y and final
    state as mode="scan"."""
    from gateloop_jax.ops import dispatch, scan

    rng = np.random.default_rng(11)
    q, k, v, log_r, theta, h0 = (jnp.asarray(x) for x in _inputs(rng, 2, 19, 3, dk, dv)[:6])
    y, final = dispatch._pallas(q, k, v, log_r, theta, h0, platform="tpu")
    y_ref, final_ref = scan.gateloop_scan(q, k, v, log_r, theta, h0)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5 * float(np.max(np.abs(y_ref))))
    np.testing.assert_allclose(final, final_ref, rtol=0, atol=2e-5 * float(np.max(np.abs(final_ref))))
