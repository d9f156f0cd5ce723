"""One group of bench_modes.py (scope, setting, dtype), in its own process: compile every config (ahead of time,
in threads), then time each (median of synchronised runs, pipelined median), check it against the reference, and
record its memory; a config that cannot run is recorded as skipped with the reason.
"""

from __future__ import annotations

import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_modes_peers import LENGTH_BOUND_MODES, PEER_MODES, PEERS_JLA, PEERS_SOFTMAX, csv  # noqa: E402
from bench_modes_work import (  # noqa: E402
    abstract,
    gateloop_modes,
    key_of,
    layer_fn,
    layer_inputs,
    layer_module,
    nbytes,
    op_fn,
    op_inputs,
    resolve_auto,
    setting_dims,
)


def run_group(args, group: str, emit, skip: set[str], deadline: float) -> None:
    bc.configure_jax_memory()
    import jax
    import jax.numpy as jnp

    scope, setting, dtype = group.split(":")
    dims = setting_dims(args, setting)
    modes = gateloop_modes(args)
    peers = csv(args.peers) if setting == "multihead" else []
    if scope == "layer":
        peers = [p for p in peers if p in PEERS_SOFTMAX]  # the jla peers are ops, with no layer here
    if any(p in PEERS_JLA for p in peers):
        from gateloop_jax.ops import gla_rotation

        jla_missing = gla_rotation.kernel_unavailable()
    else:
        jla_missing = None
    passes = csv(args.passes)
    group_start = time.perf_counter()
    limit = bc.memory_stats().get("bytes_limit")

    configs, aliases = [], []
    lengths = csv(args.layer_lengths) if (scope == "layer" and args.layer_lengths) else csv(args.lengths)
    for t in map(int, lengths):
        b = args.tokens // t
        base = {
            "scope": scope,
            "setting": setting,
            "dtype": dtype,
            "length": t,
            "batch": b,
            "tokens": b * t,
            **dims,
            "gates": (args.gates_file or "random") if scope == "op" else "the layer's own",
            "segment_length": args.segment_length if scope == "op" else 0,
        }
        auto = resolve_auto(dims, t, max(b, 1)) if "auto" in modes else None
        for mode in modes + [p for p in peers if p not in modes]:
            for pass_ in passes:
                c = {**base, "mode": mode, "pass": pass_, "kind": "peer" if mode in PEER_MODES else "gateloop"}
                if b < 1:
                    c["skipped"] = f"length {t} exceeds --tokens {args.tokens}"
                elif mode in PEER_MODES and args.segment_length and scope == "op":
                    c["skipped"] = "--segment_length: the peers take no segment_ids"
                elif mode in PEERS_JLA and jla_missing:
                    c["skipped"] = jla_missing
                elif mode == "attention" and limit:
                    # Skip without compiling what cannot fit: compiling only to read XLA's estimate costs time.
                    # fwd holds at least the decay; fwdbwd at least the decay and its cotangent.
                    need = b * dims["heads"] * dims["d_qk"] * t * t * 4 * (1 if pass_ == "fwd" else 2)
                    if need > limit:
                        c["skipped"] = (
                            f"would need more than {need / 2**30:.0f} GiB (the (b, h, d_qk, t, t) "
                            f"float32 decay tensor{'' if pass_ == 'fwd' else ' and its cotangent'}), "
                            f"the device has {limit / 2**30:.1f} GiB"
                        )
                elif mode == "auto" and auto in modes and auto != "auto":
                    c["alias_of"] = auto
                    aliases.append(c)
                    continue
                if mode == "auto" and auto:
                    c["resolved_mode"] = auto
                configs.append(c)
    configs = [c for c in configs if key_of(c) not in skip]

    # Layer parameters are shared by the modes (one set of parameters, several ways to compute).
    modules = {}
    if scope == "layer":
        from flax import nnx

        for mode in ["gateloop"] + (list(PEERS_SOFTMAX) if peers else []):
            graphdef, params = nnx.split(layer_module(mode, dims, dtype))
            modules[mode] = (graphdef, params)

    def build(c, *, upcast=False, mode=None):
        mode = mode or c["mode"]
        if scope == "op":
            return op_fn(mode, c["pass"], args.chunk_size, upcast=upcast, segments=bool(args.segment_length))
        graphdef, _ = modules[mode if mode in PEERS_SOFTMAX else "gateloop"]
        return layer_fn(graphdef, mode, c["pass"])

    length_rank = {int(t): i for i, t in enumerate(csv(args.priority_lengths))}

    def priority(k):
        """--order priority: fwdbwd before fwd, then --priority_lengths first (the lengths a report quotes)."""
        if isinstance(k, tuple):  # ("ref", length, mode, pass)
            _, t, _, pass_ = k
        else:
            _, _, _, t, _, pass_ = k.split("/")
        t = int(t)
        return (pass_ != "fwdbwd", length_rank.get(t, len(length_rank)), t)

    def ref_mode_of(c):
        """The mode c's error is measured against; None for jla_gla, a different function (real gates)."""
        if c["mode"] == "jla_gla":
            return None
        return "softmax_xla" if c["mode"] in PEERS_SOFTMAX else args.reference

    def input_specs(c):
        """Abstract arguments (for compiling before any input exists)."""
        t, b = c["length"], c["batch"]
        if scope == "op":
            shapes = {
                "q": (b, t, dims["heads"], dims["d_qk"]),
                "k": (b, t, dims["heads"], dims["d_qk"]),
                "v": (b, t, dims["heads"], dims["d_v"]),
                "dy": (b, t, dims["heads"], dims["d_v"]),
            }
            specs = {n: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for n, s in shapes.items()}
            specs["log_magnitude"] = specs["phase"] = jax.ShapeDtypeStruct(shapes["q"], jnp.float32)
            specs["segment_ids"] = jax.ShapeDtypeStruct((b, t), jnp.int32)
        else:
            x = jax.ShapeDtypeStruct((b, t, dims["d_model"]), jnp.dtype(dtype))
            params = modules[c["mode"] if c["mode"] in PEERS_SOFTMAX else "gateloop"][1]
            specs = {"x": x, "dy": x, "params": abstract(params)}
        return specs

    def inputs_for(t, b):
        seed = 1000 + t  # the same inputs for every mode at this length
        if scope == "op":
            return op_inputs(seed, b, t, dims, dtype, args.gates_file, args.segment_length)
        x = layer_inputs(seed, b, t, dims["d_model"], dtype)
        return x

    def args_for(c, inputs, names):
        out = []
        for n in names:
            if n == "params":
                out.append(modules[c["mode"] if c["mode"] in PEERS_SOFTMAX else "gateloop"][1])
            else:
                out.append(inputs[n])
        return out

    # -- phase 1: compile everything (concurrently), read XLA's memory estimate ---------------------------------
    jobs, names_of = {}, {}
    for c in configs:
        if "skipped" in c:
            continue
        fn, names = build(c)
        names_of[key_of(c)] = names
        specs = input_specs(c)
        jobs[key_of(c)] = (fn, [specs[n] for n in names])
    # The references (float32 upcasts of the same inputs for the op) compile in the same batch. Where the reference
    # is the very same program as a benchmarked config (float32 inputs, or the layer), that executable is reused.
    ref_jobs = {}
    for c in configs:
        if "skipped" in c:
            continue
        ref_mode = ref_mode_of(c)
        if ref_mode is None:
            continue
        same = key_of({**c, "mode": ref_mode})
        if scope == "layer" or dtype == "float32":
            if same in jobs:
                continue
        ref_key = ("ref", c["length"], ref_mode, c["pass"])
        if ref_key not in ref_jobs:
            fn, names = build(c, upcast=True, mode=ref_mode)
            specs = input_specs({**c, "mode": ref_mode})
            ref_jobs[ref_key] = (fn, [specs[n] for n in names])
            names_of[ref_key] = names
    workers = args.compile_workers or (6 if jax.default_backend() == "gpu" else 1)
    all_jobs = {**jobs, **ref_jobs}
    if args.order == "priority":
        all_jobs = dict(sorted(all_jobs.items(), key=lambda kv: priority(kv[0])))
    compile_deadline = deadline - 0.5 * max(deadline - time.perf_counter(), 0.0) if deadline else 0.0
    compiled = bc.compile_many(all_jobs, workers, compile_deadline)
    ref_executables = {k: v[0] for k, v in compiled.items() if k in ref_jobs and not isinstance(v, Exception)}
    ref_failures = {k: v for k, v in compiled.items() if k in ref_jobs and isinstance(v, Exception)}
    executables = {}
    for c in configs:
        k = key_of(c)
        if k not in compiled:
            continue
        result = compiled[k]
        if isinstance(result, Exception):
            c["skipped"] = f"compile failed: {type(result).__name__}: {str(result).splitlines()[0][:300]}"
            continue
        exe, seconds, analysis = result
        c["compile_s"] = seconds
        c["xla_memory"] = analysis
        est = analysis.get("estimated_peak_bytes")
        if limit and est and est > 0.95 * limit:
            c["skipped"] = (
                f"would need {est / 2**30:.1f} GiB (XLA's compile-time estimate), the device has "
                f"{limit / 2**30:.1f} GiB"
            )
            continue
        executables[k] = exe
    for c in configs:
        if "skipped" in c:
            emit({"key": key_of(c), "record": c})
    print(f"[{group}] compiled {len(jobs)} configs in {time.perf_counter() - group_start:.1f} s", flush=True)

    # -- phase 2: time, in ascending order of the memory estimate ---------------------------------------------
    error_reserve = 0.2 * max(deadline - time.perf_counter(), 0.0) if deadline else 0.0
    if args.order == "priority":
        order = sorted((c for c in configs if key_of(c) in executables), key=lambda c: priority(key_of(c)))
    else:
        order = sorted(
            (c for c in configs if key_of(c) in executables),
            key=lambda c: (c.get("xla_memory", {}).get("estimated_peak_bytes", 0), c["length"]),
        )
    max_peak_seen = bc.memory_stats().get("peak_bytes_in_use", 0)
    # XLA's GEMM autotuning allocates device memory while compiling: readings below this level are masked by it.
    peak_after_compile = max_peak_seen
    last_run: dict[tuple, tuple[int, float]] = {}  # (mode, pass) -> (length, seconds of one run)
    for c in order:
        k = key_of(c)
        if deadline and time.perf_counter() > deadline - error_reserve:
            c["skipped"] = "overall time budget (--budget_s) spent before this config"
            continue
        prev = last_run.get((c["mode"], c["pass"]))
        if prev and prev[0] < c["length"] and c["mode"] in LENGTH_BOUND_MODES:
            # At a fixed number of tokens these grow ~linearly with length (sequential steps; t^2 / t work); the
            # parallel modes stay ~flat, so they are never skipped on an extrapolation (one run decides).
            predicted = prev[1] * c["length"] / prev[0]
            runs = max(args.warmup, 1) + args.reps
            if predicted * runs > args.config_budget_s:
                c["skipped"] = (
                    f"too slow: estimated {predicted:.3g} s per run from {prev[1]:.3g} s at length "
                    f"{prev[0]}; {runs} runs would take {predicted * runs:.3g} s (budget "
                    f"{args.config_budget_s:.3g} s per config)"
                )
                c["estimated_s"] = predicted
                emit({"key": k, "record": c})
                continue
        emit({"key": k, "started": True})
        baseline = bc.memory_stats().get("bytes_in_use")
        inputs = inputs_for(c["length"], c["batch"])
        call_args = args_for(c, inputs, names_of[k])
        c["input_bytes"] = nbytes(call_args)
        exe = executables[k]
        try:
            timing = bc.time_calls(
                lambda: exe(*call_args),  # noqa: F821 - deleted after use
                warmup=args.warmup,
                reps=args.reps,
                budget_s=args.config_budget_s,
                pipeline=args.pipeline,
            )
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at run time
            timing = {"skipped": f"run failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        c.update(timing)
        if "median_s" in c or "single_run_s" in c:
            last_run[(c["mode"], c["pass"])] = (c["length"], c.get("median_s", c.get("single_run_s")))
        stats = bc.memory_stats()
        if "peak_bytes_in_use" in stats:
            peak = stats["peak_bytes_in_use"]
            c["peak_bytes"] = peak
            c["peak_exact"] = peak > max_peak_seen
            c["baseline_bytes"] = baseline
            c["peak_after_compile_bytes"] = peak_after_compile
            max_peak_seen = max(max_peak_seen, peak)
        if "median_s" in c:
            c["tokens_per_s"] = c["tokens"] / c["median_s"]
        del inputs, call_args
        emit({"key": k, "record": c})
        piped = f" ({c['pipelined_median_s'] * 1e3:.3f} pipelined)" if "pipelined_median_s" in c else ""
        print(
            f"[{group}] {k}: {c.get('median_s', float('nan')) * 1e3:.3f} ms{piped} {c.get('skipped', '')}", flush=True
        )

    # -- phase 3: errors against the reference, re-running each executable on the same inputs -------------------
    by_length = {}
    for c in configs:
        if key_of(c) in executables and ("median_s" in c or c.get("single_run_s", math.inf) < args.config_budget_s):
            by_length.setdefault(c["length"], []).append(c)
    for t in sorted(by_length):
        cs = by_length[t]
        if deadline and time.perf_counter() > deadline:
            for c in cs:
                c["error_skipped"] = "overall time budget (--budget_s) spent before the error check"
                emit({"key": key_of(c), "record": c})
            continue
        inputs = inputs_for(t, cs[0]["batch"])
        refs = {}
        for c in cs:
            ref_mode = ref_mode_of(c)
            if ref_mode is None:
                c["error_skipped"] = "no reference: real gates (no phase), a different function, timed for speed"
                emit({"key": key_of(c), "record": c})
                continue
            ref_key = ("ref", t, ref_mode, c["pass"])
            try:
                if ref_key not in refs:
                    if ref_key in ref_failures:
                        raise ref_failures[ref_key]
                    if ref_key in ref_executables:
                        exe, names = ref_executables[ref_key], names_of[ref_key]
                    else:
                        same = key_of({**c, "mode": ref_mode})
                        exe, names = executables[same], names_of[same]
                    refs[ref_key] = jax.device_get(exe(*args_for({"mode": ref_mode}, inputs, names)))
                out = jax.device_get(executables[key_of(c)](*args_for(c, inputs, names_of[key_of(c)])))
                c["reference"] = ref_mode if scope == "layer" else f"{ref_mode} (float32)"
                c["error"] = bc.max_rel_error(out, refs[ref_key])
                if scope == "op" and c["pass"] == "fwdbwd":  # name the leaves: y, then the inputs' gradients
                    labels = ["y"] + [f"d{n}" for n in names_of[key_of(c)][:-1]]
                    c["error"]["per_output"] = dict(zip(labels, c["error"].pop("leaf_max_rel")))
            except Exception as err:  # noqa: BLE001 - e.g. the reference does not fit or was skipped
                c["error_skipped"] = f"reference unavailable: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
            emit({"key": key_of(c), "record": c})
        del inputs, refs

    for c in configs:
        if "skipped" in c or "median_s" not in c:
            emit({"key": key_of(c), "record": c})
    for c in aliases:
        emit({"key": key_of(c), "record": c})
