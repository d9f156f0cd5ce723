"""Does a cross-program spin-wait work in Pallas Triton? Program 1 waits for a flag program 0 sets (argv[1]:
scalar | carried | vector | volatile). H200, jax 0.11.2: scalar ran; vector and volatile (a while loop whose
condition reduces a vector) hung. Run under `timeout`: a hang means the wait never sees the flag."""
import sys
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MODE = sys.argv[1]
N = 128


def kernel(flag_in, x_ref, flag_ref, out_ref):
    del flag_in
    pid = pl.program_id(0)
    cols = pl.ds(0, N)
    zeros = jnp.zeros((N,), jnp.int32)

    def wait():
        if MODE == "scalar":
            f = jax.lax.while_loop(lambda f: f == 0, lambda f: plgpu.atomic_add(flag_ref, (jnp.int32(0),), jnp.int32(0)),
                                   jnp.int32(0))
            return jnp.zeros((N,), jnp.float32) + f.astype(jnp.float32)
        if MODE == "carried":  # the condition a scalar carried in the state, computed in the body
            def spin(st):
                f = plgpu.atomic_add(flag_ref, (cols,), zeros)
                return f, jnp.min(f) == 0
            return jax.lax.while_loop(lambda st: st[1], spin, (zeros, True))[0].astype(jnp.float32)
        if MODE == "vector":
            f = jax.lax.while_loop(lambda f: jnp.min(f) == 0, lambda f: plgpu.atomic_add(flag_ref, (cols,), zeros), zeros)
            return f.astype(jnp.float32)
        f = jax.lax.while_loop(lambda f: jnp.min(f) == 0, lambda f: plgpu.load(flag_ref.at[cols], volatile=True), zeros)
        return f.astype(jnp.float32)

    # program 1 waits; program 0 publishes (waiting is skipped for program 0 by its loop: it sets the flag first)
    @pl.when(pid == 0)
    def _():
        if MODE == "scalar":
            plgpu.atomic_add(flag_ref, (jnp.int32(0),), jnp.int32(1))
        else:
            plgpu.atomic_add(flag_ref, (cols,), jnp.ones((N,), jnp.int32))
        out_ref[0, :] = x_ref[...]

    @pl.when(pid == 1)
    def _():
        out_ref[1, :] = wait() + x_ref[...]


shape = (1,) if MODE == "scalar" else (N,)
f = pl.pallas_call(kernel, grid=(2,), out_shape=(jax.ShapeDtypeStruct(shape, jnp.int32),
                                                 jax.ShapeDtypeStruct((2, N), jnp.float32)),
                   input_output_aliases={0: 0})
print(MODE, jax.block_until_ready(jax.jit(f)(jnp.zeros(shape, jnp.int32), jnp.ones((N,), jnp.float32)))[1][:, :4],
      flush=True)
