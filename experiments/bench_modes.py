"""Benchmark of the GateLoop computation modes: the op and the whole GateLoop layer, forward and forward+backward.

    python experiments/bench_modes.py --out experiments/results            # `make bench`: the full grid
    python experiments/bench_modes.py --out /tmp/b --tokens 256 --lengths 16,32 --heads 2 --d_head 8 --d_model 8 \
        --isolate none                                                       # what tests/bench_test.py runs (CPU)

Grid: lengths 512..16384 at a fixed number of tokens per batch (batch = tokens / length, 32768 by default), two
settings - "multihead" (8 heads, d_qk = d_v = 64) and "maxheaded" (heads = d_model = 512, d_qk = d_v = 1) - every mode
of gateloop_jax.ops.MODES and ops.KERNEL_MODES plus "auto" (a mode added there is picked up), bf16 and float32 inputs,
scope "op" (gateloop_jax.ops.gateloop) and "layer" (gateloop_jax.layers.GateLoopMixer, d_model 512). Peers in the
same run: causal softmax attention of the same shape through jax.nn.dot_product_attention (implementation "cudnn"
and "xla"; for the layer, the CausalSelfAttention layer), and jax-linear-attention / fla when importable (else
reported as skipped with the reason): jla_gla (jla's Mosaic GPU GLA kernel with real gates at key width d_qk, a
different function, timed only; GateLoop through that kernel is the kernel mode "gla_rotation"), and fla's chunk_gla /
chunk_hgrn in a PyTorch child (fla_peers). The transition is complex (|a| in [0.5, 0.9975], phases in [-pi, pi)) and
passed in polar form, float32, as the layer passes it; q, k, v (and the cotangent) are in the benchmark dtype.

Per config: compile time (separately; compiles run `--compile_workers` at a time), median of `--reps` timed runs after
`--warmup` (block_until_ready; with `--pipeline N`, default 5, also the median per call of N calls in flight per
synchronisation, which hides the host's launch gaps as a training loop does), tokens/s, peak device memory, the
memory-bandwidth bound of the op (bytes read and written once at the copy bandwidth measured in the same run), and
the max relative error against `--reference`
(mode "recurrent", in float32 on the same inputs, for GateLoop; the "xla" implementation in float32 for softmax).
A config is never silently dropped: it is measured, or skipped with the reason (XLA's compile-time memory estimate
over the card, too slow for the per-config budget, a compile error, the overall time budget).

Peak memory: JAX has no way to reset the device's peak counter, so each (scope, setting, dtype) group runs in a fresh
process (--isolate group) and its configs run in ascending order of XLA's compile-time estimate of their peak; the row
records device.memory_stats()['peak_bytes_in_use'] after the config and `peak_exact`: true when that reading rose
during this config (so it is this config's own peak), false when an earlier config's peak was higher (the reading is
then only an upper bound). XLA's estimate is recorded beside it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

PEERS_SOFTMAX = ("softmax_cudnn", "softmax_xla")
# jax-linear-attention's Mosaic GPU GLA kernel (module `jla`, Hopper, bf16) with real gates at key width d_qk: what
# complex transitions are to cost no more than. GateLoop through that kernel (the rotation identity, key width 2 d_qk;
# the issue's "GateLoop through jax-linear-attention", "jla_gateloop" in session 7's results) is the kernel mode
# "gla_rotation" of gateloop_jax.ops, benchmarked with the other modes.
PEERS_JLA = ("jla_gla",)
PEER_MODES = PEERS_SOFTMAX + PEERS_JLA
# Modes whose time at a fixed number of tokens grows ~linearly with the length (see the skip estimate in run_group).
LENGTH_BOUND_MODES = ("recurrent", "attention")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="experiments/results", help="folder for modes.json and modes.md")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per batch (batch = tokens // length)")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192,16384")
    p.add_argument("--layer_lengths", default="", help="lengths of scope=layer (default: --lengths)")
    p.add_argument("--settings", default="multihead,maxheaded")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--passes", default="fwd,fwdbwd")
    p.add_argument("--scopes", default="op,layer")
    p.add_argument("--modes", default="", help="comma list; default gateloop_jax.ops.MODES + auto")
    p.add_argument("--peers", default="softmax_cudnn,softmax_xla,jla_gla",
                   help="peers in the same run (multihead only; the jla_* ones scope op, where `jla` is importable)")
    p.add_argument("--heads", type=int, default=8, help="multihead: number of heads")
    p.add_argument("--d_head", type=int, default=64, help="multihead: d_qk = d_v")
    p.add_argument("--d_model", type=int, default=512, help="maxheaded heads, and the layer's d_model")
    p.add_argument("--chunk_size", type=int, default=None, help="chunk length of mode=chunked (default: the op's)")
    p.add_argument("--reference", default="recurrent", help="mode the errors are measured against")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gates_file", default="",
                   help="scope op: log|a| from a trained model (path.npz:layerN, tame_fraction.py --save_gates) tiled "
                        "to each shape, instead of the random gates; the kernels' speed depends on the gates")
    p.add_argument("--segment_length", type=int, default=0,
                   help="scope op: pack each row with segments (segment_ids, a state reset at each start) of this "
                        "mean length, starts at random (seeded); 0: one segment. Peers are skipped (no resets there)")
    p.add_argument("--pipeline", type=int, default=5,
                   help="also time this many calls in flight per sync (pipelined_median_s); 0: synchronised only")
    p.add_argument("--config_budget_s", type=float, default=10.0,
                   help="skip timing a config whose warm-up + reps would exceed this (estimated from one run)")
    p.add_argument("--budget_s", type=float, default=0.0, help="overall time budget (0: none), shared by the groups")
    p.add_argument("--copy_bytes", type=int, default=4 << 30, help="array size of the copy-bandwidth measurement")
    p.add_argument("--order", choices=("memory", "priority"), default="memory",
                   help="memory: run configs in ascending XLA memory estimate (clean peak readings); priority: "
                        "fwdbwd first and --priority_lengths first (what a short time budget should cover)")
    p.add_argument("--priority_lengths", default="1024,8192,4096,2048,512,16384")
    p.add_argument("--compile_workers", type=int, default=0,
                   help="concurrent compiles (0: 4 on GPU, 1 elsewhere); compile_s is measured under this load")
    p.add_argument("--isolate", choices=("group", "none"), default="group",
                   help="group: a fresh process per (scope, setting, dtype) for clean memory statistics")
    p.add_argument("--json", default="modes.json")
    # Internal: one group run as a child process.
    p.add_argument("--_group", default="", help=argparse.SUPPRESS)
    p.add_argument("--_jsonl", default="", help=argparse.SUPPRESS)
    p.add_argument("--_deadline", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--_skip", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


# ---------------------------------------------------------------------------------------------------------------
# The work: inputs, functions, configs.


def setting_dims(args, setting: str) -> dict[str, int]:
    if setting == "multihead":
        return {"heads": args.heads, "d_qk": args.d_head, "d_v": args.d_head, "d_model": args.heads * args.d_head}
    if setting == "maxheaded":
        return {"heads": args.d_model, "d_qk": 1, "d_v": 1, "d_model": args.d_model}
    raise ValueError(f"--settings: unknown setting {setting!r}; choose multihead or maxheaded.")


@functools.lru_cache(maxsize=None)
def _jit_maker(kind: str, b: int, t: int, h: int, dk: int, dv: int, dtype: str):
    """One jitted input generator per shape (a fresh closure per call would recompile every time)."""
    import jax
    import jax.numpy as jnp

    def make_op(key):
        kq, kk, kv, kg, kp, kd = jax.random.split(key, 6)
        qk_shape, v_shape = (b, t, h, dk), (b, t, h, dv)
        return {
            "q": (jax.random.normal(kq, qk_shape, jnp.float32) * dk ** -0.5).astype(dtype),
            "k": jax.random.normal(kk, qk_shape, jnp.float32).astype(dtype),
            "v": jax.random.normal(kv, v_shape, jnp.float32).astype(dtype),
            "log_magnitude": -jax.nn.softplus(-jax.random.uniform(kg, qk_shape, jnp.float32, 0.0, 6.0)),
            "phase": jax.random.uniform(kp, qk_shape, jnp.float32, -jnp.pi, jnp.pi),
            "dy": jax.random.normal(kd, v_shape, jnp.float32).astype(dtype),
        }

    def make_layer(key):
        kx, kd = jax.random.split(key)
        return {"x": jax.random.normal(kx, (b, t, dk), jnp.float32).astype(dtype),
                "dy": jax.random.normal(kd, (b, t, dk), jnp.float32).astype(dtype)}

    return jax.jit(make_op if kind == "op" else make_layer)


def op_inputs(seed: int, b: int, t: int, dims: dict, dtype: str, gates_file: str = "",
              segment_length: int = 0) -> dict:
    """Random op inputs on the device (never zeros): q (scaled by d_qk^-1/2), k, v, the cotangent dy in `dtype`;
    log|a| = log sigmoid(U[0, 6]) (|a| in [0.5, 0.9975]) and phases U[-pi, pi) in float32. With gates_file
    ("path.npz:layerN", tame_fraction.py --save_gates), log|a| is a trained model's instead, tiled to the shape."""
    import jax
    import jax.numpy as jnp

    inputs = _jit_maker("op", b, t, dims["heads"], dims["d_qk"], dims["d_v"], dtype)(jax.random.key(seed))
    if gates_file:
        from tame_fraction import load_gates, tile_gates

        inputs["log_magnitude"] = jnp.asarray(tile_gates(load_gates(gates_file), b, t, dims["heads"], dims["d_qk"]))
    if segment_length:  # a segment starts at each position with probability 1 / segment_length
        starts = jax.random.bernoulli(jax.random.key(seed + 1), 1.0 / segment_length, (b, t))
        inputs["segment_ids"] = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    return inputs


