r"""MQAR probes: short trainer-free Adam loops that isolate why a model does or does not learn associative recall.

Each probe trains one registered model on `gateloop_jax.data.synthetic.mqar` batches with plain Adam (linear warmup,
then constant), evaluates on a fixed held-out set, and records, per layer of a GateLoop model, how much the
data-controlled phase varies from token to token: `phase_jitter` = the standard deviation over tokens of arg a_n,
averaged over channels. Between a key at position j and its query at n the state is rotated by sum_{j<m<=n} arg a_m,
so a per-token jitter s scrambles that rotation by about s * sqrt(n - j) radians: above ~1 rad the recalled value
arrives with a random sign and the read-out carries no signal.

    python experiments/mqar_probe.py --probes default,theta_frozen --out /tmp/probes    # named probes (PROBES)
    python experiments/mqar_probe.py --probes default@emb0.02,real@emb0.02@uniform --parallel 2 --out DIR

Each probe appends JSON lines to DIR/<probe>.jsonl; DIR/summary.json collects the final figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The full Zoology-style setting of configs/mqar.py and the CPU-sized one.
# min_num_kv_pairs > 0 trains on the K mixture of synthetic.mqar_mixture (evaluation stays at num_kv_pairs).
FULL = dict(seq_len=256, num_kv_pairs=16, vocab_size=8192, d_model=128, num_heads=4, batch=64, query_gaps="power_law",
            min_num_kv_pairs=0)
SMALL = dict(seq_len=64, num_kv_pairs=4, vocab_size=256, d_model=64, num_heads=4, batch=64, query_gaps="power_law",
             min_num_kv_pairs=0)

# name -> settings. `model` holds ModelConfig overrides; theta_lr / gamma_lr scale the learning rate of the phase /
# magnitude projections' kernels; zero_theta starts the phase projection's kernel at zero.
PROBES = {
    "default": dict(name="gateloop"),
    "real": dict(name="gateloop_real"),
    "fixed": dict(name="gateloop_fixed"),
    "linear_attention": dict(name="linear_attention"),
    "transformer": dict(name="transformer"),
    "theta_frozen": dict(name="gateloop", theta_lr=0.0),
    "theta_zero_frozen": dict(name="gateloop", theta_lr=0.0, zero_theta=True),
    "theta_lr_0.1": dict(name="gateloop", theta_lr=0.1),
    "transition_lr_0.1": dict(name="gateloop", theta_lr=0.1, gamma_lr=0.1),
    "transformer_lr3e-3": dict(name="transformer", lr=3e-3),
    "transformer_1head": dict(name="transformer", model={"num_heads": 1}),
}
# The same probes with small token embeddings at initialisation (std 0.02 instead of 1).
PROBES.update({f"{name}@emb0.02": dict(settings, model={**settings.get("model", {}), "embedding_init_std": 0.02})
               for name, settings in list(PROBES.items())})
# And with a short convolution (4 taps) on q, k and v of the GateLoop mixers.
PROBES.update({f"{name}@conv4": dict(settings, model={**settings.get("model", {}), "short_conv_size": 4})
               for name, settings in list(PROBES.items()) if not settings["name"].startswith("transformer")})
# And with every distance equally likely between binding and query.
PROBES.update({f"{name}@uniform": dict(settings, query_gaps="uniform") for name, settings in list(PROBES.items())})


def _cast(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(value, value)


def run_probe(name: str, settings: dict, size: dict, steps: int, eval_every: int, out: Path, seed: int,
              budget_s: float | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from gateloop_jax.data import synthetic
    from gateloop_jax.models import build_model
    from gateloop_jax.models.config import ModelConfig

    model_cfg = dict(name=settings["name"], vocab_size=size["vocab_size"], d_model=size["d_model"], num_layers=2,
                     num_heads=size["num_heads"])
    model_cfg.update(settings.get("model", {}))
    model_cfg.update({k[len("model."):]: v for k, v in settings.items() if k.startswith("model.")})
    model = build_model(ModelConfig.from_mapping(model_cfg), rngs=nnx.Rngs(seed))
    # zero_theta starts the phase projection's kernel at zero, theta_scale multiplies its initial values.
    theta_scale = 0.0 if settings.get("zero_theta") else settings.get("theta_scale", 1.0)
    if theta_scale != 1.0:
        for block in model.blocks:
            proj = getattr(block.mixer, "theta_proj", None)
            if proj is not None:
                proj.kernel[...] = proj.kernel[...] * theta_scale
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def group(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        if "kernel" in names and "theta_proj" in names:
            return "theta"
        if "kernel" in names and "gamma_proj" in names:
            return "gamma"
        return "default"

    lr = settings.get("lr", 1e-3)
    warmup = settings.get("warmup", 200)

    def adam(scale):
        return optax.adam(optax.join_schedules([optax.linear_schedule(0.0, lr * scale, warmup),
                                                optax.constant_schedule(lr * scale)], [warmup]))

    tx = optax.multi_transform({"default": adam(1.0), "theta": adam(settings.get("theta_lr", 1.0)),
                                "gamma": adam(settings.get("gamma_lr", 1.0))},
                               jax.tree_util.tree_map_with_path(group, params))
    opt_state = tx.init(params)

    def stats(params, batch):
        logits = nnx.merge(graphdef, params, rest)(batch["inputs"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        correct = logits.argmax(-1) == batch["targets"]
        count = batch["mask"].sum()
        return (nll * batch["mask"]).sum() / count, (correct * batch["mask"]).sum() / count

    @jax.jit
    def train_step(params, opt_state, batch):
        (loss, acc), grads = jax.value_and_grad(stats, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    @jax.jit
    def phase_jitter(params, inputs):
        m = nnx.merge(graphdef, params, rest)
        if not hasattr(m.blocks[0].mixer, "transition"):
            return jnp.zeros((0,))
        return jnp.stack([t.phase.std(axis=(0, 1)).mean() for t in m.transitions(inputs)])

    data = dict(seq_len=size["seq_len"], num_kv_pairs=size["num_kv_pairs"], vocab_size=size["vocab_size"],
                query_gaps=settings.get("query_gaps", size["query_gaps"]))
    eval_batches = [synthetic.mqar(np.random.default_rng([seed, 1, i]), 64, **data) for i in range(16)]
    rng = np.random.default_rng([seed, 0])
    log = (out / f"{name}.jsonl").open("w")
    start, record = time.time(), {}
    for step in range(1, steps + 1):
        batch = synthetic.mqar_mixture(rng, size["batch"], **data, min_num_kv_pairs=size["min_num_kv_pairs"])
        params, opt_state, loss, acc = train_step(params, opt_state, batch)
        out_of_time = budget_s is not None and time.time() - start > budget_s
        if step % eval_every == 0 or step == steps or out_of_time:
            evals = [stats(params, b) for b in eval_batches]
            record = {"probe": name, "step": step, "train_loss": float(loss),
                      "eval_loss": float(np.mean([e[0] for e in evals])),
                      "eval_accuracy": float(np.mean([e[1] for e in evals])),
                      "phase_jitter": [round(float(x), 4) for x in phase_jitter(params, eval_batches[0]["inputs"])],
                      "seconds": round(time.time() - start, 1)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if out_of_time:
            break
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", default="default,real", help="comma-separated names of PROBES")
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget_s", type=float, help="stop each probe after this many seconds")
    parser.add_argument("--parallel", type=int, default=1, help="probes run as this many processes at once")
    parser.add_argument("--set", action="append", default=[],
                        help="override a size field or a probe setting for every probe, e.g. --set lr=3e-3")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single probe in this process (used by --parallel)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    size = dict(FULL if args.size == "full" else SMALL)
    overrides = dict(item.split("=", 1) for item in args.set)
    for key in list(overrides):
        if key in size:
            size[key] = _cast(overrides.pop(key))
    names = args.probes.split(",")
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        parser.error(f"--probes: unknown {unknown}; known: {sorted(PROBES)}")

    def settings(name):
        return {**PROBES[name], **{k: _cast(v) for k, v in overrides.items()}}

    if args.one:
        run_probe(args.one, settings(args.one), size, args.steps, args.eval_every, args.out, args.seed,
                  args.budget_s)
        return
    if args.parallel <= 1:
        summary = {n: run_probe(n, settings(n), size, args.steps, args.eval_every, args.out, args.seed, args.budget_s)
                   for n in names}
    else:
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=str(round(0.9 / args.parallel, 3)))
        base = [sys.executable, __file__, "--size", args.size, "--steps", str(args.steps), "--eval_every",
                str(args.eval_every), "--seed", str(args.seed), "--out", str(args.out)]
        base += ["--budget_s", str(args.budget_s)] if args.budget_s else []
        base += [f"--set={s}" for s in args.set]
        pending, running = list(names), []
        while pending or running:
            while pending and len(running) < args.parallel:
                name = pending.pop(0)
                logf = (args.out / f"{name}.log").open("w")
                running.append(subprocess.Popen(base + ["--one", name], stdout=logf, stderr=subprocess.STDOUT,
                                                env=env))
            time.sleep(2)
            running = [p for p in running if p.poll() is None]
        summary = {}
        for name in names:
            lines = (args.out / f"{name}.jsonl").read_text().splitlines() if (args.out / f"{name}.jsonl").exists() \
                else []
            summary[name] = json.loads(lines[-1]) if lines else None
    (args.out / "summary.json").write_text(json.dumps({"size": size, "steps": args.steps, "probes": summary},
                                                      indent=1))


if __name__ == "__main__":
    main()
