r"""WikiText-103 language modelling with the paper's ~125M max-headed GateLoop (spec section 3).

Prepare the data once (the raw archive comes from you; nothing here downloads it):
    python -m gateloop_jax.data.wikitext103 --manual_dir MANUAL_DIR --data_dir ~/tensorflow_datasets
Command (8 accelerators, e.g. one GPU node or a TPU v4-8; see docs/training.md for SLURM and pod slices):
    python -m gateloop_jax.main --config configs/wikitext103.py --workdir workdirs/wikitext103 \
        --config.data.data_dir=~/tensorflow_datasets
Expected: not yet measured with this code. The paper reports test perplexity 13.4 at ~125M parameters with an
unrecoverable tokenizer and schedule; compare eval/word_ppl and eval/bits_per_byte across tokenizers, not eval/ppl.
Variants: variant=transformer is the softmax baseline of the same size; mode=chunked is the fast multi-head path.

Arg keys: variant = gateloop | multihead | fixed | real | linear_attention | transformer | hybrid (GateLoop and
attention blocks, "ggga"); mode = the GateLoop mode; runlocal = a CPU smoke run on prepared data (small model, short
context); test = the tiny two-step test size.
"""

import os
import sys

# The repository root, so that `configs.common` imports however this file is loaded.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from gateloop_jax.models.presets import PRESETS  # noqa: E402

VARIANTS = {
    "gateloop": ("gateloop", "125m"), "multihead": ("gateloop", "125m_multihead"),
    "fixed": ("gateloop_fixed", "125m"), "real": ("gateloop_real", "125m"),
    "linear_attention": ("linear_attention", "125m"), "transformer": ("transformer", "125m_multihead"),
    "hybrid": ("hybrid", "125m_multihead"),
}


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="gateloop", mode="auto", runlocal=False, test=False)
    name, preset = common.model_variant("wikitext103", arg.variant, VARIANTS)
    c = common.base_config("wikitext103")
    # The architecture: a named preset of gateloop_jax/models/presets.py (vocab_size comes from the tokenizer).
    c.model.name = name
    c.model.update({k: v for k, v in PRESETS[preset].items() if k != "vocab_size"})
    # How the GateLoop recurrence is computed.
    c.model.mode = arg.mode
    # bfloat16 activations with float32 parameters (the recurrence itself accumulates in float32/complex64).
    c.model.dtype = "bfloat16"
    # Dropout on the residual branches (WikiText-103 overfits at this size without it).
    c.model.dropout_rate = 0.1
    # Context 1024 as in the H3/Hyena baselines the paper compares with.
    c.data.seq_len = 1024
    # 256 sequences x 1024 tokens = 262k tokens per step; 100k steps ~ 26B tokens (~ 200 epochs of WikiText-103).
    c.global_batch_size = 256
    c.eval_batch_size = 64
    c.total_steps = 100_000
    c.optimizer.learning_rate = 6e-4
    c.optimizer.warmup_steps = 2000
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 0.1
    c.log_every_steps = 100
    c.eval_every_steps = 5000
    c.ckpt_every_steps = 5000
    # Pure data parallelism: 125M parameters and their Adam state fit on every device. For larger models shard
    # them too, e.g. --config.mesh.data=1 --config.mesh.fsdp=-1.
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    common.apply_text_sizes(c, runlocal=arg.runlocal, test=arg.test)
    c.lock()
    return c
