"""The benchmarks of experiments/ at tiny size on CPU: they run, write the JSON the tables and plots read, and every
mode agrees with the reference mode on the same inputs. (The real figures come from the H200; see
experiments/README.md.)"""

import json
import math
import os
import sys

import numpy as np
import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
# experiments/ (what users run) and experiments/kernel_dev/ (the kernel tooling) import as top-level modules.
sys.path[:0] = [EXPERIMENTS, os.path.join(EXPERIMENTS, "kernel_dev")]

import bench_decode  # noqa: E402
import bench_modes  # noqa: E402
import bench_train  # noqa: E402
import plot_bench  # noqa: E402
import profile_pallas_chunked  # noqa: E402

ENV_KEYS = {"command", "git_commit", "platform", "device_kind", "jax", "jaxlib", "date_utc"}


def _check_env(env):
    assert ENV_KEYS <= set(env), ENV_KEYS - set(env)


def test_bench_modes_tiny(tmp_path):
    from gateloop_jax import ops

    out = tmp_path / "modes"
    bench_modes.main(["--out", str(out), "--tokens", "42", "--lengths", "21", "--settings", "multihead",
                      "--heads", "2", "--d_head", "4", "--dtypes", "float32", "--passes", "fwd", "--scopes", "op",
                      "--peers", "softmax_xla", "--reps", "2", "--warmup", "1", "--isolate", "none",
                      "--copy_bytes", "65536"])
    result = json.loads((out / "modes.json").read_text())
    _check_env(result["env"])
    assert result["copy_bandwidth"]["correct"] and result["copy_bandwidth"]["bytes_per_s"] > 0
    # Peers that cannot be imported are reported with the reason, never dropped.
    for name in ("jax-linear-attention", "fla"):
        peer = result["peers"][name]
        assert peer["status"] in ("available", "skipped")
        assert peer["status"] == "available" or peer["reason"]
    records = {r["mode"]: r for r in result["records"]}
    kernel_modes = set(getattr(ops, "KERNEL_MODES", ()))
    assert set(ops.MODES) | kernel_modes | {"auto", "softmax_xla"} == set(records)
    for mode, r in records.items():
        assert r["length"] == 21 and r["batch"] == 2 and r["dtype"] == "float32" and r["pass"] == "fwd"
        if mode in kernel_modes and "skipped" in r:
            assert len(r["skipped"]) > 10  # e.g. a kernel without a multi-head version: skipped with the reason
            continue
        assert "skipped" not in r, r.get("skipped")
        assert r["median_s"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0
        assert len(r["times_s"]) == 2
        assert r["pipelined_median_s"] > 0 and r["pipeline"] == 5  # --pipeline's default: both timings per config
        # float32 accumulation in every mode: far under 1e-3 against the float32 recurrent reference.
        assert r["error"]["max_rel"] < 1e-4, (mode, r["error"])
        if r["kind"] == "gateloop":
            assert r["bandwidth_bound_s"] > 0 and r["min_bytes"] > 0
    assert records["auto"].get("alias_of") or records["auto"].get("resolved_mode")
    md = (out / "modes.md").read_text()
    assert "op fwd, multihead, float32" in md and "21" in md
    # A later modes_*.json re-running a configuration supersedes its record: one point per length in the plots.
    rerun = dict(result, records=[dict(records["scan"], median_s=123.0)])
    (out / "modes_rerun.json").write_text(json.dumps(rerun))
    merged = plot_bench.merge_modes(json.loads((out / "modes.json").read_text()), str(out))
    scans = [r for r in merged["records"] if r["mode"] == "scan"]
    assert [r["median_s"] for r in scans] == [123.0] and len(merged["records"]) == len(result["records"])
    assert any(p.endswith("modes_op_fwd_multihead.png") for p in plot_bench.main(["--results", str(out)]))


def test_bench_modes_fwdbwd_computes_y():
    """fwd+bwd returns y with the gradients, as a training step needs it. GateLoop's backward does not read y, so a
    timing of the gradients alone lets XLA drop y's kernels (the multi-head Pallas op's forward query side) and
    flatters GateLoop against attention, whose backward reads its output."""
    import jax.numpy as jnp

    from gateloop_jax import ops

    dims = {"heads": 2, "d_qk": 4, "d_v": 4}
    inputs = bench_modes.op_inputs(3, 1, 16, dims, "float32")
    fwdbwd, names = bench_modes.op_fn("scan", "fwdbwd", None)
    y, *grads = fwdbwd(*(inputs[n] for n in names))
    a = ops.PolarTransition(inputs["log_magnitude"], inputs["phase"])
    want = ops.gateloop(inputs["q"], inputs["k"], inputs["v"], a, mode="scan")
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=0, atol=0)
    assert [g.shape for g in grads] == [inputs[n].shape for n in names[:-1]]
    assert jnp.all(jnp.isfinite(jnp.stack([jnp.sum(g) for g in grads])))