def op_fn(mode: str, pass_: str, chunk_size, *, upcast: bool = False, segments: bool = False):
    """(fn, argument names). fwd -> y; fwdbwd -> (y, the five input gradients): what a training step computes.

    y must be an output of fwdbwd: GateLoop's backward does not read y, so with only the gradients returned XLA drops
    the kernels that compute nothing but y (the multi-head Pallas op's forward query side, ~0.7 ms of ~4.7 on an
    H200) and the timing flatters GateLoop against attention, whose backward reads its output. Up to session 6 this
    function returned the gradients alone (experiments/perf_notes.md, session 6)."""
    import jax
    import jax.numpy as jnp

    from gateloop_jax import ops
    from gateloop_jax.ops import gla_rotation

    if mode in PEERS_SOFTMAX:
        impl = mode.split("_", 1)[1]

        def forward(q, k, v):
            if upcast:
                q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)

        names = ("q", "k", "v")
    elif mode == "jla_gla":
        # Real gates at key width d_qk: a different function (no phase), timed for its speed only.
        def forward(q, k, v, log_magnitude):
            return gla_rotation.jla_gla(q, k, v, log_magnitude, None)[0]

        names = ("q", "k", "v", "log_magnitude")
    else:
        kw = {"chunk_size": chunk_size} if (mode == "chunked" and chunk_size) else {}

        def forward(q, k, v, log_magnitude, phase, segment_ids=None):
            if upcast:
                q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
            return ops.gateloop(q, k, v, ops.PolarTransition(log_magnitude, phase), mode=mode,
                                segment_ids=segment_ids, **kw)

        names = ("q", "k", "v", "log_magnitude", "phase") + (("segment_ids",) if segments else ())
    if pass_ == "fwd":
        return forward, names

    def fwdbwd(*xs):
        *inputs, dy = xs
        fn = forward
        if segments:  # integer ids: not differentiated
            *inputs, ids = inputs
            fn = functools.partial(forward, segment_ids=ids)
        y, vjp = jax.vjp(fn, *inputs)
        return y, *vjp(dy.astype(y.dtype))

    return fwdbwd, names + ("dy",)


