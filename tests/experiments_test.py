"""The experiment drivers of experiments/ (memory_horizon.py, mqar.py, mqar_grid.py, sweeps.py): aggregation and plots
on fabricated metrics.jsonl files, the transition profiles on fabricated arrays, every command the drivers would launch
parsed into a valid config by the trainer's own config flag, run_jobs's time budget on stand-in processes, and one
tiny trainer run of the MQAR grid through run, pack and aggregate."""

import json
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
# experiments/ (what users run) and experiments/kernel_dev/ (the kernel tooling) import as top-level modules.
sys.path[:0] = [EXPERIMENTS, os.path.join(EXPERIMENTS, "kernel_dev")]

import memory_horizon  # noqa: E402
import mqar  # noqa: E402
import mqar_grid  # noqa: E402
import mqar_runs  # noqa: E402
import results_common as cr  # noqa: E402
import sweeps  # noqa: E402
import transition_plots  # noqa: E402

TINY_MODEL = {"name": "gateloop", "vocab_size": 12, "d_model": 8, "num_layers": 1, "num_heads": 2, "mlp_dim": 16}


def _fake_run(workdir, *, seed, total_steps, final, eval_every=50, wall=12.5):
    """A workdir as the trainer + driver leave it: config.json, metrics.jsonl (train and eval rows), driver.json."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"seed": seed, "total_steps": total_steps, "model": TINY_MODEL}))
    rows = []
    for step in range(eval_every, total_steps + 1, eval_every):
        rows.append({"step": step, "time": 1.0 * step, "train/loss": 1.0 / step})
        rows.append({"step": step, "time": 1.0 * step, "eval/loss": 1.0 - final * step / total_steps,
                     "eval/accuracy": final * step / total_steps})
    lines = [json.dumps(r) for r in rows] + ['{"step": 9']  # a torn last line, as a live run may leave
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (workdir / "driver.json").write_text(json.dumps({"wall_seconds": wall, "returncode": 0}))


@pytest.fixture
def fake_runs(tmp_path):
    groups = {}
    for name, finals in (("gateloop", (0.9, 1.0)), ("fixed", (0.2, 0.4))):
        groups[name] = []
        for seed, final in enumerate(finals):
            wd = tmp_path / f"{name}_s{seed}"
            _fake_run(wd, seed=seed, total_steps=200, final=final)
            groups[name].append(wd)
    # An unfinished run and a run that never evaluated.
    _fake_run(tmp_path / "real_s0", seed=0, total_steps=400, final=0.5)
    rows = [json.loads(line) for line in (tmp_path / "real_s0" / "metrics.jsonl").read_text().splitlines()[:-1]]
    (tmp_path / "real_s0" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r["step"] <= 200))
    groups["real"] = [tmp_path / "real_s0", tmp_path / "real_s1"]
    return groups


def test_summarize_table_and_curves(fake_runs, tmp_path):
    summary = cr.summarize_runs(fake_runs)
    g = summary["models"]["gateloop"]
    assert g["num_runs"] == 2 and g["missing"] == []
    np.testing.assert_allclose(g["final_accuracy_mean"], 0.95, rtol=0, atol=1e-12)
    np.testing.assert_allclose(g["final_accuracy_std"], 0.05, rtol=0, atol=1e-12)  # population std (ddof=0)
    np.testing.assert_allclose(g["wall_seconds_mean"], 12.5, rtol=0, atol=1e-12)
    assert g["runs"][0]["steps"] == [50, 100, 150, 200] and g["runs"][0]["complete"]
    assert g["params"] is not None and g["params"] > 0
    r = summary["models"]["real"]
    assert r["num_runs"] == 1 and r["missing"] == ["real_s1"] and not r["runs"][0]["complete"]
    assert cr.is_done(fake_runs["gateloop"][0], 200) and not cr.is_done(fake_runs["real"][0], 400)

    table = cr.markdown_table(summary, {"gateloop": "GateLoop"}, title="t")
    assert "| GateLoop |" in table and "0.950 ± 0.050" in table and "1 unfinished" in table and "real_s1" in table
    png = tmp_path / "curves.png"
    cr.plot_curves(summary, png, {"gateloop": "GateLoop"}, title="t")
    assert png.stat().st_size > 1000


def test_mqar_table_and_plot(tmp_path):
    groups = {}
    for m, base in (("transformer", 1.0), ("gateloop_multi_head", 0.8)):
        for k in (4, 8):
            wd = tmp_path / f"{m}_k{k}"
            _fake_run(wd, seed=0, total_steps=100, final=base / (k / 4))
            groups[f"{m}_k{k}"] = [wd]
    summary = cr.summarize_runs(groups, count_params=False)
    models = ["transformer", "gateloop_multi_head", "gateloop_max_headed"]
    table = mqar.accuracy_vs_k_table(summary, models, [4, 8])
    assert "| Transformer (4 x 16) | n/a | 1.000 | 0.500 |" in table
    assert "not run" in table  # gateloop_max_headed has no runs
    mqar.plot_accuracy_vs_k(summary, models, [4, 8], tmp_path / "mqar.png")
    assert (tmp_path / "mqar.png").stat().st_size > 1000


def test_nearest_reset_offset():
    R = 10
    tokens = np.array([[1, R, 2, 3, 4, R, 5], [1, 2, 3, 4, 5, 6, 7]])
    off = transition_plots.nearest_reset_offset(tokens, R)
    # Position 3 is equidistant from both RESETs (1 and 5): it belongs to the segment after the earlier one.
    np.testing.assert_array_equal(off[0], [-1, 0, 1, 2, -1, 0, 1])
    assert (off[1] > 1000).all()


def test_transition_profiles_and_plot(tmp_path):
    R, Q = 10, 11
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 12, size=(4, 32))
    mag = np.where(tokens[..., None] == R, 0.0, 1.0) * np.ones((4, 32, 3))  # closes exactly on RESET
    phase = rng.uniform(-np.pi, np.pi, size=(4, 32, 3))
    prof = transition_plots.profiles(tokens, [{"magnitude": mag, "phase": phase}], R, 12)[0]
    p = prof["magnitude_vs_reset_offset"]
    assert p["offset"][transition_plots.WINDOW] == 0 and p["mean"][transition_plots.WINDOW] == 0.0
    assert p["mean"][transition_plots.WINDOW + 1] == 1.0
    by_tok = prof["magnitude_by_token"]["mean"]
    assert by_tok[R] == 0.0 and by_tok[Q] == 1.0
    heat = {"tokens": tokens[0], "labels": [str(t) for t in tokens[0]], "reset_id": R, "name": "fake",
            "layers": [{"magnitude": mag[0], "phase": phase[0]}]}
    png = tmp_path / "transitions.png"
    transition_plots.plot_profiles({"gateloop": [prof], "fixed": [prof]}, heat, png,
                                   token_names=[str(i) for i in range(10)] + ["R", "Q"], title="fake")
    assert png.stat().st_size > 1000


def test_driver_commands_build_valid_configs():
    for variant in memory_horizon.VARIANTS:
        c = cr.config_of_command(memory_horizon.command(variant, 2))
        assert c.seed == 2 and c.total_steps == memory_horizon.TOTAL_STEPS
        assert c.eval_every_steps == memory_horizon.EVAL_EVERY and not c.progress_bar
    # Same size for every variant: d_model, layers, batch (the head layout of the Transformer differs, documented).
    configs = [cr.config_of_command(memory_horizon.command(v, 0)) for v in memory_horizon.VARIANTS]
    assert len({(c.model.d_model, c.model.num_layers, c.global_batch_size, c.total_steps) for c in configs}) == 1
    for m in mqar.MODELS:
        for k in mqar.NUM_KV_PAIRS:
            c = cr.config_of_command(mqar.command(m, k, 0))
            assert c.data.num_kv_pairs == k and c.data.seq_len >= 3 * k


@pytest.mark.parametrize("sweep", list(sweeps.SWEEPS))
@pytest.mark.parametrize("base", list(sweeps.BASES))
def test_sweep_points_build_valid_configs(sweep, base):
    field, values = sweeps.SWEEPS[sweep]
    points = sweeps.points(sweep, base)
    assert [p["name"] for p in points] == [str(v) for v in values]
    for p in points:
        config = sweeps.build_config(sweep, base, p)
        assert config.model[field] == p["overrides"][f"model.{field}"]
        assert config.total_steps == sweeps.BASES[base]["total_steps"]


def test_sweep_lists_required_axes():
    assert set(sweeps.SWEEPS["init"][1]) == {"slow_forget", "lru_ring", "default"}
    assert set(sweeps.SWEEPS["magnitude_activation"][1]) == {"sigmoid", "sigmoid_tempered", "lru_exp"}
    assert set(sweeps.SWEEPS["phase_activation"][1]) == {"identity", "tanh_pi"}


def test_unknown_override_is_an_error():
    with pytest.raises(Exception, match="bogus"):
        cr.config_of_command(["--config=configs/memory_horizon.py:runlocal", "--config.model.bogus=1"])


def test_tame_fraction():
    import tame_fraction

    # 2 heads x 2 channels, 32 steps: blocks of 16. Head 1's channel 3 forgets in the second block only.
    lr = np.full((1, 32, 4), -0.6)
    lr[0, 20, 3] = -20.0
    # Blocks of 16: 9.6 nats everywhere except (block 1, head 1): 29 nats.
    assert tame_fraction.tame_fraction(lr, heads=2, block=16, nats=16.0) == 0.75
    # One block of 32: head 0 decays 19.2 nats, head 1 38.6.
    assert tame_fraction.tame_fraction(lr, heads=2, block=32, nats=16.0) == 0.0
    assert tame_fraction.tame_fraction(lr, heads=2, block=32, nats=30.0) == 0.5
    with pytest.raises(ValueError, match="heads=3"):
        tame_fraction.tame_fraction(lr, heads=3, block=16, nats=16.0)
    # The one untame tile of 16 has one channel of two over the threshold.
    assert tame_fraction.untame_channel_share(lr, heads=2, block=16, nats=16.0) == 0.5


def test_tile_gates():
    import tame_fraction

    src = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (b0, t0, channels)
    out = tame_fraction.tile_gates(src, b=3, t=7, h=3, k=2)
    assert out.shape == (3, 7, 3, 2)
    # Batch row 2 is source row 0, position 5 is source position 2, channel 5 (head 2, column 1) is channel 1.
    assert out[2, 5, 2, 1] == src[0, 2, 1]
    assert out[1, 3, 0, 0] == src[1, 0, 0]


def test_mqar_grid_order_commands_and_state_size():
    args = mqar_grid.parse_args(["run"])
    cells = mqar_grid.grid(args)
    assert len(cells) == len(set(cells)) == 4 * 3 * 5 * 2
    # The cell first for every variant at the first lr, then (L, K), d_model, variant, lr ascending.
    assert cells[:5] == [(256, 16, 128, v, 1e-3) for v in mqar_grid.VARIANTS]
    assert cells[5:7] == [(64, 4, 64, "gateloop", 1e-3), (64, 4, 64, "gateloop", 3e-3)]
    assert cells[-1] == (512, 32, 256, "transformer", 3e-3)
    # d_model 128, 4 heads of 32: a complex 32 x 32 matrix per head, a real one, the KV cache of 256 positions.
    assert mqar_grid.state_size("gateloop", 256, 128) == 2 * 4 * 32 * 32
    assert mqar_grid.state_size("linear_attention", 256, 128) == 4 * 32 * 32
    assert mqar_grid.state_size("transformer", 256, 128) == 2 * 256 * 128
    for v in mqar_grid.VARIANTS:
        c = cr.config_of_command(mqar_grid.command(args, 512, 32, 64, v, 3e-3))
        assert (c.data.seq_len, c.data.num_kv_pairs, c.model.d_model, c.model.num_heads) == (512, 32, 64, 4)
        assert c.optimizer.learning_rate == 3e-3 and c.total_steps == 20000 and c.optimizer.warmup_steps == 1000
        assert c.eval_every_steps == 2000 and c.ckpt_every_steps == 20000 and c.data.vocab_size == 8192
    test = mqar_grid.parse_args(["run", "--size", "test"])
    for v in mqar_grid.VARIANTS:
        c = cr.config_of_command(mqar_grid.command(test, 16, 2, 16, v, 1e-3))
        assert (c.data.seq_len, c.model.d_model, c.total_steps, c.data.vocab_size) == (16, 16, 2, 64)
    with pytest.raises(SystemExit):
        mqar_grid.parse_args(["run", "--d_models", "66"])  # not divisible by the 4 heads


def test_memory_horizon_full_size_names_and_configs(tmp_path):
    # The CPU-scale workdirs and results keep their names; the full size has its own.
    assert memory_horizon.workdir("fixed", 1) == memory_horizon.WORKROOT / "fixed_s1"
    assert memory_horizon.stem("runlocal", 3000) == "memory_horizon"
    assert memory_horizon.workdir("fixed", 1, size="full", root=tmp_path) == tmp_path / "fixed_s1_full"
    assert memory_horizon.stem("full", 5000) == "memory_horizon_full"
    for v in memory_horizon.VARIANTS:
        c = cr.config_of_command(memory_horizon.command(v, 2, size="full", root=tmp_path))
        assert c.global_batch_size == 64 and c.total_steps == 5000 and c.seed == 2


def _sleeper(workdir):
    # Counted as a trainer run by live_runs (its argv names gateloop_jax.main and a --workdir), trains nothing.
    return [sys.executable, "-c", "import time; time.sleep(60)", "gateloop_jax.main", f"--workdir={workdir}"]


def test_run_jobs_budget_and_custom_root(tmp_path, monkeypatch):
    monkeypatch.setattr(cr, "POLL_S", 0.2)
    monkeypatch.setattr(cr, "KILL_AFTER_S", 2.0)
    jobs = [(name, _sleeper(tmp_path / name), tmp_path / name, 10) for name in ("a", "b")]
    start = time.time()
    # One slot: b waits while a runs (a live run under a root outside workdirs/experiments is seen), the budget ends
    # before a does, so b never starts and a is stopped at budget + grace.
    outcome = cr.run_jobs(jobs, parallel=1, log=lambda msg: None, root=tmp_path, budget_s=1.5, grace_s=0.5)
    assert outcome == {"finished": [], "failed": [], "stopped": ["a"], "not_started": ["b"]}
    assert time.time() - start < 10
    record = json.loads((tmp_path / "a" / "driver.json").read_text())
    assert record["stopped_by_budget"] and record["returncode"] != 0 and "cpu_count" in record["hardware"]
    assert not (tmp_path / "b").exists()


@pytest.mark.xdist_group("train_subprocess")
def test_mqar_grid_runs_packs_and_aggregates_at_test_size(tmp_path, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gateloop_jax_test_cache"))
    root, out = tmp_path / "runs", tmp_path / "results"
    common = ["--size", "test", "--root", str(root), "--out", str(out)]
    # One trainer run (one variant, one lr of the two the aggregate expects): a partial grid.
    mqar_grid.main(["run", *common, "--variants", "gateloop", "--lrs", "1e-3", "--parallel", "1"])
    name = "L16_K2_d16_gateloop_lr0.001"
    assert cr.is_done(root / name, 2) and (root / name / "checkpoints").exists()
    # Resume: the finished run is skipped, nothing is launched.
    outcome = mqar_grid.run(mqar_grid.parse_args(["run", *common, "--variants", "gateloop", "--lrs", "1e-3"]))
    assert outcome["finished"] == [] and outcome["not_started"] == []

    # Aggregate from the packed small files alone (no checkpoints), as after a remote run.
    archive = tmp_path / "grid.tar.gz"
    mqar_grid.main(["pack", *common, "--to", str(archive)])
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == sorted(f"{name}/{f}" for f in cr.SMALL_FILES)
        tar.extractall(tmp_path / "unpacked")
    mqar_grid.main(["aggregate", "--size", "test", "--root", str(tmp_path / "unpacked"), "--out", str(out)])
    summary = json.loads((out / "mqar_grid_test.json").read_text())
    assert [r["name"] for r in summary["runs"]] == [name]
    (cell,) = summary["cells"]
    assert (cell["variant"], cell["seq_len"], cell["d_model"], cell["state_size"]) == ("gateloop", 16, 16, 128)
    assert cell["complete"] and cell["final_step"] == 2 and cell["lrs_run"] == 1 and cell["lrs_planned"] == 2
    assert 0.0 <= cell["accuracy"] <= 1.0 and summary["runs"][0]["returncode"] == 0
    table = (out / "mqar_grid_test.md").read_text()
    assert "| GateLoop (data-controlled) | " in table and "(1/2 lr) (0.001)" in table
    assert table.count("not run") == len(mqar_grid.VARIANTS) - 1
    assert (out / "mqar_grid_test.png").stat().st_size > 1000


def test_mqar_runs_table_reports_when_each_run_crossed_each_threshold(tmp_path):
    _fake_run(tmp_path / "runs" / "real", seed=0, total_steps=200, final=1.0)  # accuracy step / 200
    _fake_run(tmp_path / "runs" / "gateloop", seed=1, total_steps=200, final=0.8)
    out = tmp_path / "results"
    mqar_runs.main(["--runs", str(tmp_path / "runs" / "real"), str(tmp_path / "runs" / "gateloop"), "--stem", "t",
                    "--machine", "a CPU", "--command", "cmd", "--setting", "tiny", "--out", str(out)])
    summary = json.loads((out / "t.json").read_text())
    assert summary["machine"] == "a CPU" and summary["command"] == "cmd"
    real, gateloop = (summary["models"][n]["runs"][0] for n in ("real", "gateloop"))
    assert real["first_step_at"] == {"0.5": 100, "0.9": 200, "0.95": 200}
    assert gateloop["first_step_at"] == {"0.5": 150, "0.9": None, "0.95": None}
    table = (out / "t.md").read_text()
    assert "| gateloop | 200 | 0.8000 | 150 | - | - |" in table and (out / "t.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        mqar_runs.main(["--runs", str(tmp_path), "--stem", "t", "--machine", "m", "--command", "c"])


def test_mqar_rotation_counts_the_turn_between_each_binding_and_its_query():
    """A phase of c on fillers and d on every other token turns a key by c per filler and d per other token after its
    binding, up to and including its query: the share of pairs within 0.5 rad of no turn is the share whose turn is
    below 0.5 (none comes near a whole turn here), and with no phase at all every pair counts."""
    import mqar_rotation
    from gateloop_jax.data import synthetic

    k, vocab = 4, 64
    batch = synthetic.mqar(np.random.default_rng(0), 8, seq_len=48, num_kv_pairs=k, vocab_size=vocab)
    tokens, mask = np.asarray(batch["inputs"]), np.asarray(batch["mask"], bool)
    c, d = 0.05, 0.2
    phase = np.where(tokens == 0, c, d)[..., None] * np.ones(3)
    stats = mqar_rotation.turn_statistics(tokens, mask, phase, num_kv_pairs=k, vocab_size=vocab)
    turns = []
    for row in range(8):
        for query in np.flatnonzero(mask[row]):
            binding = 2 * int(np.flatnonzero(tokens[row, :2 * k:2] == tokens[row, query])[0])
            after = tokens[row, binding + 1:query + 1]
            turns.append(c * (after == 0).sum() + d * (after != 0).sum())
    turns = np.array(turns)
    assert 0 < (turns < 0.5).mean() < 1 and turns.max() < 2 * np.pi - 0.5  # pairs on both sides of the threshold
    assert stats["share_within_half_radian"] == pytest.approx((turns < 0.5).mean(), abs=0)
    assert stats["mean_abs_cos_key_to_query"] == pytest.approx(np.abs(np.cos(turns)).mean(), rel=1e-6)
    assert stats["mean_abs_phase_filler"] == pytest.approx(c) and stats["mean_abs_phase_key"] == pytest.approx(d)
    still = mqar_rotation.turn_statistics(tokens, mask, 0 * phase, num_kv_pairs=k, vocab_size=vocab)
    assert still["share_within_half_radian"] == 1.0