def test_bench_modes_jla_peers_skip_with_reason(tmp_path):
    """Without jax-linear-attention (or a Hopper GPU) its peer, and mode gla_rotation which runs its kernel, are
    reported as skipped with the reason."""
    out = tmp_path / "modes"
    bench_modes.main(["--out", str(out), "--tokens", "16", "--lengths", "16", "--settings", "multihead",
                      "--heads", "2", "--d_head", "4", "--dtypes", "bfloat16", "--passes", "fwdbwd", "--scopes", "op",
                      "--modes", "scan,gla_rotation", "--peers", "jla_gla", "--reps", "1", "--warmup", "1",
                      "--isolate", "none", "--copy_bytes", "65536"])
    records = {r["mode"]: r for r in json.loads((out / "modes.json").read_text())["records"]}
    assert set(records) == {"scan", "gla_rotation", "jla_gla"}
    assert "jax-linear-attention" in records["jla_gla"]["skipped"] and records["jla_gla"]["kind"] == "peer"
    assert "mode='gla_rotation' cannot run here" in records["gla_rotation"]["skipped"]
    assert records["gla_rotation"]["kind"] == "gateloop"


def test_check_gla_rotation_records_why_it_cannot_run(tmp_path):
    """On a machine without jax-linear-attention's kernel every check records the mode's own error, and the JSON is
    written (on the H200 the same script measured the mode: results/gla_rotation_h200.json)."""
    import check_gla_rotation

    out = check_gla_rotation.main(["--out", str(tmp_path), "--shapes", "2x16", "--heads", "2", "--d_head", "64",
                                   "--layer_shape", "1x8"])
    _check_env(out["env"])
    (row,) = out["rows"]
    assert "mode='gla_rotation' cannot run here" in row["error"]
    assert "mode='gla_rotation' cannot run here" in out["layer"]["layer_error"]
    assert json.loads((tmp_path / "gla_rotation_h200.json").read_text())["rows"] == out["rows"]


def test_bench_modes_learned_gates(tmp_path):
    """--gates_file: a trained model's log|a| (tame_fraction.py --save_gates) tiled to the shape replaces the random
    gates; every mode still agrees with the reference on them."""
    gates = os.path.join(EXPERIMENTS, "results", "kernel_dev", "gates_memory_horizon_multihead.npz") + ":layer1"
    out = tmp_path / "modes"
    bench_modes.main(["--out", str(out), "--tokens", "32", "--lengths", "32", "--settings", "multihead",
                      "--heads", "2", "--d_head", "4", "--dtypes", "float32", "--passes", "fwdbwd", "--scopes", "op",
                      "--modes", "scan,chunked", "--peers", "", "--reps", "1", "--warmup", "1", "--isolate", "none",
                      "--copy_bytes", "65536", "--gates_file", gates])
    records = json.loads((out / "modes.json").read_text())["records"]
    assert {r["mode"] for r in records} == {"scan", "chunked"}
    import tame_fraction

    dims = {"heads": 2, "d_qk": 4, "d_v": 4}
    inputs = bench_modes.op_inputs(1032, 1, 32, dims, "float32", gates)
    want = tame_fraction.tile_gates(tame_fraction.load_gates(gates), 1, 32, 2, 4)
    np.testing.assert_array_equal(np.asarray(inputs["log_magnitude"]), want)
    for r in records:
        assert r["gates"] == gates and "skipped" not in r, r.get("skipped")
        assert r["error"]["max_rel"] < 1e-4, r["error"]
        # fwd+bwd errors are also given per output, named.
        assert list(r["error"]["per_output"]) == ["y", "dq", "dk", "dv", "dlog_magnitude", "dphase"]
        assert max(r["error"]["per_output"].values()) == r["error"]["max_rel"]