def layer_module(mode: str, dims: dict, dtype: str):
    """A GateLoopMixer (or, for the softmax peers, a CausalSelfAttention layer) at the setting's shape."""
    from flax import nnx

    import gateloop_jax.models  # noqa: F401 - first: importing layers before models is a circular import
    from gateloop_jax.layers import CausalSelfAttention, GateLoopMixer
    from gateloop_jax.models.config import ModelConfig

    if mode in PEERS_SOFTMAX:
        config = ModelConfig(name="transformer", d_model=dims["d_model"], num_heads=dims["heads"], d_qk=dims["d_qk"],
                             d_v=dims["d_v"], dtype=dtype, attention_impl=mode.split("_", 1)[1])
        return CausalSelfAttention(config, rngs=nnx.Rngs(0))
    config = ModelConfig(name="gateloop", d_model=dims["d_model"], num_heads=dims["heads"], d_qk=dims["d_qk"],
                         d_v=dims["d_v"], dtype=dtype)
    return GateLoopMixer(config, rngs=nnx.Rngs(0))


def layer_fn(graphdef, mode: str, pass_: str):
    """fwd(params, x) -> y; fwdbwd(params, x, dy) -> (y, grads of params, grad of x): y too, see op_fn."""
    import jax
    from flax import nnx

    call_mode = None if mode in PEERS_SOFTMAX else mode

    def forward(params, x):
        return nnx.merge(graphdef, params)(x, mode=call_mode)

    if pass_ == "fwd":
        return forward, ("params", "x")

    def fwdbwd(params, x, dy):
        y, vjp = jax.vjp(forward, params, x)
        return y, *vjp(dy.astype(y.dtype))

    return fwdbwd, ("params", "x", "dy")


