"""Two processes on localhost with jax.distributed (CPU collectives: gloo) train like one process with the same
devices, and save and restore a checkpoint together.

Tolerance: rtol=1e-5 between the two-process and one-process losses (the same global mesh of 2 CPU devices; the
cross-process all-reduce may sum in another order). eps=1e-4 as in train_test.py.
"""

import os
import shutil
import socket

import numpy as np
import pytest

from checkpoint_test import launch, loss_by_step

FLAGS = ["--config.total_steps=6", "--config.log_every_steps=1", "--config.ckpt_every_steps=2",
         "--config.optimizer.eps=1e-4", "--config.keep_ckpts=3"]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_processes(workdir):
    port = free_port()
    procs = [launch(workdir, *FLAGS, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                    f"--process_id={i}") for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs


@pytest.mark.xdist_group("train_subprocess")
def test_two_processes_match_one_process_and_resume_together(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    proc = launch(one, *FLAGS, devices=2)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out

    outs = run_two_processes(two)
    assert "2 process(es)" in outs[0]
    a, b = loss_by_step(one), loss_by_step(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5, atol=0)
    steps = sorted(int(d) for d in os.listdir(two / "checkpoints") if d.isdigit())
    assert steps == [2, 4, 6]
    # Both processes wrote their data-iterator state into every checkpoint.
    assert sorted(os.listdir(two / "checkpoints" / "6" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    # Drop the last checkpoint: both processes restore step 4 together and redo steps 5 and 6.
    shutil.rmtree(two / "checkpoints" / "6")
    outs = run_two_processes(two)
    assert "resumed from" in outs[0] and "/4 at step 4" in outs[0]
    c = loss_by_step(two)
    np.testing.assert_allclose([c[5], c[6]], [a[5], a[6]], rtol=1e-5, atol=0)
