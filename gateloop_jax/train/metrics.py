"""Metric writing (TensorBoard event files + <workdir>/metrics.jsonl), the cadence helper, and the FLOP count for MFU.

Metric names (../shared/style.md): train/loss, train/accuracy, train/grad_norm, train/lr, eval/loss, eval/ppl,
eval/accuracy, perf/tokens_per_sec, perf/mfu, perf/step_time. Every JSON line has a "step" field.

FLOPs per trained token (forward + backward = 3 x forward, matmul FLOPs only; norms, activations, softmax ignored):

    6 * N                                       N = parameters in matmuls: every parameter except norms and biases,
                                                with a tied embedding counted once (it is the output head's matrix;
                                                the input lookup is free)
  + L * 3 * mixer_forward_per_token             the token mixer's work beyond its projections:
        GateLoop (any mode, counted as the plain recurrence): h * 10 * d_qk * d_v
            per state entry: complex a * H (6), outer product k^T v (1), its addition (1), readout Re(q H) (2)
        softmax attention (causal, mean context t/2): 2 * h * (t/2) * (d_qk + d_v)
            (scores q k^T and the weighted sum of values, 2 FLOPs per multiply-add)

MFU = achieved FLOP/s / (devices * peak FLOP/s per device). Peak is `config.peak_flops_per_device` when set, else a
table of dense bf16 peaks by device kind below; on CPU (or an unknown kind) MFU is reported against a nominal
1e11 FLOP/s per device, which is only useful for comparing runs on the same machine.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device (vendor datasheets).
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
    "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}
NOMINAL_CPU_FLOPS = 1e11


def peak_flops_per_device(override: float | None = None) -> float:
    if override:
        return float(override)
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return NOMINAL_CPU_FLOPS


def matmul_params(params) -> int:
    """Parameters that enter matrix products (see the module docstring): kernels and the embedding."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("kernel", "embedding"):
            total += int(np.prod(leaf.shape))
    return total


def flops_per_token(model_config, params, seq_len: int) -> float:
    """Training FLOPs per token (formula in the module docstring)."""
    h = model_config.num_heads
    dk, dv = model_config.head_dims
    attention, gateloop = 2 * h * (seq_len / 2) * (dk + dv), h * 10 * dk * dv
    mixers = sum(attention if kind == "a" else gateloop for kind in model_config.layer_kinds)
    return 6.0 * matmul_params(params) + 3.0 * mixers


def every(step: int, period: int, total_steps: int) -> bool:
    """The one cadence rule of the loop: fire every `period` steps (period <= 0: never) and always on the last."""
    return step == total_steps or (period > 0 and step % period == 0)


class MetricWriter:
    """TensorBoard scalars and JSON lines; only process 0 writes, every process may call."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