def layer_inputs(seed: int, b: int, t: int, d_model: int, dtype: str) -> dict:
    """x and the cotangent dy, (b, t, d_model), N(0, 1) in `dtype`."""
    import jax

    return _jit_maker("layer", b, t, 0, d_model, 0, dtype)(jax.random.key(seed))


def nbytes(tree) -> int:
    import jax

    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def key_of(c: dict) -> str:
    return f"{c['scope']}/{c['setting']}/{c['dtype']}/{c['length']}/{c['mode']}/{c['pass']}"


def gateloop_modes(args) -> list[str]:
    from gateloop_jax import ops

    # Kernel modes (e.g. "pallas") are listed apart from the portable MODES by the dispatcher; both are benchmarked,
    # and a mode that does not apply to a shape is reported as skipped with the dispatcher's own error.
    return csv(args.modes) if args.modes else list(ops.MODES) + list(getattr(ops, "KERNEL_MODES", ())) + ["auto"]


def resolve_auto(dims: dict, t: int, b: int) -> str | None:
    """The concrete mode "auto" stands for at this shape, or None when the dispatcher does not say."""
    import jax

    from gateloop_jax import ops

    q_shape = (b, t, dims["heads"], dims["d_qk"])
    v_shape = (b, t, dims["heads"], dims["d_v"])
    try:
        try:
            return ops.resolve_mode("auto", q_shape, v_shape, platform=jax.default_backend())
        except TypeError:
            return ops.resolve_mode("auto", q_shape, v_shape)
    except Exception:  # noqa: BLE001 - an older or newer dispatcher: measure "auto" as its own config
        return None


# ---------------------------------------------------------------------------------------------------------------
# One group (scope, setting, dtype), in its own process.


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
        base = {"scope": scope, "setting": setting, "dtype": dtype, "length": t, "batch": b, "tokens": b * t, **dims,
                "gates": (args.gates_file or "random") if scope == "op" else "the layer's own",
                "segment_length": args.segment_length if scope == "op" else 0}
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
                        c["skipped"] = (f"would need more than {need / 2 ** 30:.0f} GiB (the (b, h, d_qk, t, t) "
                                        f"float32 decay tensor{'' if pass_ == 'fwd' else ' and its cotangent'}), "
                                        f"the device has {limit / 2 ** 30:.1f} GiB")
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
            shapes = {"q": (b, t, dims["heads"], dims["d_qk"]), "k": (b, t, dims["heads"], dims["d_qk"]),
                      "v": (b, t, dims["heads"], dims["d_v"]), "dy": (b, t, dims["heads"], dims["d_v"])}
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
            c["skipped"] = (f"would need {est / 2 ** 30:.1f} GiB (XLA's compile-time estimate), the device has "
                            f"{limit / 2 ** 30:.1f} GiB")
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
        order = sorted((c for c in configs if key_of(c) in executables),
                       key=lambda c: (c.get("xla_memory", {}).get("estimated_peak_bytes", 0), c["length"]))
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
                c["skipped"] = (f"too slow: estimated {predicted:.3g} s per run from {prev[1]:.3g} s at length "
                                f"{prev[0]}; {runs} runs would take {predicted * runs:.3g} s (budget "
                                f"{args.config_budget_s:.3g} s per config)")
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
            timing = bc.time_calls(lambda: exe(*call_args), warmup=args.warmup, reps=args.reps,
                                   budget_s=args.config_budget_s, pipeline=args.pipeline)
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
        print(f"[{group}] {k}: {c.get('median_s', float('nan')) * 1e3:.3f} ms{piped} {c.get('skipped', '')}",
              flush=True)

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


