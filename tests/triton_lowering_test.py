"""The Triton kernels lower for CUDA, and every module verifies, on this CPU machine: the class of error the H200
only reports at compile time as "Failed to parse Triton module" (seen on the H200: a select between two integer
constants became an i1 operand of an atomic) is caught without a GPU. Interpret mode (pallas_test.py) checks the
numbers; this checks that the kernels the GPU runs are well-formed Triton IR."""

import contextlib
import functools

import pytest

import jax
import jax.numpy as jnp

from gateloop_jax.ops import pallas_chunked as pc
from gateloop_jax.ops import pallas_elementwise as pe

# Private, but the one place the Triton modules exist before they are serialised into the custom call.
triton_lowering = pytest.importorskip("jax._src.pallas.triton.lowering")


@contextlib.contextmanager
def verified_modules():
    """Verify each Triton module as it is lowered (raises on an invalid one); yields the names of those verified."""
    lower = triton_lowering.lower_jaxpr_to_triton_module
    names = []

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        assert result.module.operation.verify()
        names.append(str(result.module.body.operations[0].attributes["sym_name"]))
        return result

    triton_lowering.lower_jaxpr_to_triton_module = lower_and_verify
    try:
        yield names
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = lower


def lower_fwd_bwd_for_cuda(fn, d, dtype, segments=False):
    """Lower jit(grad) of the kernel at a small multi-chunk shape for platform "cuda" (no device needed)."""
    qkv = [jax.ShapeDtypeStruct((2, 96, 4, d), dtype)] * 3
    gates = [jax.ShapeDtypeStruct((2, 96, 4, d), jnp.float32)] * 2
    kw = {"reset": jnp.arange(2 * 96).reshape(2, 96) % 7 == 3} if segments else {}

    def loss(q, k, v, log_r, theta):
        y, final = fn(q, k, v, log_r, theta, None, interpret=False, out_dtype=dtype, **kw)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(jnp.abs(final))

    jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).trace(*qkv, *gates).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel", ["elementwise", "multihead", "multihead_carry_u1", "elementwise_segments"])
def test_triton_kernels_lower_and_verify(kernel, dtype):
    def multihead(**config):
        return functools.partial(pc.gateloop_pallas_chunked, config=pc.Config(**config))

    fn, d, expected = {"elementwise": (pe.gateloop_pallas_elementwise, 1, 4),  # fwd: local + main; bwd: the same
                       "multihead": (multihead(), 64, 7),  # 3 forward, 4 backward
                       "multihead_carry_u1": (multihead(carry_unroll=1), 64, 7),
                       # segment_ids: the elementwise kernels read a keep scalar per step
                       "elementwise_segments": (pe.gateloop_pallas_elementwise, 1, 4)}[kernel]
    with verified_modules() as names:
        lower_fwd_bwd_for_cuda(fn, d, dtype, segments=kernel.endswith("_segments"))
    assert len(names) == expected, names


def test_the_check_rejects_an_invalid_module():
    """The check can fail: jax 0.10-0.11 lower a scalar jnp.where between integer constants to an i1, which the
    verifier rejects as the operand of an int32 atomic (the error seen on the H200). If this starts passing, jax
    lowers it correctly now: the workarounds that avoid scalar jnp.where in the kernels can go."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def kernel(flag_in, flag_ref):
        del flag_in
        step = jnp.where(pl.program_id(0) == 12345, 2, 1).astype(jnp.int32)
        plgpu.atomic_add(flag_ref, (jnp.int32(0),), step)

    call = pl.pallas_call(kernel, grid=(2,), out_shape=jax.ShapeDtypeStruct((1,), jnp.int32),
                          input_output_aliases={0: 0}, compiler_params=plgpu.CompilerParams(num_warps=1))
    with pytest.raises(Exception, match="ptr type matches value type"):  # MLIRError; its module differs by jaxlib
        with verified_modules():
            jax.jit(call).trace(jax.ShapeDtypeStruct((1,), jnp.int32)).lower(lowering_platforms=("cuda",))
