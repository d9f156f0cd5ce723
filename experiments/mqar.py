r"""MQAR (multi-query associative recall): eval accuracy against the number of key-value pairs K for max-headed
GateLoop, multi-head GateLoop and a softmax Transformer, at a tiny CPU size (a smoke-level comparison: 1 seed, short
runs; not the Zoology-scale experiment).

    python experiments/mqar.py run         # trains every (model, K) with the trainer CLI (skips finished runs)
    python experiments/mqar.py aggregate   # -> experiments/results/mqar.{json,md,png}

Each run: `python -m gateloop_jax.main --config configs/mqar.py:variant=V,runlocal --config.data.num_kv_pairs=K ...`
in workdirs/experiments/mqar/<model>_k<K>_s<seed>. The size is configs/mqar.py's runlocal (d_model 64, 2 layers,
length 64, vocabulary 256, batch 32) with the head layout per model (MODELS).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import results_common as cr  # noqa: E402

WORKROOT = cr.workroot("mqar")
RESULTS = cr.RESULTS
CONFIG = "configs/mqar.py"
NUM_KV_PAIRS = (4, 8, 16)
TOTAL_STEPS = 1000
EVAL_EVERY = 250

# model label -> (config arg, --config overrides). The GateLoop recurrence runs in mode=recurrent (the quickest on CPU
# at length 64; every mode computes the same function).
MODELS = {
    # The paper's LM layout: one complex scalar state per channel (64 heads, d_qk = d_v = 1): a 64-number state.
    "gateloop_max_headed": ("variant=gateloop,mode=recurrent,runlocal",
                            {"model.num_heads": 64, "model.d_qk": 1, "model.d_v": 1}),
    # 4 heads of 16: a 4 x 16 x 16 matrix-valued state (runlocal's layout).
    "gateloop_multi_head": ("variant=gateloop,mode=recurrent,runlocal", {}),
    # Softmax attention, 4 heads of 16: looks the keys up directly.
    "transformer": ("variant=transformer,runlocal", {}),
    # A GateLoop block (4 x 16, mode=recurrent) then an attention block (4 x 16).
    "hybrid": ("variant=hybrid,mode=recurrent,runlocal", {"model.block_pattern": "ga"}),
}
LABELS = {"gateloop_max_headed": "GateLoop max-headed (64 x 1)", "gateloop_multi_head": "GateLoop multi-head (4 x 16)",
          "transformer": "Transformer (4 x 16)", "hybrid": "hybrid GateLoop + attention (4 x 16)"}


def workdir(model: str, k: int, seed: int) -> Path:
    return WORKROOT / f"{model}_k{k}_s{seed}"


def command(model: str, k: int, seed: int, steps: int = TOTAL_STEPS) -> list[str]:
    arg, overrides = MODELS[model]
    overrides = {"seed": seed, "data.num_kv_pairs": k, "total_steps": steps, "eval_every_steps": EVAL_EVERY,
                 "progress_bar": False, **overrides}
    return cr.trainer_command(f"{CONFIG}:{arg}", workdir(model, k, seed), overrides)


def run(args) -> None:
    # K-major: every model at the smallest K first, so a cut-short sweep still compares the models.
    jobs = [(f"{m}_k{k}_s{s}", command(m, k, s, args.steps), workdir(m, k, s), args.steps)
            for s in args.seeds for k in args.kv for m in args.models]
    cr.run_jobs(jobs, parallel=args.parallel)


def aggregate(args) -> dict:
    groups = {f"{m}_k{k}": [workdir(m, k, s) for s in args.seeds] for m in args.models for k in args.kv}
    summary = cr.summarize_runs(groups)
    summary["task"] = "mqar"
    summary["setting"] = {"config": f"{CONFIG}:<arg>,runlocal", "total_steps": args.steps, "seeds": list(args.seeds),
                          "num_kv_pairs": list(args.kv), "hardware": cr.hardware(), "labels": LABELS,
                          "commands": {f"{m}_k{k}": " ".join(command(m, k, args.seeds[0], args.steps))
                                       for m in args.models for k in args.kv}}
    cr.write_summary("mqar", summary, accuracy_vs_k_table(summary, args.models, args.kv))
    plot_accuracy_vs_k(summary, args.models, args.kv, RESULTS / "mqar.png")
    return summary


def accuracy_vs_k_table(summary: dict, models, kv) -> str:
    head = "| model | params | " + " | ".join(f"K={k}" for k in kv) + " |"
    lines = ["## MQAR: final eval accuracy by number of key-value pairs K", "", head,
             "|---|---:|" + "---:|" * len(kv)]
    for m in models:
        cells = []
        params = None
        for k in kv:
            g = summary["models"].get(f"{m}_k{k}", {})
            params = params or g.get("params")
            acc = g.get("final_accuracy_mean")
            done = all(r["complete"] for r in g.get("runs", []))
            cells.append("not run" if acc is None else f"{acc:.3f}" + ("" if done else " (unfinished)"))
        lines.append(f"| {LABELS.get(m, m)} | {'n/a' if params is None else format(params, ',')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_k(summary: dict, models, kv, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, m in enumerate(models):
        ks, accs = [], []
        for k in kv:
            g = summary["models"].get(f"{m}_k{k}")
            if g and g["final_accuracy_mean"] is not None:
                ks.append(k)
                accs.append(g["final_accuracy_mean"])
                for r in g["runs"]:
                    ax2.plot(r["steps"], r["accuracy"], color=f"C{i}", alpha=0.4 + 0.6 * (k == max(kv)),
                             ls=["-", "--", ":", "-."][kv.index(k) % 4], label=f"{LABELS.get(m, m)}, K={k}")
        ax.plot(ks, accs, marker="o", color=f"C{i}", label=LABELS.get(m, m))
    # Reference levels: a uniform guess over the 128 value tokens, and a guess among the K values bound in the
    # sequence (what a model reaches that has learned "answer with a value seen earlier" but not which one).
    ax.axhline(1 / 128, color="gray", ls=":", lw=1, label="chance (1/128)")
    ax.plot(list(kv), [1 / k for k in kv], color="gray", ls="--", lw=1, label="1/K (a bound value at random)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(kv))
    ax.set_xticklabels([str(k) for k in kv])
    ax.set_xlabel("key-value pairs K")
    ax.set_ylabel("final eval accuracy (query positions)")
    ax.set_ylim(0, 1.02)
    ax.set_title("MQAR, tiny CPU size (1 seed, smoke level)", fontsize=10)
    ax.legend(fontsize=8)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("eval accuracy")
    ax2.set_ylim(0, 1.02)
    ax2.set_title("learning curves", fontsize=10)
    ax2.legend(fontsize=6, ncol=2)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = cr.driver_parser(__doc__, ("run", "aggregate", "all"), seeds=[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--kv", nargs="+", type=int, default=list(NUM_KV_PAIRS))
    p.add_argument("--steps", type=int, default=TOTAL_STEPS)
    args = p.parse_args(argv)
    if args.action in ("run", "all"):
        run(args)
    if args.action in ("aggregate", "all"):
        aggregate(args)


if __name__ == "__main__":
    main()
