r"""Language modelling on your own text: a folder of UTF-8 .txt files, one document each (data/text_corpus.py).

Prepare the data once (splits: the folders train/ validation/ test/, or else ~5%/5% by a hash of each file's path):
    python -m gateloop_jax.data.text_corpus --manual_dir MY_TXT_FOLDER --data_dir ~/corpus_data --vocab_size 8000
Command (a CPU smoke run; drop :runlocal for the ~125M model on 8 accelerators, see docs/training.md):
    python -m gateloop_jax.main --config configs/text_corpus.py:runlocal --config.data.data_dir=~/corpus_data \
        --workdir workdirs/text_corpus
Expected: depends on your corpus; eval/word_ppl and eval/bits_per_byte compare across tokenizers, eval/ppl does not.
Documents are packed into windows with <eod> and segment_ids (data.packing="documents"; "stream" runs them together).
A small corpus needs a smaller --vocab_size (SentencePiece says the largest it can train) and the same
--config.data.vocab_size.

Arg keys: variant = the model, as in configs/wikitext103.py; mode = the GateLoop mode; runlocal = a CPU smoke run on
prepared data (small model, short context); test = the tiny two-step test size.
"""

import os
import sys

# The repository root, so that `configs.common` imports however this file is loaded.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common  # noqa: E402
from configs.wikitext103 import VARIANTS  # noqa: E402
from gateloop_jax.models.presets import PRESETS  # noqa: E402


def get_config(arg=None):
    arg = common.parse_arg(arg, variant="gateloop", mode="auto", runlocal=False, test=False)
    name, preset = common.model_variant("text_corpus", arg.variant, VARIANTS)
    c = common.base_config("text_corpus")
    # The architecture: a named preset of gateloop_jax/models/presets.py (vocab_size comes from the tokenizer).
    c.model.name = name
    c.model.update({k: v for k, v in PRESETS[preset].items() if k != "vocab_size"})
    # How the GateLoop recurrence is computed.
    c.model.mode = arg.mode
    # bfloat16 activations with float32 parameters (the recurrence itself accumulates in float32/complex64).
    c.model.dtype = "bfloat16"
    # Dropout on the residual branches (a corpus of ~100M tokens overfits a 125M model without it).
    c.model.dropout_rate = 0.1
    # Where `python -m gateloop_jax.data.text_corpus --data_dir ...` put the prepared corpus.
    c.data.data_dir = "~/corpus_data"
    # SentencePiece pieces: the prepare command's --vocab_size (its default, 8000).
    c.data.vocab_size = 8000
    # Tokens per window (the model's context).
    c.data.seq_len = 1024
    # Whole documents ended by <eod>, the model reset at each one (see gateloop_jax/data/pipeline.py).
    c.data.packing = "documents"
    # 256 sequences x 1024 tokens = 262k tokens per step; scale total_steps to your corpus (tokens / 262k per epoch).
    c.global_batch_size = 256
    c.eval_batch_size = 64
    c.total_steps = 20_000
    c.optimizer.learning_rate = 6e-4
    c.optimizer.warmup_steps = 1000
    c.optimizer.b2 = 0.95
    c.optimizer.weight_decay = 0.1
    c.log_every_steps = 100
    c.eval_every_steps = 2000
    c.ckpt_every_steps = 2000
    # Pure data parallelism: 125M parameters and their Adam state fit on every device.
    c.mesh.update(data=-1, fsdp=1, tensor=1)
    common.apply_text_sizes(c, runlocal=arg.runlocal, test=arg.test)
    c.lock()
    return c