def test_bench_modes_skips_with_reason(tmp_path):
    """A config over the per-config budget is reported as skipped with the reason."""
    out = tmp_path / "modes"
    bench_modes.main(["--out", str(out), "--tokens", "16", "--lengths", "16", "--settings", "maxheaded",
                      "--d_model", "4", "--dtypes", "float32", "--passes", "fwd", "--scopes", "op",
                      "--modes", "recurrent", "--reps", "2", "--warmup", "1", "--isolate", "none",
                      "--config_budget_s", "0", "--copy_bytes", "65536"])
    (record,) = json.loads((out / "modes.json").read_text())["records"]
    assert record["skipped"].startswith("too slow") and "single_run_s" in record


def test_bench_decode_tiny(tmp_path):
    decode = bench_decode.main(["--out", str(tmp_path), "--models", "gateloop:test,transformer:test",
                                "--contexts", "8,16", "--batches", "1", "--steps", "2", "--reps", "2",
                                "--warmup", "1"])
    _check_env(decode["env"])
    assert len(decode["records"]) == 4
    for r in decode["records"]:
        assert "skipped" not in r, r.get("skipped")
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and r["cache_bytes"] > 0 and r["tokens_in_range"]
    by = {(r["name"], r["context"]): r for r in decode["records"]}
    # The recurrent cache is O(1) in the context; the KV cache grows with it.
    assert by[("gateloop", 8)]["cache_bytes"] == by[("gateloop", 16)]["cache_bytes"]
    assert by[("transformer", 8)]["cache_bytes"] < by[("transformer", 16)]["cache_bytes"]
    written = plot_bench.main(["--results", str(tmp_path)])
    assert any(p.endswith("decode.png") for p in written)
    assert "Decode benchmark" in (tmp_path / "bench.md").read_text()


def test_bench_train_tiny(tmp_path):
    train = bench_train.main(["--out", str(tmp_path), "--models", "gateloop:test,transformer:test",
                              "--mode", "recurrent", "--length", "16", "--batch", "2", "--reps", "2", "--warmup", "1",
                              "--matmul_n", "64", "--isolate", "none", "--remat",
                              "--loss_chunk_size", "4"])
    _check_env(train["env"])
    for r in train["records"]:
        assert "skipped" not in r, r.get("skipped")
        assert r["finite"] and r["tokens_per_s"] > 0 and r["params"] > 0 and r["loss_chunk_size"] == 4
        assert 0 < r["mfu"] and math.isfinite(r["mfu_measured_peak"])
    assert train["matmul"]["flops_per_s"] > 0
    plot_bench.main(["--results", str(tmp_path), "--no_plots"])
    assert "Training-step benchmark" in (tmp_path / "bench.md").read_text()


def test_bench_train_reads_the_child_record_before_trailing_logs():
    """A model's child prints its record on stdout; XLA may log to stderr afterwards (the text holds both): the
    record is still found, and a child that printed none gives None."""
    text = '{"model": "gateloop:test", "tokens_per_s": 1.0}\nE1207 slow_operation_alarm.cc:140] took 2m35s\n***\n'
    assert bench_train._child_record(text) == {"model": "gateloop:test", "tokens_per_s": 1.0}
    assert bench_train._child_record("Traceback ...\nModuleNotFoundError: No module named 'grain'\n") is None


