"""The trainer in-process on 8 fake CPU devices: sharded == one device, gradient accumulation, NaN, bad settings.

Tolerance: float32 losses of 3 optimizer steps agree to rtol=1e-4 across meshes. Different reduction orders change
gradients in the last bits (~1e-7 relative); Adam with a tiny epsilon turns a sign flip of a near-zero gradient into a
full-size update, so these runs use eps=1e-4 (the test is about sharding, not about Adam's epsilon).
"""

import importlib.util
import json
import os
import tempfile

import jax
import numpy as np
import pytest

from gateloop_jax.train import optimizer as opt_lib
from gateloop_jax.train import train_and_evaluate, validate
from gateloop_jax.train.metrics import every, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Identical programs compile once per machine (the test runs repeat the same small steps).
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "gateloop_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def get_config(name="memory_horizon", arg="test"):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny(steps=3, **mesh):
    c = get_config()
    c.total_steps = steps
    c.eval_every_steps = 0
    c.ckpt_every_steps = 0
    c.optimizer.eps = 1e-4
    c.mesh.update(**{"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return c


def losses(workdir):
    return np.array([m["train/loss"] for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in m])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device"))
    train_and_evaluate(tiny(), workdir)
    return losses(workdir)


# The tests sharing the module's one-device reference run on one xdist worker, so the reference trains once.
ONE_DEVICE = pytest.mark.xdist_group("train_one_device")


@ONE_DEVICE
@pytest.mark.parametrize("mesh", [dict(data=4, fsdp=2), dict(data=4, tensor=2)], ids=["data4_fsdp2", "data4_tensor2"])
def test_sharded_matches_one_device(one_device, mesh, tmp_path):
    train_and_evaluate(tiny(**mesh), str(tmp_path))
    assert len(one_device) == 3
    np.testing.assert_allclose(losses(str(tmp_path)), one_device, rtol=1e-4, atol=0)


@pytest.mark.parametrize("head_dim", [1, 8], ids=["elementwise_kernel", "chunked_kernel"])
def test_pallas_mode_with_remat_sharded_matches_one_device(head_dim, tmp_path):
    """The Pallas kernels (interpret mode here) inside the full train step, rematerialised, on a data x tensor mesh:
    the mixer maps them over (batch, head) shards with shard_map; losses equal the one-device run."""
    runs = []
    for i, mesh in enumerate([{}, dict(data=4, tensor=2)]):
        c = tiny(**mesh)
        c.model.mode = "pallas"
        c.model.remat = True
        c.model.d_qk = c.model.d_v = head_dim
        train_and_evaluate(c, str(tmp_path / str(i)))
        runs.append(losses(str(tmp_path / str(i))))
    assert len(runs[0]) == 3 and np.all(np.isfinite(runs[0]))
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4, atol=0)


@ONE_DEVICE
def test_gradient_accumulation_matches(one_device, tmp_path):
    c = tiny()
    c.grad_accum_steps = 2
    train_and_evaluate(c, str(tmp_path))
    np.testing.assert_allclose(losses(str(tmp_path)), one_device, rtol=1e-5, atol=0)


@ONE_DEVICE
def test_metrics_and_outputs(one_device, tmp_path_factory):
    workdir = [p for p in tmp_path_factory.getbasetemp().glob("one_device*")][0]
    lines = read_jsonl(str(workdir / "metrics.jsonl"))
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2, 3]
    names = set().union(*lines)
    for name in ("train/loss", "train/accuracy", "train/grad_norm", "train/lr", "eval/loss", "eval/ppl",
                 "eval/accuracy", "perf/tokens_per_sec", "perf/mfu", "perf/step_time"):
        assert name in names, name
    assert json.load(open(workdir / "config.json"))["model"]["vocab_size"] == 12
    assert list((workdir / "checkpoints").iterdir())  # the last step always saves
    assert list((workdir / "tensorboard").iterdir())


