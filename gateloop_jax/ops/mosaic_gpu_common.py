"""What the Mosaic GPU kernels of mode="mosaic_gpu" share (ops/pallas_mosaic_gpu.py has the method): the Pallas Mosaic
GPU import, the tile sizes, float32 values as bf16 pairs (hi + lo, ~16 significant bits) and their tensor-core
products, shared-memory tile types, and the elementwise helpers of the XLA around the kernels."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _IMPORT_ERROR = None if hasattr(plgpu, "InterpretGPUParams") else "jax.experimental.pallas.mosaic_gpu lacks "
    if _IMPORT_ERROR:
        _IMPORT_ERROR += "InterpretGPUParams"
except ImportError as e:  # pragma: no cover - depends on the installed jax
    pl = plgpu = None
    _IMPORT_ERROR = f"jax.experimental.pallas.mosaic_gpu does not import ({e})"

CHUNK = 64  # rows per chunk: the wgmma M tile
TILE = 64  # d_qk and d_v tile: 128-byte swizzled bf16 rows
SUB = 16  # rows per sub-block of the "_subblock" variants
_TWO_PI = 2.0 * math.pi


def _wrap(x):
    """Phase mapped to [-pi, pi] (e^{i x} unchanged): sums of wrapped phases stay small, so cos/sin stay accurate."""
    return x - _TWO_PI * jnp.round(x * (1.0 / _TWO_PI))


def _polar(log_magnitude, phase):
    magnitude = jnp.exp(log_magnitude)
    return magnitude * jnp.cos(phase), magnitude * jnp.sin(phase)


def _einsum(spec, *xs):
    # float32 operands and accumulation (no tf32): the inter-chunk products are part of the 1e-4 accuracy budget.
    return jnp.einsum(spec, *xs, precision=jax.lax.Precision.HIGHEST)


# How _window_sums forms its sums (experiments/kernel_dev/bench_window_sums.py times each alone; trace_mosaic_gpu.py
# --window_sums in the op). The op's fwd+bwd at 32768 tokens x 8 heads of 64, bf16, L = 8192, device time on an H100:
# 10.75 ms with "matmul", 11.09 with "cumsum", 11.37 with "associative_scan", 10.82 with "batched_matmul".
WINDOW_SUM_METHODS = ("matmul", "batched_matmul", "cumsum", "associative_scan")
WINDOW_SUMS = "matmul"


def _window_sums(z, axis, *, reverse=False, inclusive=True, method=None):
    """Sums along a short axis (a chunk's or sub-block's rows): out[c] = sum of z[s] over s <= c (reverse: s >= c;
    not inclusive: s < c, s > c). Each output is summed directly over its own rows (no total-minus-prefix
    cancellation), in float32. method (default WINDOW_SUMS):
      "matmul": a product with a 0/1 matrix (Precision.HIGHEST; products with 1 are exact), the axis moved last;
      "batched_matmul": the same matrix applied in place, one product per index of the leading axes (no transposes);
      "cumsum": lax.cumsum, which XLA lowers to a reduce-window; on the GPU a reverse one, fused with its flips, read
          every row once per output row (0.57 ms for one sum at the shape above);
      "associative_scan": log2(n) passes of shifted adds."""
    method = WINDOW_SUMS if method is None else method
    n = z.shape[axis]
    if method in ("matmul", "batched_matmul"):
        rows, cols = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
        keep = cols >= rows if reverse else cols <= rows
        if not inclusive:
            keep = keep & (cols != rows)
        ones = keep.astype(z.dtype)  # ones[c, s]: z[s] counts towards out[c]
        if method == "matmul":
            return jnp.moveaxis(_einsum("...s,cs->...c", jnp.moveaxis(z, axis, -1), ones), -1, axis)
        # The rows stay where they are: one (n, n) @ (n, rest) product per index of the leading axes (the 0/1 matrix
        # broadcast over them), so no transpose of z or of the result.
        lead, rest = math.prod(z.shape[:axis]), math.prod(z.shape[axis + 1:])
        flat = z.reshape(lead, n, rest)
        out = _einsum("bcs,bsx->bcx", jnp.broadcast_to(ones, (lead, n, n)), flat)
        return out.reshape(z.shape)
    if method == "cumsum":
        out = jax.lax.cumsum(z, axis=axis, reverse=reverse)
    elif method == "associative_scan":
        out = jax.lax.associative_scan(jnp.add, z, reverse=reverse, axis=axis)
    else:
        raise ValueError(f"_window_sums: method={method!r} is not one of {WINDOW_SUM_METHODS}")
    if inclusive:
        return out
    # Exclusive: the inclusive sums shifted by one row (each still a direct sum), zero at the open end.
    widths = [(0, 0)] * z.ndim
    widths[axis] = (0, 1) if reverse else (1, 0)
    start = 1 if reverse else 0
    return jax.lax.slice_in_dim(jnp.pad(out, widths), start, start + n, axis=axis)


def _split(x, parts=2):
    """float32 -> `parts` bfloat16 values summing to x, in a kernel's registers: each the rest so far rounded to bf16.
    Two (hi, lo) hold ~16 significant bits; three all 24 (x exactly, as the 0/1 products of mosaic_gpu_gates need)."""
    out, rest = [], x
    for _ in range(parts - 1):
        out.append(rest.astype(jnp.bfloat16))
        rest = rest - out[-1].astype(jnp.float32)
    return (*out, rest.astype(jnp.bfloat16))


def _split_array(x):
    """_split for an array in XLA (the state pass's operands). XLA's GPU compiler may drop a float32 -> bf16 ->
    float32 round trip (it allows excess precision by default), which makes lo zero: the products then keep only
    bf16 operands (errors ~4e-3, as an H100 showed). So hi is x with its low 16 bits cleared (bit operations, which no
    simplification removes): exact in bf16, and lo = x - hi exactly, rounded to bf16: ~16 significant bits."""
    hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
    return hi.astype(jnp.bfloat16), (x - hi).astype(jnp.bfloat16)


def _store_split(refs, x):
    """x split into len(refs) bf16 parts (_split), one to each ref."""
    for ref, part in zip(refs, _split(x, len(refs))):
        ref[...] = part


def _mms(*sums):
    """Sums of products a @ b of bf16-split operands in SMEM (refs, possibly transposed): each entry of `sums` a list
    of (a_pair, b_pair), summed in one float32 accumulator as hi hi + hi lo + lo hi. All of them are issued under one
    commit and waited on once, so their wgmmas overlap; the operands may be rewritten right after."""
    plgpu.commit_smem()

    def body(*accs):
        for acc, terms in zip(accs, sums):
            for a_pair, b_pair in terms:
                plgpu.wgmma(acc, a_pair[0], b_pair[0])
                plgpu.wgmma(acc, a_pair[0], b_pair[1])
                plgpu.wgmma(acc, a_pair[1], b_pair[0])
        plgpu.wgmma_wait(0)
        return tuple(acc[...] for acc in accs)

    return pl.run_scoped(body, *(plgpu.ACC((CHUNK, TILE), jnp.float32) for _ in sums))


def _mm(a_pair, b_pair):
    """a @ b for bf16-split operands in SMEM (_mms of one product)."""
    return _mms([(a_pair, b_pair)])[0]


def _t(pair):
    return pair[0].T, pair[1].T


def _swizzled_bf16(*shape):
    return plgpu.SMEM(shape, jnp.bfloat16, transforms=(plgpu.TilingTransform((8, TILE)), plgpu.SwizzleTransform(128)))


def _f32_staging():
    """A (64, 64) float32 TMA staging tile, 128-byte swizzled: conflict-free loads and stores in the WGMMA layout
    (it is only ever addressed whole, so the swizzle stays aligned)."""
    return plgpu.SMEM((CHUNK, TILE), jnp.float32,
                      transforms=(plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128)))
