"""The command line: parse flags, start jax.distributed when the run spans several processes, train.

    python -m gateloop_jax.main --config configs/memory_horizon.py:runlocal --workdir workdirs/memory_horizon \
        [--config.<field>=<value> ...] [--coordinator_address HOST:PORT --num_processes N --process_id I]

Everything else lives in gateloop_jax.train (importable from a notebook). A mistake in the flags or the config is
answered in one line (exit status 2) before anything compiles; --debug shows its traceback (gateloop_jax/cli.py).
"""

from absl import flags, logging
from ml_collections import config_flags

from gateloop_jax import cli
from gateloop_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with get_config(arg): path[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0, for multi-process runs (else auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}: every setting is a flag (--config.<field>=<value>).")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every file it renames at INFO; keep the console to the progress bar unless asked (-v 0).
        logging.set_verbosity(logging.WARNING)
    # Before anything touches a device: jax.distributed must be initialised first on every process.
    from gateloop_jax.train import distributed

    distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from gateloop_jax.train import train_and_evaluate

    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    cli.run_absl(main, prog="gateloop_jax.main")
