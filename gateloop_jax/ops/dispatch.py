"""The public entry point: gateloop(q, k, v, a, mode=...), and the decode step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gateloop_jax.ops import (attention, chunked, gla_rotation, pallas_chunked, pallas_elementwise,
                              pallas_mosaic_gpu, pallas_tpu, recurrent, scan)
from gateloop_jax.ops.common import (CHUNKED_MODES, SEGMENT_MODES, PolarTransition, is_elementwise,
                                     polar_to_complex, segment_starts, to_polar, validate_inputs)


def _pallas(q, k, v, log_r, theta, h0, chunk_size=None, platform=None, out_dtype=jnp.float32, reset=None):
    """The Pallas kernel for the platform and shape: on TPU the Mosaic kernel (every shape; max-headed ones are
    padded to 128 lanes); elsewhere the Triton kernels, elementwise (max-headed) or chunked (multi-head). y is in
    out_dtype from the Triton kernels, float32 from the TPU one."""
    kw = {} if reset is None else {"reset": reset}
    if (platform or jax.default_backend()) == "tpu":
        return pallas_tpu.gateloop_pallas_tpu(q, k, v, log_r, theta, h0, chunk_size=chunk_size, **kw)
    if is_elementwise(q, v):
        return pallas_elementwise.gateloop_pallas_elementwise(q, k, v, log_r, theta, h0, out_dtype=out_dtype, **kw)
    return pallas_chunked.gateloop_pallas_chunked(q, k, v, log_r, theta, h0, chunk_size=chunk_size,
                                                  out_dtype=out_dtype, **kw)


_MODE_FNS = {
    "scan": scan.gateloop_scan,
    "recurrent": recurrent.gateloop_recurrent,
    "attention": attention.gateloop_attention,
    "chunked": chunked.gateloop_chunked,
    "pallas": _pallas,
    "gla_rotation": gla_rotation.gateloop_gla_rotation,
    "mosaic_gpu": pallas_mosaic_gpu.gateloop_mosaic_gpu,
}


def resolve_mode(mode: str, q_shape, v_shape, platform: str | None = None, segments: bool = False) -> str:
    """The concrete mode "auto" stands for on this platform and shape.

    Max-headed (d_qk = d_v = 1): on GPU the Pallas kernel ("pallas": 0.56 ms vs 1.6 ms for "scan", y and the
    gradients at 32768 tokens x 512 channels on an H200); elsewhere "scan" - the states are as small as the inputs,
    and the log-depth scan is the fastest portable form (Pallas on CPU only runs in the slow interpret mode).
    Multi-head: on GPU, with d_qk and d_v <= 64, the Pallas Triton kernel ("pallas": 5.8 ms vs 12.1 ms for
    "mosaic_gpu" in one run, 5.7 vs 13.7 for "chunked" in another, y and the gradients at 32768 tokens x 8 heads x 64
    x 64, bf16, on an H100; experiments/perf_notes.md), with a third of the memory of "chunked". Wider heads are
    padded to 128 there and spill registers, so on a GPU that Mosaic GPU serves (Hopper, jax >= 0.11) they get
    "mosaic_gpu" (every width; at heads of 128 its XLA-scan form took 31.7 ms vs 28.8 for "chunked", but in 5.8 GiB
    vs 9.3: a 125M LM with heads of 96 trains at L = 2048, batch 16 in 27.1 GiB with it and does not fit an 80 GB GPU
    with "chunked"), except for packed rows
    (`segments`: the Mosaic GPU kernel has no state reset). Every other case gets "chunked": memory linear in
    length with matrix products inside chunks, where "scan" would store a d_qk x d_v state per position.
    TPU: "pallas" runs the Mosaic kernel (ops/pallas_tpu.py), which lowers for TPU but has never run on one here,
    so "auto" keeps the portable modes there until it is measured.
    Never "gla_rotation" (jax-linear-attention's kernel behind the rotation identity): 2.1-2.3x faster than "pallas"
    for bf16 multi-head on an H200, but its phase gradient is bf16-accurate only (ops/gla_rotation.py).
    """
    if mode != "auto":
        return mode
    platform = platform or jax.default_backend()
    if q_shape[-1] == 1 and v_shape[-1] == 1:
        return "pallas" if pallas_elementwise.supported(q_shape, v_shape, platform) and platform == "gpu" else "scan"
    narrow = q_shape[-1] <= pallas_chunked.MAX_FAST_HEAD_DIM and v_shape[-1] <= pallas_chunked.MAX_FAST_HEAD_DIM
    if platform == "gpu" and narrow:
        return "pallas"
    if platform == "gpu" and not segments and pallas_mosaic_gpu.serves_default_device():
        return "mosaic_gpu"
    return "chunked"


def gateloop(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    a: jax.Array | PolarTransition,
    *,
    mode: str = "auto",
    initial_state: jax.Array | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    segment_ids: jax.Array | None = None,
):
    """GateLoop: H_n = diag(a_n) H_{n-1} + k_n^T v_n,  y_n = Re(q_n H_n), per head.

    Args:
      q, k: (b, t, h, k) real queries and keys.
      v: (b, t, h, v) real values.
      a: (b, t, h, k) complex transitions with |a| <= 1, or a PolarTransition(log|a|, arg a) of real (b, t, h, k)
        arrays (what layers pass: exact for extreme gates).
      mode: "scan" | "recurrent" | "attention" | "chunked" | "pallas" | "gla_rotation" | "mosaic_gpu" | "auto". All
        compute the same function; "pallas" is the hand-written kernel (Triton on GPU; interpret mode, slow,
        elsewhere), "auto" the fastest mode for the platform and shape (resolve_mode). "gla_rotation" runs
        jax-linear-attention's GLA kernel through the rotation identity (Hopper, bf16, jla installed; faster, phase
        gradients bf16-accurate: ops/gla_rotation.py); it is never picked by "auto". "mosaic_gpu": the multi-head
        Pallas Mosaic GPU kernels (Hopper, jax >= 0.11; GPU interpret mode on CPU), what "auto" runs on Hopper for
        heads wider than 64.
      initial_state: (b, h, k, v) complex carried state H_0; zeros when None.
      return_state: also return the final state H_t, (b, h, k, v) complex64.
      chunk_size: chunk length for mode="chunked" (default 64 multi-head, 256 max-headed) and the multi-head
        "pallas" kernel (default 16, rounded up to a multiple of 16); any length is accepted.
      segment_ids: (b, t) int, packed sequences: wherever the id differs from the previous position's a new segment
        starts and the state restarts from zero (H_n = k_n^T v_n there: no term of an earlier segment, state or
        accumulated decay and phase, reaches a later one). initial_state applies to each row's first segment; the
        final state is its last segment's. Every mode in SEGMENT_MODES ("gla_rotation" is not); None: one segment.

    Returns:
      y (b, t, h, v) in the promoted dtype of q, k, v; with return_state, (y, final_state).
    """
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
    validate_inputs(q, k, v, a, initial_state, mode, chunk_size, segment_ids)
    out_dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    mode = resolve_mode(mode, q.shape, v.shape, segments=segment_ids is not None)
    if segment_ids is not None and mode not in SEGMENT_MODES:
        raise ValueError(f"gateloop: segment_ids is not supported by mode={mode!r}; use one of {SEGMENT_MODES}.")
    if mode == "gla_rotation":
        reason = gla_rotation.unsupported_reason(q.shape, v.shape, out_dtype)
        if reason:
            raise ValueError(f"gateloop: mode='gla_rotation' cannot run here: {reason}.")
    if mode == "mosaic_gpu" and pallas_mosaic_gpu.unavailable_reason():
        raise ValueError(f"gateloop: {pallas_mosaic_gpu.unavailable_reason()}; use mode='pallas' or 'chunked' here.")
    # The recurrence accumulates in float32 / complex64 whatever the input dtype: a bf16 state loses ~3 significant
    # digits per step and the error compounds over the length.
    polar = to_polar(a)
    kw = {"chunk_size": chunk_size} if mode in CHUNKED_MODES else {}
    if segment_ids is not None:
        kw["reset"] = segment_starts(segment_ids)
    if mode == "pallas":
        # The Triton kernels read q, k, v as they are (upcast on load) and write y and the gradients in the inputs'
        # dtypes: bf16 then costs no cast pass around them (max-headed fwd+bwd with bf16 inputs 0.725 -> 0.49 ms,
        # below float32's 0.53; 32768 tokens x 512 channels, H200). The TPU kernel's wrapper upcasts.
        kw["out_dtype"] = out_dtype
    elif mode != "gla_rotation":  # whose kernel takes bf16 q, k, v only (it rotates them in float32 first)
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    h0 = None if initial_state is None else initial_state.astype(jnp.complex64)
    y, final = _MODE_FNS[mode](q, k, v, polar.log_magnitude, polar.phase, h0, **kw)
    y = y.astype(out_dtype)
    return (y, final) if return_state else y


def gateloop_step(q_t, k_t, v_t, a_t, state):
    """One decode step with a carried state (O(1) per token).

    Args:
      q_t, k_t: (b, h, k) real; v_t: (b, h, v) real; a_t: (b, h, k) complex or PolarTransition; state: (b, h, k, v).
    Returns:
      (y_t (b, h, v) in the promoted input dtype, new state (b, h, k, v) complex64).
    """
    if state.shape != (*q_t.shape, v_t.shape[-1]):
        raise ValueError(
            f"gateloop_step: argument 'state' has shape {tuple(state.shape)}, expected "
            f"{(*q_t.shape, v_t.shape[-1])} (batch, heads, d_qk, d_v)."
        )
    out_dtype = jnp.result_type(q_t.dtype, k_t.dtype, v_t.dtype)
    polar = to_polar(a_t)
    a_c = polar_to_complex(polar.log_magnitude, polar.phase)
    y_t, state = recurrent.step(
        q_t.astype(jnp.float32), k_t.astype(jnp.float32), v_t.astype(jnp.float32), a_c, state.astype(jnp.complex64)
    )
    return y_t.astype(out_dtype), state


__all__ = ["gateloop", "gateloop_step", "resolve_mode", "PolarTransition", "is_elementwise"]
