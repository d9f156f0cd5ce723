"""GateLoop through a real-gated GLA kernel of twice the key width: the rotation identity (mode "gla_rotation").

With Phi_n = sum_{m <= n} theta_m per key channel, the transition from step m to step n is
R(m, n) e^{i (Phi_n - Phi_m)}, R the product of |a|, and Re e^{i (Phi_n - Phi_m)} = cos Phi_n cos Phi_m +
sin Phi_n sin Phi_m. So

    y = GLA([q cos Phi, q sin Phi], [k cos Phi, k sin Phi], v)   with the log-decay [log|a|, log|a|] and scale 1,

GLA being S_n = diag(exp g_n) S_{n-1} + k_n^T v_n, y_n = q_n S_n with a real (2 d_qk, d_v) state. The carried state
maps as S_0 = [Re H_0; -Im H_0] and H_n = e^{i Phi_n} (S_n[:d_qk] - i S_n[d_qk:]).

The kernel is jax-linear-attention's Mosaic GPU GLA (module `jla`: Hopper, bf16 q, k, v, Python >= 3.12, jax 0.11.2;
`pip install -e ".[peers]"`). On an H200 at 32768 tokens x 8 heads x 64 x 64, bf16, fwd+bwd with y, it ran in
2.22-2.41 ms against 5.0 for mode "pallas" (experiments/README.md; results/peers_h200.json,
gla_rotation_h200.json). It is not what mode "auto" picks, because it is less accurate: the rotated q, k are
rounded to bf16, and the phase gradient, a suffix sum over the sequence of terms that cancel (turning q and k by the
same phase changes nothing), was 1.4e-2 to 3.6e-2 off at L = 1024 to 8192 (max|err| / max|ref| against float32
"recurrent"; growing with the length), where "pallas" keeps 1e-6. Even in float32 that cancellation costs dtheta
1e-4 to 1e-3 under strong forgetting (tests/gla_rotation_test.py). The phases are absolute, so cos / sin of float32 Phi
also lose ~|Phi| x 6e-8 as |Phi| grows with the length; the other modes use chunk-relative phases.

Shapes: the mode contract of ops/ (q, k, log_r, theta (b, t, h, k); v (b, t, h, v); h0 (b, h, k, v) complex).
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp

# What jla's GLA kernel accepts (jla/ops/mosaic_gpu/gla.py): key and value widths in {64, 128} and heads x key width
# a multiple of 128. The key width here is 2 d_qk.
_WIDTHS = (64, 128)
_LANES = 128


def kernel_unavailable(platform: str | None = None) -> str | None:
    """Why jax-linear-attention's GLA kernel cannot run on this machine (None if it can)."""
    platform = platform or jax.default_backend()
    try:
        installed = importlib.util.find_spec("jla") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return ("it runs jax-linear-attention's GLA kernel, which is not installed (pip install -e '.[peers]': "
                "Python >= 3.12, jax 0.11.2, a Hopper GPU); use mode='pallas' or 'auto'")
    if platform != "gpu":
        return f"jax-linear-attention's kernel needs a Hopper GPU, the backend is {platform!r}; use mode='auto'"
    return None


def unsupported_reason(q_shape, v_shape, dtype, platform: str | None = None) -> str | None:
    """Why mode "gla_rotation" cannot run this call (None if it can): the fix is named in the message."""
    reason = kernel_unavailable(platform)
    if reason:
        return reason
    if jnp.dtype(dtype) != jnp.bfloat16:
        return f"the kernel takes bf16 q, k, v, got {jnp.dtype(dtype).name}; cast them, or use mode='pallas'"
    heads, d_qk, d_v = q_shape[2], q_shape[3], v_shape[3]
    if 2 * d_qk not in _WIDTHS or d_v not in _WIDTHS or (heads * 2 * d_qk) % _LANES:
        return (f"the kernel needs 2 d_qk and d_v in {_WIDTHS} and heads x 2 d_qk a multiple of {_LANES}, got "
                f"d_qk={d_qk}, d_v={d_v}, heads={heads}; use mode='pallas' or 'chunked'")
    return None


def jla_gla(q, k, v, g, initial_state):
    """(y, final state) of jax-linear-attention's Mosaic GPU GLA kernel, scale 1; the state is float32
    (b, h, key width, d_v)."""
    # Imported here, and its kernels registered before the call: jla registers them on its first call and flags them
    # loaded before the import finishes, so concurrent first calls (threads compiling) found none.
    import jla.ops.mosaic_gpu  # noqa: F401
    from jla import ops as jla_ops

    return jla_ops.linear_attention("gla", q, k, v, g=g, scale=1.0, initial_state=initial_state,
                                    output_final_state=True, impl="mosaic_gpu")


def gateloop_gla_rotation(q, k, v, log_r, theta, h0=None):
    """(y, final state) of GateLoop computed by jla_gla, a real-gated GLA of key width 2 d_qk. q, k are rotated in
    float32 and cast to v's dtype; y comes back in it.

    Args/returns: the mode contract of ops/ (final state (b, h, k, v) complex64)."""
    # float32 whatever the input dtype: the phases accumulate over the whole sequence.
    phi = jnp.cumsum(theta.astype(jnp.float32), axis=1)
    cos, sin = jnp.cos(phi), jnp.sin(phi)

    def rotate(x):
        x = x.astype(jnp.float32)
        return jnp.concatenate([x * cos, x * sin], axis=-1).astype(v.dtype)

    g = jnp.concatenate([log_r, log_r], axis=-1).astype(jnp.float32)
    s0 = None if h0 is None else jnp.concatenate([jnp.real(h0), -jnp.imag(h0)], axis=-2).astype(jnp.float32)
    y, s = jla_gla(rotate(q), rotate(k), v, g, s0)
    d_qk = q.shape[-1]
    turn = jnp.exp(1j * phi[:, -1].astype(jnp.complex64))  # (b, h, k): e^{i Phi_t}
    final = turn[..., None] * (s[..., :d_qk, :] - 1j * s[..., d_qk:, :]).astype(jnp.complex64)
    return y, final
