"""Inspect the learned state transitions a_n = |a_n| exp(i arg a_n) of every GateLoop layer.

    layers = inspection.transitions(model, tokens)        # per layer {"magnitude", "phase"}, each (b, t, h*k)
    fig = inspection.plot_transitions(model, tokens[0], token_labels=inspection.token_labels(config, tokens[0]),
                                      mark={"RESET": 10}, path="transitions.png")

Shape legend: b batch, t length, h heads, k d_qk (channels = h*k, one complex gate per channel).

The paper asks whether data-controlled transitions are interpretable: on memory_horizon a solved model should
close its gates on RESET (|a| -> 0 forgets the running sum) and keep them open elsewhere (|a| ~ 1), with phases that
depend on the digit (a rotation counts mod 10). The heat maps show exactly that, position by position.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _check_gateloop(model):
    if not any(hasattr(block.mixer, "transition") for block in model.blocks):
        raise ValueError(f"inspection: model {model.config.name!r} has no state transitions (only GateLoop mixers do).")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _transitions(graphdef, state, tokens):
    # One compiled program instead of op-by-op dispatch (which compiles every primitive on first use).
    return nnx.merge(graphdef, state).transitions(tokens)


def transitions(model, tokens) -> list[dict[str, np.ndarray]]:
    """|a| and arg a of every layer for the input tokens.

    Args:
      model: a GateLoop CausalLM (any transition variant: data-controlled, fixed, real, none).
      tokens: (b, t) or (t,) int.

    Returns:
      one dict per GateLoop layer (a hybrid's attention layers have none): magnitude (b, t, h*k) in [0, 1], phase
      (b, t, h*k) in radians, log_magnitude (b, t, h*k) (exact where |a| underflows to 0); float32 NumPy arrays.
    """
    _check_gateloop(model)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    out = []
    for layer in _transitions(*nnx.split(model), tokens):
        b, t = layer.log_magnitude.shape[:2]
        log_r = np.asarray(layer.log_magnitude, np.float32).reshape(b, t, -1)
        phase = np.asarray(layer.phase, np.float32).reshape(b, t, -1)
        out.append(dict(magnitude=np.exp(log_r), phase=phase, log_magnitude=log_r))
    return out


def token_labels(config, tokens) -> list[str]:
    """Readable names of token ids for plot axes: memory_horizon's RESET/QUERY as R/Q, digits as themselves."""
    tokens = np.asarray(tokens).reshape(-1)
    names = {}
    if config is not None and config.data.name == "memory_horizon":
        from gateloop_jax.data.synthetic import memory_horizon_vocab

        vocab = memory_horizon_vocab(config.data.num_digits, config.data.modulus)
        names = {vocab["reset"]: "R", vocab["query"]: "Q"}
    return [names.get(int(tok), str(int(tok))) for tok in tokens]


def plot_transitions(
    model,
    tokens,
    *,
    layer: int | Sequence[int] | None = None,
    path: str | None = None,
    token_labels: Sequence[str] | None = None,
    mark: Mapping[str, int] | None = None,
    row: int = 0,
):
    """Heat maps of |a| and arg a over positions (x) and channels (y), one row of panels per layer.

    Args:
      model: a GateLoop CausalLM.
      tokens: (t,) or (b, t) int; row `row` is plotted.
      layer: a layer index, a list of them, or None = every layer.
      path: save the figure there (PNG, 150 dpi) when given.
      token_labels: t strings for the position axis (e.g. inspection.token_labels(config, tokens)).
      mark: {label: token id}: dashed vertical lines at the positions holding that token (e.g. {"RESET": 10}).
      row: which batch row to plot.

    Returns:
      the matplotlib Figure.
    """
    import matplotlib.pyplot as plt  # Imported here: `import gateloop_jax` does not pay for matplotlib.

    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    layers = transitions(model, tokens[row:row + 1])
    indices = list(range(len(layers))) if layer is None else ([layer] if np.isscalar(layer) else list(layer))
    t = tokens.shape[1]
    channels = layers[0]["magnitude"].shape[-1]
    width = min(3 + 0.12 * t, 16)
    height = 1.2 + min(0.1 * channels, 3.5)
    fig, axes = plt.subplots(len(indices), 2, figsize=(2 * width, height * len(indices)), squeeze=False,
                             constrained_layout=True)
    marks = []
    for label, token_id in (mark or {}).items():
        marks += [(label, int(p)) for p in np.flatnonzero(tokens[row] == token_id)]
    for r, i in enumerate(indices):
        panels = (("|a|", layers[i]["magnitude"][0], dict(cmap="viridis", vmin=0.0, vmax=1.0)),
                  # Phase is an angle: a cyclic colour map, so +pi and -pi get the same colour.
                  ("arg a", layers[i]["phase"][0], dict(cmap="twilight", vmin=-np.pi, vmax=np.pi)))
        for ax, (name, values, style) in zip(axes[r], panels):
            image = ax.imshow(values.T, aspect="auto", interpolation="nearest", origin="lower", **style)
            fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
            ax.set_title(f"layer {i}: {name}")
            ax.set_ylabel("channel (head x d_qk)")
            if token_labels is not None:
                ax.set_xticks(range(t))
                ax.set_xticklabels(list(token_labels), fontsize=max(4, min(8, 600 // max(t, 1))))
                ax.set_xlabel("position (token)")
            else:
                ax.set_xlabel("position")
            # Marked positions: a red triangle above the panel and a red tick label, leaving the cells visible.
            for label, p in marks:
                ax.plot([p], [channels - 0.5], marker="v", color="red", markersize=5, clip_on=False,
                        transform=ax.transData)
                if token_labels is not None:
                    ax.get_xticklabels()[p].set_color("red")
        if marks and r == 0:
            axes[0][0].set_title(f"layer {indices[0]}: |a|   (red: {', '.join(sorted({m[0] for m in marks}))})")
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def summary_by_token(model, tokens, *, layer: int = 0) -> dict[int, dict[str, float]]:
    """Mean |a| and mean |arg a| over channels and positions, per token id, for one layer.

    A one-line answer to "what does the gate do on each token" (e.g. |a| on RESET vs on digits).
    tokens: (b, t) or (t,) int. Returns {token id: {"magnitude", "abs_phase", "count"}}.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    values = transitions(model, tokens)[layer]
    out = {}
    for token_id in np.unique(tokens):
        where = tokens == token_id
        out[int(token_id)] = dict(magnitude=float(values["magnitude"][where].mean()),
                                  abs_phase=float(np.abs(values["phase"][where]).mean()), count=int(where.sum()))
    return out


__all__ = ["plot_transitions", "summary_by_token", "token_labels", "transitions"]