def test_nan_stops_naming_step_and_last_checkpoint(tmp_path):
    c = tiny(steps=4)
    c.optimizer.learning_rate = float("inf")  # step 1's loss is finite, its update makes every later loss NaN
    c.optimizer.warmup_steps = 0
    c.optimizer.grad_clip_norm = 0.0
    c.ckpt_every_steps = 1
    with pytest.raises(FloatingPointError, match=r"at step 2.*Last good checkpoint: .*checkpoints/1"):
        train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("change, error", [
    (lambda c: c.update(global_batch_size=6), r"global_batch_size=6 .* not divisible by the data-parallel size 8"),
    (lambda c: c.mesh.update(data=16), r"mesh: .*needs 16 devices, but there are 8"),
    (lambda c: c.update(grad_accum_steps=3), r"not divisible by grad_accum_steps=3"),
], ids=["batch_vs_data_parallel", "mesh_too_large", "accumulation"])
def test_invalid_settings_raise_before_compiling(change, error, tmp_path, monkeypatch):
    c = get_config()
    c.mesh.update(data=-1)
    change(c)
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before validating"))
    with pytest.raises(ValueError, match=error):
        train_and_evaluate(c, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


def test_missing_data_dir_raises_before_compiling(tmp_path, monkeypatch):
    c = get_config("wikitext103")
    c.data.data_dir = str(tmp_path / "nowhere")
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before validating"))
    with pytest.raises(FileNotFoundError, match=r"data.data_dir=.*nowhere.* does not exist"):
        validate(c)


def test_weight_decay_mask_and_transition_labels():
    from flax import nnx

    from gateloop_jax.models import build_model, preset_config

    for name in ("gateloop", "gateloop_fixed"):
        model = build_model(preset_config("test", name=name, use_bias=True), rngs=nnx.Rngs(0))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        flat = {"/".join(map(str, (getattr(k, "key", k) for k in path))): (decay, label) for (path, decay), (_, label)
                in zip(jax.tree_util.tree_flatten_with_path(opt_lib.weight_decay_mask(params))[0],
                       jax.tree_util.tree_flatten_with_path(opt_lib.transition_labels(params))[0])}
        assert flat["embed/embedding"] == (False, "default")
        assert flat["final_norm/scale"] == (False, "default")
        assert flat["blocks/0/mixer_norm/bias"] == (False, "default")
        assert flat["blocks/0/mixer/q_proj/kernel"] == (True, "default")
        assert flat["blocks/0/mixer/q_proj/bias"] == (False, "default")
        assert flat["blocks/0/ffn/up/kernel"] == (True, "default")
        if name == "gateloop":
            assert flat["blocks/0/mixer/gamma_proj/kernel"] == (True, "transition")
            assert flat["blocks/0/mixer/theta_proj/bias"] == (False, "phase")
            assert flat["blocks/0/mixer/theta_proj/kernel"] == (True, "phase")
        else:
            assert flat["blocks/0/mixer/gamma_bias"] == (False, "transition")
            assert flat["blocks/0/mixer/theta_bias"] == (False, "phase")


def test_schedule_and_cadence():
    c = get_config()
    c.total_steps, c.optimizer.warmup_steps, c.optimizer.learning_rate, c.optimizer.end_lr_factor = 100, 10, 1.0, 0.1
    schedule = opt_lib.learning_rate_schedule(c)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(100)], [0.0, 0.5, 1.0, 0.1],
                               rtol=1e-6, atol=1e-7)
    assert [s for s in range(1, 11) if every(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 4) if every(s, 0, 3)] == [3]


@ONE_DEVICE
def test_bfloat16_compute_with_float32_params(one_device, tmp_path):
    c = tiny()
    c.model.dtype = "bfloat16"
    train_and_evaluate(c, str(tmp_path))
    # bf16 activations change the loss at the 1e-2 level, not more; the parameters (and so checkpoints) stay float32.
    np.testing.assert_allclose(losses(str(tmp_path)), one_device, rtol=2e-2, atol=0)
    import gateloop_jax

    model, _, _ = gateloop_jax.load(str(tmp_path))
    from flax import nnx

    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
