"""The special-function units' error, modelled on CPU: mode="mosaic_gpu" against the float64 oracle with the
gate-factor kernel's e^{.}, cos and sin (mosaic_gpu_gates, GATES_APPROX_MATH) perturbed by the bounds PTX documents
for ex2.approx / sin.approx / cos.approx, in Mosaic GPU's interpret mode (which computes them exactly).

    python experiments/kernel_dev/approx_math_model.py --interpret --variants padded_subblock_stream_rolled \
        --rest 128:128,32:96 --bench_length 0 --budget_s 3000 --out /tmp/approx_model.json   # ~6 min on 2 cores

The arguments are check_mosaic_gpu.py's. The model: e^x with relative error 2^-22 (ex2.approx) plus |x| 2^-24 (x
rounded when scaled by log2 e), cos and sin with absolute error 2^-20.9 on [-pi, pi], each of either sign by a
deterministic hash of its argument, at every argument (0 included: PTX promises no exact values). The chunk totals,
which XLA forms exactly on the GPU, take the same error here: the model is the stricter for it. The interpret mode
also computes the intra-chunk kernels' transcendentals exactly; their approximations were measured on the H100
(experiments/perf_notes.md), the gate factors' are what this models.
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp


def _sign(x, salt):
    """+-1 per element, a deterministic hash of x."""
    return jnp.where(jnp.sin(x * 12345.678 + salt) >= 0, 1.0, -1.0)


def polar_with_unit_errors(log_magnitude, phase):
    """mosaic_gpu_common._polar with the special-function units' documented worst-case error added."""
    rel = 2.0 ** -22 + jnp.abs(log_magnitude) * 2.0 ** -24
    magnitude = jnp.exp(log_magnitude) * (1 + rel * _sign(log_magnitude, 0.3))
    err = 2.0 ** -20.9
    return (magnitude * (jnp.cos(phase) + err * _sign(phase, 1.7)),
            magnitude * (jnp.sin(phase) + err * _sign(phase, 2.9)))


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", ".."))
    sys.path.insert(0, here)
    from gateloop_jax.ops import mosaic_gpu_gates

    import check_mosaic_gpu

    # This process only: the kernel reads _polar from its module at trace time.
    mosaic_gpu_gates._polar = polar_with_unit_errors
    check_mosaic_gpu.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
