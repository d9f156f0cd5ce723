"""The learned transitions a_n = |a_n| exp(i arg a_n) around RESET tokens on memory horizon (the paper's
interpretability question): does the data-controlled gate close on RESET, and does the phase depend on the digit?

Split in two so the numerics and the figure are testable without a trained model:
  reset_profile / token_profile   pure NumPy over (tokens, per-layer |a| or arg a) arrays
  plot_profiles                   the figure from those profiles plus one sequence's heat maps
  plot_memory_horizon_transitions loads trained workdirs (gateloop_jax.load) and drives the two.

Shape legend: b batch, t length, c channels (heads x d_qk; one complex gate per channel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

# Offsets from the nearest RESET shown in the profile (0 = the RESET token itself).
WINDOW = 6


def nearest_reset_offset(tokens: np.ndarray, reset_id: int) -> np.ndarray:
    """(b, t) signed offset of each position from the nearest RESET in its row (position - reset position);
    ties go to the earlier RESET (the one whose segment the position is in); rows without RESET give a large value."""
    tokens = np.asarray(tokens)
    b, t = tokens.shape
    pos = np.arange(t)
    out = np.full((b, t), 10**6, dtype=np.int64)
    for r in range(b):
        resets = np.flatnonzero(tokens[r] == reset_id)
        if not len(resets):
            continue
        d = pos[:, None] - resets[None, :]  # (t, n_resets)
        # Prefer the smallest |d|; among equal |d| prefer d >= 0 (after the reset).
        key = np.abs(d) * 2 + (d < 0)
        out[r] = d[pos, np.argmin(key, axis=1)]
    return out


def reset_profile(tokens: np.ndarray, values: np.ndarray, reset_id: int, window: int = WINDOW) -> dict:
    """Mean over batch, channels and positions of `values` (b, t, c) at each offset -window..window from the nearest
    RESET. Returns {"offset": [...], "mean": [...], "count": [...]} (NaN where no position has that offset)."""
    off = nearest_reset_offset(tokens, reset_id)
    per_pos = np.asarray(values, np.float64).mean(-1)  # (b, t): mean over channels
    offsets = np.arange(-window, window + 1)
    means, counts = [], []
    for o in offsets:
        sel = off == o
        counts.append(int(sel.sum()))
        means.append(float(per_pos[sel].mean()) if sel.any() else float("nan"))
    return {"offset": offsets.tolist(), "mean": means, "count": counts}


def token_profile(tokens: np.ndarray, values: np.ndarray, vocab_size: int) -> dict:
    """Mean over batch and channels of `values` (b, t, c) per input token id 0..vocab_size-1 (NaN if absent)."""
    per_pos = np.asarray(values, np.float64).mean(-1)
    tokens = np.asarray(tokens)
    return {
        "token": list(range(vocab_size)),
        "mean": [
            float(per_pos[tokens == i].mean()) if (tokens == i).any() else float("nan") for i in range(vocab_size)
        ],
    }


def profiles(tokens: np.ndarray, layers: list[dict], reset_id: int, vocab_size: int) -> list[dict]:
    """Per layer: |a| around RESET, |a| per token, |arg a| per token (from inspection.transitions' dicts)."""
    out = []
    for layer in layers:
        out.append(
            {
                "magnitude_vs_reset_offset": reset_profile(tokens, layer["magnitude"], reset_id),
                "magnitude_by_token": token_profile(tokens, layer["magnitude"], vocab_size),
                "abs_phase_by_token": token_profile(tokens, np.abs(layer["phase"]), vocab_size),
            }
        )
    return out


def plot_profiles(
    per_model: Mapping[str, list[dict]],
    heatmap: Mapping[str, object] | None,
    path: Path,
    labels: Mapping[str, str] | None = None,
    token_names: list[str] | None = None,
    title: str = "",
) -> None:
    """Top: mean |a| vs offset from the nearest RESET, and |a| / |arg a| per input token, one line per (model,
    layer). Bottom (when `heatmap` is given: {"tokens": (t,), "labels": [t str], "layers": [{"magnitude","phase"}
    (t, c)], "reset_id", "name"}): |a| and arg a of one sequence, channels x positions, RESET positions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    n_heat = len(heatmap["layers"]) if heatmap else 0
    fig = plt.figure(figsize=(15, 4.2 + 2.6 * n_heat), constrained_layout=True)
    grid = fig.add_gridspec(1 + n_heat, 6)
    ax_off = fig.add_subplot(grid[0, 0:2])
    ax_tok = fig.add_subplot(grid[0, 2:4])
    ax_ph = fig.add_subplot(grid[0, 4:6])
    styles = ["-", "--", ":", "-."]
    for m_i, (name, layers) in enumerate(per_model.items()):
        color = f"C{m_i}"
        for l_i, prof in enumerate(layers):
            lab = f"{labels.get(name, name)}, layer {l_i}"
            ls = styles[l_i % len(styles)]
            p = prof["magnitude_vs_reset_offset"]
            ax_off.plot(p["offset"], p["mean"], color=color, ls=ls, marker="o", ms=3, label=lab)
            t = prof["magnitude_by_token"]
            ax_tok.plot(t["token"], t["mean"], color=color, ls=ls, marker="o", ms=3, label=lab)
            t = prof["abs_phase_by_token"]
            ax_ph.plot(t["token"], t["mean"], color=color, ls=ls, marker="o", ms=3, label=lab)
    ax_off.axvline(0, color="red", lw=1, alpha=0.5)
    ax_off.set_xlabel("position - nearest RESET position (0 = the RESET token)")
    ax_off.set_ylabel("mean |a| over channels and sequences")
    ax_off.set_title("|a| around RESET", fontsize=10)
    ax_off.legend(fontsize=7, loc="lower right")
    for ax, what in ((ax_tok, "mean |a|"), (ax_ph, "mean |arg a| (rad)")):
        ax.set_xlabel("input token")
        ax.set_ylabel(what)
        if token_names:
            ax.set_xticks(range(len(token_names)))
            ax.set_xticklabels(token_names, fontsize=8)
        ax.set_title(f"{what} per input token", fontsize=10)
    for ax in (ax_off, ax_tok, ax_ph):
        ax.grid(alpha=0.3)
    if heatmap:
        toks = np.asarray(heatmap["tokens"])
        resets = np.flatnonzero(toks == heatmap["reset_id"])
        for l_i, layer in enumerate(heatmap["layers"]):
            for c_i, (key, cmap, lo, hi) in enumerate(
                (("magnitude", "viridis", 0, 1), ("phase", "twilight", -np.pi, np.pi))
            ):
                ax = fig.add_subplot(grid[1 + l_i, 3 * c_i : 3 * c_i + 3])
                im = ax.imshow(
                    np.asarray(layer[key]).T,
                    aspect="auto",
                    interpolation="nearest",
                    origin="lower",
                    cmap=cmap,
                    vmin=lo,
                    vmax=hi,
                )
                fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
                ax.set_xticks(range(len(toks)))
                ax.set_xticklabels(heatmap["labels"], fontsize=6)
                for p in resets:
                    ax.get_xticklabels()[p].set_color("red")
                    ax.axvline(p, color="red", lw=0.6, alpha=0.6)
                ax.set_ylabel("channel")
                ax.set_title(
                    f"{heatmap['name']}, layer {l_i}: {'|a|' if key == 'magnitude' else 'arg a'} "
                    "(one eval sequence; R = RESET in red, Q = QUERY)",
                    fontsize=9,
                )
    if title:
        fig.suptitle(title, fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory_horizon_transitions(
    runs: Mapping[str, Path],
    png: Path,
    json_path: Path | None = None,
    labels: Mapping[str, str] | None = None,
    batch_size: int = 64,
    heat_len: int = 48,
) -> dict:
    """Load each trained workdir, compute the profiles on the fixed eval set, plot; the first run (GateLoop) gets the
    heat maps of one eval sequence. Returns (and writes to json_path) the profile numbers."""
    import gateloop_jax
    from gateloop_jax import inspection
    from gateloop_jax.data import synthetic

    per_model, heat, numbers = {}, None, {}
    token_names = None
    for name, wd in runs.items():
        model, config, _ = gateloop_jax.load(str(wd), tokenizer=False)
        d = config.data
        ids = synthetic.memory_horizon_vocab(d.num_digits, d.modulus)
        batch = synthetic.global_batch(
            d, batch_size=batch_size, seed=d.eval_seed, index=0, stream=synthetic.EVAL_STREAM
        )
        tokens = np.asarray(batch["inputs"])
        layers = inspection.transitions(model, tokens)
        per_model[name] = profiles(tokens, layers, ids["reset"], ids["vocab_size"])
        numbers[name] = {"workdir": str(wd), "layers": per_model[name]}
        token_names = [str(i) for i in range(ids["reset"])] + ["R", "Q"]
        if heat is None:
            # The eval row with the most RESETs in its first heat_len positions: the clearest picture.
            row = int(np.argmax((tokens[:, :heat_len] == ids["reset"]).sum(1)))
            heat = {
                "tokens": tokens[row, :heat_len],
                "reset_id": ids["reset"],
                "name": (labels or {}).get(name, name),
                "labels": inspection.token_labels(config, tokens[row, :heat_len]),
                "layers": [
                    {"magnitude": layer["magnitude"][row, :heat_len], "phase": layer["phase"][row, :heat_len]}
                    for layer in layers
                ],
            }
    plot_profiles(
        per_model,
        heat,
        png,
        labels,
        token_names,
        title="Memory horizon: learned transitions a = |a| exp(i arg a) on the eval set (seed 0 models)",
    )
    if json_path is not None:
        import json

        Path(json_path).write_text(json.dumps(numbers, indent=1) + "\n")
    return numbers