def test_profile_pallas_chunked_tiny(tmp_path):
    """Every kernel of the multi-head Pallas op timed alone (interpret mode here), plus the whole op."""
    gates = os.path.join(EXPERIMENTS, "results", "kernel_dev", "gates_memory_horizon_multihead.npz") + ":layer1"
    res = profile_pallas_chunked.main(["--smoke", "--lengths", "32", "--runs", "1", "--out", str(tmp_path),
                                       "--heads", "2", "--gates_file", gates])
    # The random gates, then the learned ones (tame_fraction.py --save_gates) tiled to the shape.
    assert [r["gates"] for r in res["rows"]] == ["forgetting=0", gates]
    for row in res["rows"]:
        assert "error" not in row, row.get("error")
        for stage in ("fwd_outer", "fwd_carry", "fwd_query", "bwd_outer", "bwd_carry", "bwd_query", "bwd_key"):
            assert row[stage] > 0, stage
    assert (tmp_path / "profile_pallas_chunked.json").exists()


def test_profile_pallas_chunked_variant(tmp_path):
    """--variants picks a non-default config (here 8 chunks per carry step), profiled stage by stage; --dtypes runs
    the stages on bf16 q, k, v and cotangent as ops.gateloop passes them."""
    res = profile_pallas_chunked.main(["--smoke", "--lengths", "32", "--runs", "1", "--out", str(tmp_path),
                                       "--heads", "2", "--variants", "carry_u8", "--dtypes", "bfloat16"])
    [row] = res["rows"]
    assert row["variant"] == "carry_u8" and row["dtype"] == "bfloat16"
    assert "error" not in row, row.get("error")
    for stage in ("fwd_outer", "fwd_carry", "fwd_query", "bwd_outer", "bwd_carry", "bwd_query", "bwd_key"):
        assert row[stage] > 0, stage


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_bench_modes_segment_length(tmp_path):
    """--segment_length: packed rows (segment_ids) in the op; the modes still agree with the reference, which gets the
    same ids, and the peers, which take none, are skipped with the reason."""
    out = tmp_path / "segments"
    bench_modes.main(["--out", str(out), "--tokens", "32", "--lengths", "32", "--settings", "multihead",
                      "--heads", "2", "--d_head", "4", "--dtypes", "float32", "--passes", "fwdbwd", "--scopes", "op",
                      "--modes", "scan,chunked", "--peers", "softmax_xla", "--reps", "1", "--warmup", "1",
                      "--isolate", "none", "--copy_bytes", "65536", "--segment_length", "6"])
    records = {r["mode"]: r for r in json.loads((out / "modes.json").read_text())["records"]}
    assert "segment_ids" in records["softmax_xla"]["skipped"]
    for mode in ("scan", "chunked"):
        assert records[mode]["segment_length"] == 6 and "skipped" not in records[mode]
        assert records[mode]["error"]["max_rel"] < 1e-4, records[mode]["error"]  # float32 against float32 recurrent
    ids = np.asarray(bench_modes.op_inputs(1032, 1, 32, {"heads": 2, "d_qk": 4, "d_v": 4}, "float32",
                                           segment_length=6)["segment_ids"])
    assert 1 <= ids[0, -1] <= 20  # ~5 starts expected in 32 positions at probability 1/6


def test_segments_overhead_compares_runs(tmp_path):
    """experiments/segments_overhead.py: each config of a --segment_length run against the same config without."""
    import segments_overhead

    rec = {"setting": "multihead", "dtype": "bfloat16", "length": 2048, "mode": "pallas", "pass": "fwdbwd"}
    for s, median in ((0, 2.0), (512, 2.1)):
        (tmp_path / f"len{s}").mkdir()
        records = [dict(rec, median_s=median, error={"max_rel": 1e-6}), dict(rec, mode="chunked", skipped="slow")]
        (tmp_path / f"len{s}" / "modes.json").write_text(json.dumps({"records": records}))
    rows = segments_overhead.main([str(tmp_path), "512"])
    assert len(rows) == 1 and rows[0]["segment_length"] == 512 and rows[0]["mode"] == "pallas"
    assert math.isclose(rows[0]["median_s"]["overhead"], 0.05)
    assert json.loads((tmp_path / "overhead.json").read_text()) == rows
