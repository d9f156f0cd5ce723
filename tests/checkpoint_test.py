"""Checkpoints: SIGKILL and resume reproduces the uninterrupted losses, SIGTERM saves and stops, a corrupt latest
checkpoint falls back to the previous one, restore onto a different mesh, and gateloop_jax.load on one CPU."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gateloop_jax
from gateloop_jax import data
from gateloop_jax.train import train_and_evaluate
from gateloop_jax.train.metrics import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(tempfile.gettempdir(), "gateloop_jax_test_cache")
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_test import get_config, losses  # noqa: E402


def launch(workdir, *flags, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "gateloop_jax.main", "--config", "configs/memory_horizon.py:test",
           "--workdir", str(workdir), "--config.mesh.data=-1", "--config.eval_every_steps=0", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def last_step(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    try:
        return max((m["step"] for m in read_jsonl(path)), default=0)
    except ValueError:  # a line being written
        return 0


def wait_for_step(proc, workdir, step, timeout=300):
    start = time.time()
    while last_step(workdir) < step:
        assert proc.poll() is None, f"finished before step {step}:\n{proc.stdout.read()}"
        assert time.time() - start < timeout
        time.sleep(0.02)


def loss_by_step(workdir):
    out = {}
    for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "train/loss" in m:
            out[m["step"]] = m["train/loss"]  # after a resume the re-run steps overwrite the killed run's
    return out


STEPS = ["--config.total_steps=300", "--config.log_every_steps=1", "--config.ckpt_every_steps=50"]


@pytest.mark.xdist_group("train_subprocess")
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = launch(full, *STEPS)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out

    proc = launch(killed, *STEPS)
    wait_for_step(proc, killed, 160)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_step(killed)
    assert killed_at < 300
    proc = launch(killed, *STEPS)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "resumed from" in out

    a, b = loss_by_step(full), loss_by_step(killed)
    assert sorted(a) == sorted(b) == list(range(1, 301))
    a, b = np.array([a[s] for s in range(1, 301)]), np.array([b[s] for s in range(1, 301)])
    print(f"killed at step {killed_at}; max |loss difference| over 300 steps: {np.max(np.abs(a - b)):.3g}; "
          f"loss at steps 1/150/300: {a[0]:.6f}/{a[149]:.6f}/{a[299]:.6f} vs {b[0]:.6f}/{b[149]:.6f}/{b[299]:.6f}")
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=0)


@pytest.mark.xdist_group("train_subprocess")
def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    proc = launch(tmp_path, "--config.total_steps=100000", "--config.log_every_steps=1",
                  "--config.ckpt_every_steps=0")
    wait_for_step(proc, tmp_path, 20)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    step = last_step(tmp_path)
    assert f"stopping at step {step} (signal SIGTERM)" in out
    assert os.listdir(tmp_path / "checkpoints") == [str(step)]


def tiny(steps=3, **mesh):
    c = get_config()
    c.total_steps = steps
    c.eval_every_steps = 0
    c.ckpt_every_steps = 1
    c.keep_ckpts = None
    c.optimizer.eps = 1e-4  # see train_test.py's docstring
    c.mesh.update(**{"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return c


# The tests sharing `trained` run on one xdist worker, so it trains once.
TRAINED = pytest.mark.xdist_group("checkpoint_trained")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 steps on a data x fsdp mesh, a checkpoint after every step."""
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(tiny(data=4, fsdp=2), str(workdir))
    return workdir


@TRAINED
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(trained, tmp_path, capsys):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    for path in (workdir / "checkpoints" / "3" / "params").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    capsys.readouterr()
    train_and_evaluate(tiny(data=4, fsdp=2), str(workdir))
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "WARNING: checkpoint step 3 is unreadable" in warning[0], out  # one line
    assert f"{workdir}/checkpoints/3" in warning[0] and "falling back to step 2" in warning[0]
    assert "resumed from" in out and "/2 at step 2" in out
    redone = [m for m in read_jsonl(str(workdir / "metrics.jsonl")) if "train/loss" in m][-1]
    original = [m for m in read_jsonl(str(trained / "metrics.jsonl")) if "train/loss" in m][-1]
    assert redone["step"] == 3
    np.testing.assert_allclose(redone["train/loss"], original["train/loss"], rtol=1e-6)
    assert any(p.name.startswith("corrupt-3-") for p in (workdir / "checkpoints").iterdir())


@TRAINED
def test_restore_onto_a_different_mesh(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    shutil.rmtree(workdir / "checkpoints" / "3")
    train_and_evaluate(tiny(data=2, fsdp=2, tensor=2), str(workdir))  # resumes step 2 on the new mesh
    np.testing.assert_allclose(losses(str(workdir))[-1], losses(str(trained))[-1], rtol=1e-4, atol=0)


@TRAINED
def test_load_on_one_cpu(trained):
    model, config, tokenizer = gateloop_jax.load(str(trained))
    assert tokenizer is None and config.model.vocab_size == 12
    leaf = jax.tree.leaves(jax.tree.map(lambda x: x, __import__("flax").nnx.state(model)))[0]
    assert len(leaf.devices()) == 1
    # The trainer's last eval/loss, recomputed on one CPU from the loaded model.
    totals = np.zeros(2)
    for batch in data.eval_batches(config.data, split="validation", batch_size=config.eval_batch_size):
        logits = model(jnp.asarray(batch["inputs"]))
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(batch["targets"])[..., None], -1)[..., 0]
        totals += [float(jnp.sum(nll * batch["mask"])), float(np.sum(batch["mask"]))]
    eval_loss = [m for m in read_jsonl(str(trained / "metrics.jsonl")) if "eval/loss" in m][-1]["eval/loss"]
    np.testing.assert_allclose(totals[0] / totals[1], eval_loss, rtol=1e-5)
    # A checkpoints directory loads too, and any step of it.
    model2, _, _ = gateloop_jax.load(str(trained / "checkpoints"), step=1)
    assert model2 is not None


@TRAINED
def test_load_errors(trained, tmp_path):
    with pytest.raises(ValueError, match=r"no checkpoint step 7 .*available steps: \[1, 2, 3\]"):
        gateloop_jax.load(str(trained), step=7)
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        gateloop_jax.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gateloop_jax.load(str(tmp_path / "nowhere"))


@TRAINED
def test_init_from_loads_parameters_only(trained, tmp_path, capsys):
    c = tiny(data=4, fsdp=2)
    c.init_from, c.init_from_step = str(trained), 3
    capsys.readouterr()
    train_and_evaluate(c, str(tmp_path))
    assert f"initialised from {trained}/checkpoints/3 at step 0" in capsys.readouterr().out
    # Step 1 starts from the trained parameters, so its loss is below the scratch run's step 1.
    assert losses(str(tmp_path))[0] < losses(str(trained))[0]
    c.init_from_step = 9
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 9; it has \[1, 2, 3\]"):
        train_and_evaluate(c, str(tmp_path / "other"))


@TRAINED
def test_incompatible_checkpoints_are_an_error_not_a_restart(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    c = tiny(data=4, fsdp=2)
    c.model.d_model = 32  # another model: no checkpoint can restore
    with pytest.raises(RuntimeError, match=r"none of the checkpoints \[1, 2, 3\]"):
        train_and_evaluate(c, str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]
