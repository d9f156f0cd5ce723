r"""Memory horizon: the running digit sum (mod 10) since the last RESET, asked for at QUERY tokens.

Data-controlled transitions can forget on RESET (|a| -> 0) and count by rotating the phase (a digit d turns the
state by 2 pi d / 10), so GateLoop solves the task; with fixed transitions (variant=fixed) the state cannot be
cleared by the input and accuracy stays low (the spec's expectation, section 3).

Command (what `make train` runs; 2-core CPU, ~3 minutes):
    python -m gateloop_jax.main --config configs/memory_horizon.py:runlocal --workdir workdirs/memory_horizon
Expected: eval/accuracy >= 0.95 on the QUERY positions at the end (chance 0.1).

Ablation on the same budget (expected to stay far below):
    python -m gateloop_jax.main --config configs/memory_horizon.py:variant=fixed,runlocal --workdir workdirs/mh_fixed

Arg keys: variant = gateloop | fixed | real | linear_attention | transformer | hybrid (the last two need multi-head
--config.model.num_heads=4 --config.model.d_qk=8 --config.model.d_v=8, the hybrid also --config.model.block_pattern=ga,
as experiments/memory_horizon.py passes); mode = the GateLoop computation mode
(auto | scan | recurrent | attention | chunked); runlocal = CPU-sized run; test = the tiny two-step test size.
"""

import os
import sys

# The repository root, so that `configs.common` imports however this file is loaded (absl config_flags loads it
# by path, from any working directory).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402


def get_config(arg=None):
    # The variant's model and the computation mode (configs/common.py).
    c, arg = common.synthetic_task_config("memory_horizon", arg)
    # A small max-headed model (the paper's LM layout: one complex state per channel, d_qk = d_v = 1): the task
    # needs a phase that counts mod 10 and a gate that closes on RESET, not width.
    c.model.update(d_model=32, num_layers=2, num_heads=32, d_qk=1, d_v=1)
    # Sequence length 64 with RESET probability 0.1: segments of ~10 digits between resets.
    c.data.seq_len = 64
    # Full-size run (an accelerator): longer, with regular evaluation.
    c.global_batch_size = 64
    c.total_steps = 5000
    c.optimizer.learning_rate = 3e-3
    c.optimizer.warmup_steps = 200
    c.optimizer.weight_decay = 0.01
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.ckpt_every_steps = 1000
    if arg.runlocal:
        # CPU-sized: few enough steps for a 2-core machine in a few minutes, still to solved accuracy.
        c.total_steps = 3000
        c.global_batch_size = 32
        c.log_every_steps = 50
        c.eval_every_steps = 500
        c.ckpt_every_steps = 1000
        # On CPU at this length the sequential scan is the fastest mode (the same function as the others).
        if arg.mode == "auto":
            c.model.mode = "recurrent"
    if arg.test:
        common.apply_test_size(c)
    c.lock()
    return c
