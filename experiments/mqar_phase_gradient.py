r"""How much of the gradient that reaches the embeddings and the first block comes through GateLoop's phase path, at
the MQAR lengths, for the model of configs/mqar.py at initialisation (and with its phase projection scaled up, as
training grows it).

The phase at position m turns every later readout of every earlier key, so the loss's gradient with respect to it sums
O(t^2) terms; the part that flows on into the mixer's input is the difference between the gradients with
phase_input_grad = 1 (plain backpropagation) and 0 (none). One batch, float32, any machine (a minute on a CPU):

    python experiments/mqar_phase_gradient.py --out experiments/results/mqar_probes/phase_gradient_share.json

The recorded figures are for the paper's free phase on half of each head's channels (the default --overrides);
`--overrides ""` measures configs/mqar.py as it ships (the phase coupled to the decay, every channel phased).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import results_common as cr  # noqa: E402

# (length, key-value pairs): the CPU size and the full size of configs/mqar.py.
SIZES = ((64, 4), (256, 16))
# Multipliers of the phase projection's initial weights: the shipped init, then phases ~10x and ~30x larger.
PHASE_SCALES = (1.0, 10.0, 30.0)


def gradient_norm(grads, part: str) -> float:
    import jax
    import jax.numpy as jnp

    leaves = [g for path, g in jax.tree_util.tree_leaves_with_path(grads) if part in jax.tree_util.keystr(path)]
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves)))


# Trainer flags on top of configs/mqar.py for the recorded figures: the free phase on half of the channels.
FREE_PHASE = "--config.model.phase_coupling=free --config.model.phase_fraction=0.5"


def measure(seq_len: int, num_kv_pairs: int, phase_scale: float, batch_size: int = 16, seed: int = 0,
            overrides: str = FREE_PHASE) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from gateloop_jax.data import synthetic
    from gateloop_jax.models import build_model
    from gateloop_jax.train.trainer import model_config_from

    config = cr.config_of_command([
        "--config=configs/mqar.py:variant=gateloop", f"--config.data.seq_len={seq_len}",
        f"--config.data.num_kv_pairs={num_kv_pairs}", "--config.data.min_num_kv_pairs=0",
        "--config.model.mode=chunked", *overrides.split()])
    batch = synthetic.mqar(np.random.default_rng(seed), batch_size, seq_len=seq_len, num_kv_pairs=num_kv_pairs,
                           vocab_size=config.data.vocab_size)
    grads = {}
    for scale in (1.0, 0.0):
        model = build_model(model_config_from(config).replace(phase_input_grad=scale), rngs=nnx.Rngs(seed))
        for block in model.blocks:
            block.mixer.theta_proj.kernel[...] = phase_scale * block.mixer.theta_proj.kernel[...]
        graph, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            logits = nnx.merge(graph, params, rest)(batch["inputs"])
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
            return jnp.sum(nll * batch["mask"]) / jnp.sum(batch["mask"])

        grads[scale] = jax.grad(loss)(params)
    # The forward pass is the same for both scales: the phases of the last model built.
    x = jax.random.normal(jax.random.key(seed), (2, seq_len, model.config.d_model))
    phase = float(jnp.mean(jnp.abs(model.blocks[0].mixer.transition(x).phase[..., :model.config.phased_channels])))
    through_phase = jax.tree.map(lambda a, b: a - b, grads[1.0], grads[0.0])
    record = {"seq_len": seq_len, "num_kv_pairs": num_kv_pairs, "phase_scale": phase_scale,
              "mean_abs_phase_rad_per_token": round(phase, 4)}
    for name, part in (("embeddings", "embed"), ("block_0", "[0]")):
        total, share = gradient_norm(grads[1.0], part), gradient_norm(through_phase, part)
        record[name] = {"gradient_norm": total, "through_phase_path": share, "fraction": round(share / total, 3)}
    return record


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON file for the records (default: print only)")
    p.add_argument("--overrides", default=FREE_PHASE, help="trainer flags on top of configs/mqar.py:variant=gateloop")
    args = p.parse_args(argv)
    records = []
    for seq_len, num_kv_pairs in SIZES:
        for phase_scale in PHASE_SCALES:
            record = measure(seq_len, num_kv_pairs, phase_scale, overrides=args.overrides)
            records.append(record)
            print(json.dumps(record), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python experiments/mqar_phase_gradient.py --out " + args.out,
                       "what": __doc__.split("\n\n")[0].replace("\n", " "), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