# ---------------------------------------------------------------------------------------------------------------
# The parent: copy bandwidth, peers' availability, one child per group, the JSON and the table.


def peer_status() -> dict[str, dict]:
    """Optional peers: importable or skipped with the reason (nothing is installed or fetched here)."""
    status = {}
    for name, module, note in (
        ("jax-linear-attention", "jla",
         "not importable (pip install jax-linear-attention: Python >= 3.12, jax 0.11.2, a Hopper GPU)"),
        ("fla", "fla", "flash-linear-attention (fla-core: Triton/PyTorch chunk_gla, chunk_hgrn) is not installed"),
    ):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        status[name] = {"status": "available" if found else "skipped", "module": module}
        if not found:
            status[name]["reason"] = note
    if status["fla"]["status"] == "available":
        status["fla"]["note"] = ("importable: chunk_gla (key width 2 d_qk) and chunk_hgrn timed in a PyTorch child "
                                 "after the groups (fla_peers; CUDA only, --isolate group)")
    if status["jax-linear-attention"]["status"] == "available":
        status["jax-linear-attention"]["note"] = ("importable: peer jla_gla (real gates, key width d_qk) and mode "
                                                  "gla_rotation (GateLoop through its kernel, key width 2 d_qk)")
    return status


def measure_copy(args) -> dict:
    bc.configure_jax_memory()
    out = {"env": bc.env_record()}
    try:
        out["copy_bandwidth"] = bc.copy_bandwidth(args.copy_bytes)
    except Exception as err:  # noqa: BLE001
        out["copy_bandwidth"] = {"skipped": f"{type(err).__name__}: {err}"}
    return out


