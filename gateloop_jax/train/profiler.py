"""A jax.profiler trace of chosen training steps: config.profile_steps = (START, COUNT) traces steps START ..
START + COUNT - 1 (step n is the optimizer step that logs as step n) into <workdir>/profile.

    python -m gateloop_jax.main ... --config.profile_steps=10,5
    tensorboard --logdir <workdir>/profile          # Profile tab (pip install tensorboard-plugin-profile)
    # or open <workdir>/profile/plugins/profile/<run>/*.trace.json.gz / perfetto_trace.json.gz in ui.perfetto.dev

Start after the first step (it includes compilation). Every process writes its own trace (files named by host).
The trace stops after the device has finished the last traced step, so that step's kernels are in it.
"""

from __future__ import annotations

import os
from typing import Any

import jax


def check_profile_steps(value: Any) -> tuple[int, int] | None:
    """(START, COUNT) from config.profile_steps (None = off); an error naming the field and the fix otherwise."""
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or value[0] < 1 or value[1] < 1):
        raise ValueError(f"profile_steps={value!r} must be START,COUNT with START >= 1 and COUNT >= 1, e.g. "
                         "--config.profile_steps=10,5 (steps 10..14); leave it unset for no trace.")
    return int(value[0]), int(value[1])


class StepProfiler:
    """Starts the trace before step START and stops it after step START + COUNT - 1 (or at close)."""

    def __init__(self, profile_steps: Any, workdir: str):
        window = check_profile_steps(profile_steps)
        self.first, self.last = (window[0], window[0] + window[1] - 1) if window else (None, None)
        self.directory = os.path.join(workdir, "profile")
        self.active = False

    def before(self, step: int) -> None:
        """Call before running step `step` (1-based)."""
        if self.first is not None and step == self.first and not self.active:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True

    def annotate(self, step: int):
        """Context manager naming the step in the trace (TensorBoard's step view)."""
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, outputs: Any) -> None:
        """Call after dispatching step `step`, with its outputs (waited for before the trace stops)."""
        if self.active and step >= self.last:
            self._stop(outputs)

    def close(self, outputs: Any = None) -> None:
        """Stops a trace still running (the run ended or stopped inside the window)."""
        if self.active:
            self._stop(outputs)

    def _stop(self, outputs: Any) -> None:
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self.active = False
        if jax.process_index() == 0:
            print(f"profile of steps {self.first}..{self.last} written to {self.directory} "
                  f"(tensorboard --logdir {self.directory}, or its perfetto_trace.json.gz in ui.perfetto.dev)",
                  flush=True)
