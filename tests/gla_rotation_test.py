"""Mode "gla_rotation": GateLoop through a real-gated GLA kernel of twice the key width (ops/gla_rotation.py).

Its kernel (jax-linear-attention, Hopper only) never runs in CI; the rotation identity around it does: the tests put
a real-gated GLA computed by mode "scan" with zero phase in its place and check the whole mode (y, final state, every
gradient, carried state) against the float64 oracle, as tests/ops_test.py checks the other modes. The kernel itself
was checked on the H200 (experiments/README.md; results/gla_rotation_h200.json)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gateloop_jax import ops
from gateloop_jax.ops import gla_rotation
from ops_test import CASES, GATES, LAYOUTS, SEED, check_against_oracle, make_inputs


def scan_gla(q, k, v, g, initial_state):
    """Real-gated GLA (y, final state) by mode "scan" with zero phase: the stand-in for jla's kernel."""
    h0 = None if initial_state is None else initial_state.astype(jnp.complex64)
    y, final = ops.gateloop(q, k, v, ops.PolarTransition(g, jnp.zeros_like(g)), mode="scan", initial_state=h0,
                            return_state=True)
    return y, jnp.real(final)


@pytest.fixture
def stand_in_kernel(monkeypatch):
    monkeypatch.setattr(gla_rotation, "jla_gla", scan_gla)
    monkeypatch.setattr(gla_rotation, "unsupported_reason", lambda *args, **kwargs: None)


# Tolerances: those of the other modes (tests/ops_test.py), except the phase gradient under strong forgetting. There
# dtheta, of the size of |a| <= 1e-3, is what is left of terms of size |q| |k| |v| that cancel exactly (the rotation
# turns q and k by the same absolute phase); float32 leaves ~1e-7 of those terms, 1e-4 to 1e-3 of dtheta (measured:
# at most 1.07e-3 over 25 seeds of these cases, against 6.8e-6 for every other gradient). The other modes never form
# those terms.
@pytest.mark.parametrize("t, gates, with_state", CASES, ids=[f"t{t}-{g}-{'h0' if s else 'zero'}" for t, g, s in CASES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gla_rotation_matches_oracle(stand_in_kernel, layout, t, gates, with_state):
    rng = np.random.default_rng([SEED, 41, t, GATES.index(gates), with_state, len(layout)])
    inputs = make_inputs(rng, t=t, gates=gates, with_state=with_state, **LAYOUTS[layout])
    check_against_oracle("gla_rotation", inputs, rng, rtol=2e-5, grad_rtol=1e-4, tag=f"{layout} t={t} {gates}",
                         grad_rtol_for={"theta": 5e-3} if gates == "near_zero" else None)


def test_gla_rotation_long_odd_length(stand_in_kernel):
    """2049 steps of long memory, where |Phi| grows to ~500 and float32 cos / sin with it are off by ~3e-5 (measured:
    at most 5.3e-5, final state). Tolerances: ops_test's long-length ones."""
    rng = np.random.default_rng([SEED, 43, 2049])
    inputs = make_inputs(rng, b=1, t=2049, h=1, dk=2, dv=2, gates="near_one", with_state=True)
    check_against_oracle("gla_rotation", inputs, rng, rtol=2e-4, grad_rtol=1e-3, tag="t=2049")


def test_gla_rotation_in_the_layer(stand_in_kernel):
    """The layer runs a kernel mode per (batch, head) shard; with the stand-in kernel it computes what "scan" does."""
    from flax import nnx

    import gateloop_jax.models  # noqa: F401 - before layers: importing layers first is a circular import
    from gateloop_jax.layers import GateLoopMixer
    from gateloop_jax.models.config import ModelConfig

    config = ModelConfig(name="gateloop", d_model=16, num_heads=2, d_qk=4, d_v=4, mode="gla_rotation")
    layer = GateLoopMixer(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(layer(x, mode="scan")), rtol=0, atol=2e-5)


def test_gla_rotation_unavailable_is_one_clear_error():
    """Without its kernel (jla not installed, or not a GPU, as in CI) the mode fails before any compute, naming the
    mode and the fix; bf16, width and head constraints are named the same way."""
    q = jnp.ones((1, 4, 2, 64), jnp.bfloat16)
    a = ops.PolarTransition(jnp.zeros((1, 4, 2, 64)), jnp.zeros((1, 4, 2, 64)))
    with pytest.raises(ValueError, match=r"mode='gla_rotation' cannot run here: .*(jax-linear-attention|GPU)"):
        ops.gateloop(q, q, q, a, mode="gla_rotation")


def test_gla_rotation_names_each_constraint(monkeypatch):
    monkeypatch.setattr(gla_rotation.importlib.util, "find_spec", lambda name: object())
    ok = ((2, 8, 8, 64), (2, 8, 8, 64), jnp.bfloat16, "gpu")
    assert gla_rotation.unsupported_reason(*ok) is None
    assert "GPU" in gla_rotation.unsupported_reason(*ok[:3], "cpu")
    assert "bf16" in gla_rotation.unsupported_reason(*ok[:2], jnp.float32, "gpu")
    assert "d_qk=48" in gla_rotation.unsupported_reason((2, 8, 8, 48), (2, 8, 8, 64), jnp.bfloat16, "gpu")
    assert "heads=1" in gla_rotation.unsupported_reason((2, 8, 1, 32), (2, 8, 1, 64), jnp.bfloat16, "gpu")
