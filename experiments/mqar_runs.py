r"""Summarise full-size MQAR trainer runs launched side by side (experiments/mqar_levers.sh and the like): each run's
eval-accuracy curve, its accuracy at the last evaluation and the first step it reached 0.5 / 0.9 / 0.95, as JSON, a
Markdown table and a curves PNG in experiments/results/.

    python experiments/mqar_runs.py --runs DIR/* --stem mqar_full_h100 --machine "one H100 ..." \
        --command "SET=final OUT=... BUDGET=500 bash experiments/mqar_levers.sh" --setting "..."

A run is a trainer workdir (its metrics.jsonl and config.json); its name is the directory's name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import results_common as cr  # noqa: E402

THRESHOLDS = (0.5, 0.9, 0.95)


def first_step_at(steps, accuracy, threshold: float) -> int | None:
    """The first evaluated step whose accuracy is at least `threshold` (None if none is)."""
    return next((int(s) for s, a in zip(steps, accuracy) if a >= threshold), None)


def summarize(runs: dict[str, Path], *, machine: str, command: str, setting: str) -> dict:
    summary = cr.summarize_runs({name: [wd] for name, wd in runs.items()}, count_params=False)
    for m in summary["models"].values():
        for r in m["runs"]:
            r["first_step_at"] = {str(t): first_step_at(r["steps"], r["accuracy"], t) for t in THRESHOLDS}
    return {"machine": machine, "command": command, "setting": setting, **summary}


def markdown(summary: dict, title: str) -> str:
    head = " | ".join(f"first step >= {t}" for t in THRESHOLDS)
    lines = [
        f"## {title}", "", f"{summary['setting']}", "", f"Machine: {summary['machine']}.", "",
        f"Command: `{summary['command']}`", "",
        f"| run | last evaluated step | eval accuracy there | {head} |", "|---|---:|---:|" + "---:|" * len(THRESHOLDS),
    ]
    for name, m in summary["models"].items():
        if not m["runs"]:
            lines.append(f"| {name} | no evaluation | | " + " | " * (len(THRESHOLDS) - 1) + " |")
            continue
        r = m["runs"][0]
        firsts = " | ".join(str(r["first_step_at"][str(t)] or "-") for t in THRESHOLDS)
        lines.append(f"| {name} | {r['final_step']} | {r['final_accuracy']:.4f} | {firsts} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="trainer workdirs, one per run")
    p.add_argument("--stem", required=True, help="results/<stem>.{json,md,png}")
    p.add_argument("--machine", required=True, help="the accelerator and jax version the runs used")
    p.add_argument("--command", required=True, help="the command that launched the runs")
    p.add_argument("--setting", default="", help="one sentence: sizes, budget, how many runs shared the device")
    p.add_argument("--title", default="MQAR, full size, trainer runs side by side")
    p.add_argument("--out", type=Path, default=cr.RESULTS)
    args = p.parse_args(argv)
    missing = [str(d) for d in args.runs if not (d / "metrics.jsonl").exists()]
    if missing:
        p.error(f"--runs: no metrics.jsonl in {', '.join(missing)}; pass trainer workdirs")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = {d.name: d for d in sorted(args.runs)}
    summary = summarize(runs, machine=args.machine, command=args.command, setting=args.setting)
    cr.write_summary(args.stem, summary, markdown(summary, args.title), out=args.out)
    cr.plot_curves(summary, args.out / f"{args.stem}.png", title=args.title, chance=None)
    print(f"wrote {args.out / args.stem}.{{json,md,png}}")


if __name__ == "__main__":
    main()