def fla_peers(args) -> list[dict]:
    """fla's chunk_gla (multi-head, real gates, key width 2 d_qk as the rotation identity needs) and chunk_hgrn
    (max-headed, real gates), forward+backward in bf16, timed with triton.testing.do_bench (median). CUDA only."""
    import torch
    import triton

    records = []
    for t in map(int, csv(args.lengths)):
        b = args.tokens // t
        for setting in csv(args.settings):
            dims = setting_dims(args, setting)
            rec = {"scope": "op", "setting": setting, "dtype": "bfloat16", "length": t, "batch": b, "tokens": b * t,
                   "pass": "fwdbwd", "kind": "peer", **dims}
            try:
                dev = "cuda"
                if setting == "multihead":
                    from fla.ops.gla import chunk_gla

                    rec["mode"] = "fla_chunk_gla"
                    h, dk, dv = dims["heads"], 2 * dims["d_qk"], dims["d_v"]
                    q = torch.randn(b, t, h, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    k = torch.randn(b, t, h, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    v = torch.randn(b, t, h, dv, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    g = torch.nn.functional.logsigmoid(torch.rand(b, t, h, dk, device=dev) * 6).requires_grad_()
                    dy = torch.randn(b, t, h, dv, device=dev, dtype=torch.bfloat16)

                    def step():
                        o, _ = chunk_gla(q, k, v, g)
                        o.backward(dy)
                else:
                    from fla.ops.hgrn import chunk_hgrn

                    rec["mode"] = "fla_chunk_hgrn"
                    d = dims["heads"]
                    x = torch.randn(b, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                    g = torch.nn.functional.logsigmoid(torch.rand(b, t, d, device=dev) * 6).requires_grad_()
                    dy = torch.randn(b, t, d, device=dev, dtype=torch.bfloat16)

                    def step():
                        o, _ = chunk_hgrn(x, g)
                        o.backward(dy)

                ms = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                rec["median_s"] = ms / 1e3
                rec["tokens_per_s"] = b * t / rec["median_s"]
                rec["note"] = "real gates only (no phase); timed with triton.testing.do_bench, median"
            except Exception as err:  # noqa: BLE001
                rec.setdefault("mode", "fla")
                rec["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            records.append(rec)
    return records


def bandwidth_bound(c: dict, copy_bps: float | None) -> dict:
    """Bytes an op must move at least (inputs read once, outputs written once) and that time at the copy bandwidth.
    fwd: q, k, v, log|a|, arg a in, y out. fwdbwd: the same inputs and dy in, y and their five gradients out."""
    if c["scope"] != "op" or c["kind"] != "gateloop":
        return {}
    item = {"bfloat16": 2, "float32": 4}.get(c["dtype"], 4)
    n_qk = c["tokens"] * c["heads"] * c["d_qk"]
    n_v = c["tokens"] * c["heads"] * c["d_v"]
    inputs = (2 * n_qk + n_v) * item + 2 * n_qk * 4
    y = n_v * item
    # fwdbwd: the inputs and dy read, y and the gradients (the inputs' sizes) written. (Up to session 6: 2 inputs + y,
    # one y short.)
    moved = inputs + y if c["pass"] == "fwd" else 2 * inputs + 2 * y
    out = {"min_bytes": moved}
    if copy_bps:
        out["bandwidth_bound_s"] = moved / copy_bps
    return out


def main(argv=None):
    args = parse_args(argv)
    if args._group:
        deadline = args._deadline or 0.0

        def emit(obj):
            with open(args._jsonl, "a") as f:
                f.write(json.dumps(obj, default=bc._json_default) + "\n")

        skip = set(csv(args._skip))
        # Deadlines travel as seconds-from-now: the clocks of parent and child (perf_counter) do not compare.
        run_group(args, args._group, emit, skip, time.perf_counter() + deadline if deadline else 0.0)
        return
    if args._jsonl == "copy":
        print(json.dumps(measure_copy(args), default=bc._json_default))
        return
    if args._jsonl == "fla":
        print(json.dumps(fla_peers(args), default=bc._json_default))
        return

    start = time.perf_counter()
    out_path = os.path.join(args.out, args.json)
    os.makedirs(args.out, exist_ok=True)
    command = os.environ.get("BENCH_COMMAND") or bc.command_line()
    result = {"benchmark": "modes", "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "peers": peer_status(), "records": [], "notes": [
                  "time: median of reps timed runs after warm-up, each synchronised with block_until_ready",
                  "peak_bytes: device.memory_stats()['peak_bytes_in_use'] after the config, in a fresh process per "
                  "(scope, setting, dtype); peak_exact false means an earlier config of that process peaked higher",
                  "error: max|out-ref|/max|ref| (max over outputs: y for fwd, y and the input gradients for fwdbwd) against "
                  "the reference on the same inputs",
                  "compile_s: measured with up to compile_workers compiles in flight",
                  "inputs exceed the 60 MB L2 of an H200 at the default sizes, so they are not rotated"]}

    # Copy bandwidth (and the environment) from a child, so the parent never holds device memory.
    if args.isolate == "group":
        code, text = bc.run_child([os.path.abspath(__file__), "--_jsonl", "copy", "--copy_bytes",
                                   str(args.copy_bytes)], timeout_s=300)
        try:
            info = json.loads(text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            info = {"env": {}, "copy_bandwidth": {"skipped": f"child failed ({code}): {text[-500:]}"}}
    else:
        info = measure_copy(args)
    result["env"] = {**info.get("env", {}), "command": command}
    result["copy_bandwidth"] = info["copy_bandwidth"]
    copy_bps = info["copy_bandwidth"].get("bytes_per_s")
    print(f"copy bandwidth: {copy_bps / 1e12 if copy_bps else float('nan'):.3f} TB/s", flush=True)

    groups = [f"{scope}:{setting}:{dtype}" for scope in csv(args.scopes) for dtype in csv(args.dtypes)
              for setting in csv(args.settings)]
    # The op is what the performance targets are stated for: its groups get twice the layer's share of the budget.
    weights = [2.0 if g.startswith("op:") else 1.0 for g in groups]
    records: dict[str, dict] = {}
    for i, group in enumerate(groups):
        remaining = args.budget_s - (time.perf_counter() - start) if args.budget_s else 0.0
        group_budget = remaining * weights[i] / sum(weights[i:]) if args.budget_s else 0.0
        if args.budget_s and group_budget <= 5:
            records[group] = {"scope": group.split(":")[0], "group_skipped":
                              f"overall time budget (--budget_s {args.budget_s}) spent before group {group}"}
            print(f"[{group}] skipped: time budget", flush=True)
            continue
        group_records = run_group_isolated(args, group, group_budget) if args.isolate == "group" else \
            run_group_inprocess(args, group, group_budget)
        records.update(group_records)
        finish(result, records, copy_bps, out_path, start)  # after every group: a partial run still leaves JSON

    if args.isolate == "group" and result["peers"]["fla"]["status"] == "available":
        code, text = bc.run_child([os.path.abspath(__file__), "--_jsonl", "fla", "--lengths", args.lengths,
                                   "--tokens", str(args.tokens), "--settings", args.settings,
                                   "--heads", str(args.heads), "--d_head", str(args.d_head),
                                   "--d_model", str(args.d_model)], timeout_s=300)
        try:
            for rec in json.loads(text.strip().splitlines()[-1]):
                records[key_of(rec)] = rec
        except (ValueError, IndexError):
            result["peers"]["fla"] = {"status": "skipped", "reason": f"fla child failed ({code}): {text[-300:]}"}

    finish(result, records, copy_bps, out_path, start)
    import plot_bench

    table = plot_bench.modes_table(result, lengths=None, passes=("fwdbwd",), scopes=("op",), compact=True)
    with open(os.path.join(args.out, "modes.md"), "w") as f:
        f.write(plot_bench.modes_markdown(result))
    print(table)
    print(f"wrote {out_path} ({len(result['records'])} records) in {result['wall_s']:.0f} s")


def finish(result, records, copy_bps, out_path, start) -> None:
    for rec in records.values():
        if "length" in rec:
            rec.update(bandwidth_bound(rec, copy_bps))
    # Aliases ("auto" -> a concrete mode) take that mode's measurement.
    for rec in records.values():
        if "alias_of" in rec:
            target = records.get(key_of({**rec, "mode": rec["alias_of"]}))
            if target:
                for field, value in target.items():
                    rec.setdefault(field, value)
    result["records"] = list(records.values())
    result["wall_s"] = time.perf_counter() - start
    bc.write_json(out_path, result)


def run_group_isolated(args, group: str, budget: float) -> dict[str, dict]:
    """Run a group in a child process; if the child dies, record the config it died on and resume after it."""
    import tempfile

    records: dict[str, dict] = {}
    crashed: set[str] = set()
    jsonl = tempfile.mktemp(suffix=".jsonl", prefix="bench_modes_")
    t0 = time.perf_counter()
    for attempt in range(3):
        left = budget - (time.perf_counter() - t0) if budget else 0.0
        if budget and left <= 5:
            break
        argv = [os.path.abspath(__file__), "--_group", group, "--_jsonl", jsonl]
        argv += _public_argv(args)
        argv += ["--_deadline", str(left), "--_skip", ",".join(sorted(set(records) | crashed))]
        code, text = bc.run_child(argv, timeout_s=(left + 120) if budget else 3600, log_prefix="  ")
        started = set()
        if os.path.exists(jsonl):
            with open(jsonl) as f:
                for line in f:
                    obj = json.loads(line)
                    if "record" in obj:
                        records[obj["key"]] = obj["record"]
                    elif obj.get("started"):
                        started.add(obj["key"])
            os.remove(jsonl)
        if code == 0:
            break
        lost = started - set(records)
        for k in lost:
            scope, setting, dtype, length, mode, pass_ = k.split("/")
            records[k] = {"scope": scope, "setting": setting, "dtype": dtype, "length": int(length), "mode": mode,
                          "pass": pass_, "kind": "peer" if mode in PEER_MODES else "gateloop",
                          "skipped": f"process died running it (exit {code}): {text.strip()[-300:]}"}
        crashed |= lost
        if not lost:
            records[f"{group}/child"] = {"group_skipped": f"group child failed (exit {code}): {text.strip()[-500:]}"}
            break
    return records


def _public_argv(args) -> list[str]:
    """The parsed public flags, re-spelled for a child process."""
    out = []
    for name, value in vars(args).items():
        if name.startswith("_") or value is None:
            continue
        out += [f"--{name}", str(value)]
    return out


def run_group_inprocess(args, group: str, budget: float) -> dict[str, dict]:
    records: dict[str, dict] = {}

    def emit(obj):
        if "record" in obj:
            records[obj["key"]] = dict(obj["record"])

    run_group(args, group, emit, set(), time.perf_counter() + budget if budget else 0.0)
    return records


if __name__ == "__main__":
    main()
