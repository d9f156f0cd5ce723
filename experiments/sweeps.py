r"""The GateLoop paper's open questions as runnable sweeps: each sweep is a base config plus one axis of
`--config.model.<field>` overrides (the trainer is not forked: every point is `python -m gateloop_jax.main`).

    python experiments/sweeps.py list                          # every sweep, point and its full command
    python experiments/sweeps.py run --sweep init --seeds 0    # train the points (skips finished ones)
    python experiments/sweeps.py aggregate --sweep init        # -> experiments/results/sweep_init.{json,md,png}

Sweeps (SWEEPS below): init strategies (slow_forget, lru_ring, default), magnitude activations (sigmoid,
sigmoid_tempered, lru_exp), phase activations (identity, tanh_pi), data-controlled vs fixed/real/no transition; each
on memory horizon (runlocal size) and, with `--base mqar`, on MQAR (runlocal size). The point equal to the base
config's default on memory horizon at the memory-horizon budget is the GateLoop run of experiments/memory_horizon.py
(same command), which is reused instead of trained twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import results_common as cr  # noqa: E402

WORKROOT = cr.workroot("sweeps")
RESULTS = cr.RESULTS

# Base task configs (config path:arg) and their step budget / eval cadence for the sweeps.
BASES = {
    "memory_horizon": {
        "config": "configs/memory_horizon.py:variant=gateloop,runlocal",
        "total_steps": 3000,
        "eval_every_steps": 250,
        "chance": 0.1,
    },
    "mqar": {
        "config": "configs/mqar.py:variant=gateloop,runlocal",
        "total_steps": 1000,
        "eval_every_steps": 250,
        "chance": 1 / 128,
    },
}

# sweep name -> (ModelConfig field, values). Each value becomes --config.model.<field>=<value>.
SWEEPS = {
    # Transition initialisation (model_config.py `init`): slow forgetting (ours), the LRU ring, Lecun normal.
    "init": ("init", ("slow_forget", "lru_ring", "default")),
    # |a| = f(gamma): the paper's sigmoid, GLA-style tempered sigmoid, LRU-style exp(-exp(gamma)).
    "magnitude_activation": ("magnitude_activation", ("sigmoid", "sigmoid_tempered", "lru_exp")),
    # arg a = g(theta): the paper's identity or pi * tanh(theta).
    "phase_activation": ("phase_activation", ("identity", "tanh_pi")),
    # The paper's central ablation on one registered name ("gateloop" honours `transition`).
    "transition": ("transition", ("data_controlled", "fixed", "real", "none")),
}


def points(sweep: str, base: str = "memory_horizon") -> list[dict]:
    """Every point of a sweep: {"name", "config", "overrides"} with overrides as {dotted field: value}."""
    field, values = SWEEPS[sweep]
    b = BASES[base]
    return [
        {
            "name": str(v),
            "config": b["config"],
            "overrides": {
                f"model.{field}": v,
                "total_steps": b["total_steps"],
                "eval_every_steps": b["eval_every_steps"],
                "progress_bar": False,
            },
        }
        for v in values
    ]


def build_config(sweep: str, base: str, point: dict, seed: int = 0):
    """The locked config a point trains, parsed from its command line exactly as the trainer CLI does (no training)."""
    return cr.config_of_command(command(sweep, base, point, seed)[0])


def workdir(sweep: str, base: str, name: str, seed: int) -> Path:
    return WORKROOT / f"{base}_{sweep}" / f"{name}_s{seed}"


def _reused_workdir(sweep: str, base: str, point: dict, seed: int) -> Path | None:
    """The memory-horizon GateLoop run when this point is exactly its config (the default value of the axis)."""
    if base != "memory_horizon":
        return None
    import memory_horizon as mh

    field, _ = SWEEPS[sweep]
    default = getattr(__import__("gateloop_jax.models.config", fromlist=["ModelConfig"]).ModelConfig, field)
    if (
        point["overrides"][f"model.{field}"] == default
        and point["overrides"]["total_steps"] == mh.TOTAL_STEPS
        and point["overrides"]["eval_every_steps"] == mh.EVAL_EVERY
    ):
        return mh.workdir("gateloop", seed)
    return None


def command(sweep: str, base: str, point: dict, seed: int) -> tuple[list[str], Path]:
    wd = _reused_workdir(sweep, base, point, seed) or workdir(sweep, base, point["name"], seed)
    return cr.trainer_command(point["config"], wd, {"seed": seed, **point["overrides"]}), wd


def run(args) -> None:
    jobs = []
    for seed in args.seeds:
        for p in points(args.sweep, args.base):
            cmd, wd = command(args.sweep, args.base, p, seed)
            jobs.append((f"{args.sweep}/{p['name']}_s{seed}", cmd, wd, p["overrides"]["total_steps"]))
    cr.run_jobs(jobs, parallel=args.parallel)


def aggregate(args) -> dict:
    groups = {
        p["name"]: [command(args.sweep, args.base, p, s)[1] for s in args.seeds] for p in points(args.sweep, args.base)
    }
    summary = cr.summarize_runs(groups)
    field, _ = SWEEPS[args.sweep]
    stem = f"sweep_{args.sweep}" + ("" if args.base == "memory_horizon" else f"_{args.base}")
    summary["task"] = args.base
    summary["setting"] = {
        "sweep": args.sweep,
        "field": f"model.{field}",
        "base": BASES[args.base],
        "seeds": list(args.seeds),
        "hardware": cr.hardware(),
        "commands": {
            p["name"]: " ".join(command(args.sweep, args.base, p, args.seeds[0])[0])
            for p in points(args.sweep, args.base)
        },
    }
    labels = {p["name"]: f"{field}={p['name']}" for p in points(args.sweep, args.base)}
    cr.write_summary(stem, summary, cr.markdown_table(summary, labels, title=f"Sweep {field} on {args.base}"))
    cr.plot_curves(
        summary,
        RESULTS / f"{stem}.png",
        labels,
        chance=BASES[args.base]["chance"],
        title=f"{args.base}: sweep of model.{field} (seeds {','.join(map(str, args.seeds))})",
    )
    return summary


def main(argv=None) -> None:
    p = cr.driver_parser(__doc__, ("list", "run", "aggregate"), seeds=[0])
    p.add_argument("--sweep", choices=list(SWEEPS), default="init")
    p.add_argument("--base", choices=list(BASES), default="memory_horizon")
    args = p.parse_args(argv)
    if args.action == "list":
        for sweep in SWEEPS:
            for base in BASES:
                for pt in points(sweep, base):
                    print(f"{sweep:22s} {base:15s} {pt['name']:18s}", " ".join(command(sweep, base, pt, 0)[0][1:]))
    elif args.action == "run":
        run(args)
    else:
        aggregate(args)


if __name__ == "__main__":
    main()
