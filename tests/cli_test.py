"""User mistakes on the command lines: one line on stderr naming the field, the value and the fix, exit status 2, no
traceback, nothing computed; --debug keeps the traceback. Each mistake is checked in-process against the function
that catches it; a few subprocess runs check the whole path (flag parsing, the wrapper, the exit status).
"""

import os
import subprocess
import sys

import jax
import pytest

from gateloop_jax import cli
from gateloop_jax.errors import ConfigError, MissingPathError, UserError
from gateloop_jax.train import settings, validate
from train_test import ROOT, get_config

MH_TEST = "configs/memory_horizon.py:test"


def run_cli(module, *args, env=None):
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
    )
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line(rc, stderr, *fragments):
    assert rc == cli.EXIT_USER_ERROR, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ---------------------------------------------------------------------------------------------------------------
# In-process: each mistake of the table, at the check that catches it.


@pytest.mark.parametrize(
    "override, expected",
    [
        ("bogus_field", "--config.bogus_field: --config has no field 'bogus_field'; the fields of --config are"),
        (
            "mesh.bogus_axis",
            "--config.mesh has no field 'bogus_axis'; the fields of --config.mesh are data, fsdp, sequence, tensor",
        ),
        ("model.d_modle", "--config.model has no field 'd_modle'; did you mean --config.model.d_model"),
        ("total_steps.x", "--config.total_steps is a value (int), not a group of fields"),
    ],
)
def test_unknown_config_field_named_with_close_matches(override, expected):
    message = cli.config_override_message(["prog", "--config", MH_TEST, f"--config.{override}=1"])
    assert expected in message and "\n" not in message


def test_known_config_fields_are_not_reported():
    assert cli.config_override_message(["prog", f"--config={MH_TEST}", "--config.mesh.data=2"]) is None


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("global_batch_size", -4, "config.global_batch_size=-4: must be an integer >= 1"),
        ("global_batch_size", 0, "config.global_batch_size=0: must be an integer >= 1"),
        ("eval_batch_size", 0, "config.eval_batch_size=0"),
        ("total_steps", 0, "config.total_steps=0: must be an integer >= 1"),
        ("total_steps", -1, "config.total_steps=-1"),
        ("grad_accum_steps", 0, "config.grad_accum_steps=0"),
        ("data.seq_len", 0, "config.data.seq_len=0"),
        ("data.seq_len", -8, "config.data.seq_len=-8"),
        ("optimizer.learning_rate", 0.0, "config.optimizer.learning_rate=0.0: must be a number > 0"),
        ("optimizer.learning_rate", -1e-3, "config.optimizer.learning_rate=-0.001"),
        ("optimizer.warmup_steps", -1, "config.optimizer.warmup_steps=-1"),
        ("eval_every_steps", -5, "config.eval_every_steps=-5"),
        ("keep_ckpts", 0, "config.keep_ckpts=0"),
        ("model.name", "nosuchmodel", "name='nosuchmodel' is not registered"),
        ("model.mode", "bogus", "mode='bogus' is not one of"),
        ("data.num_kv_pairs", 40, "mqar needs seq_len >= 4 * num_kv_pairs"),
    ],
)
def test_bad_setting_is_a_config_error_before_compiling(field, value, expected, monkeypatch):
    c = get_config("mqar" if field == "data.num_kv_pairs" else "memory_horizon")
    *parents, leaf = field.split(".")
    node = c
    for key in parents:
        node = node[key]
    node[leaf] = value
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before validating"))
    with pytest.raises(ConfigError) as info:
        validate(c)
    assert expected in str(info.value)


def test_missing_init_from_and_wrong_eval_split(tmp_path):
    c = get_config("memory_horizon")
    c.init_from = str(tmp_path / "nowhere")
    with pytest.raises(MissingPathError, match=r"config.init_from=.*nowhere.* does not exist"):
        settings.check_settings(c)
    c = get_config("wikitext103")
    c.eval_split = "valid"
    with pytest.raises(ConfigError, match=r"config.eval_split='valid': wikitext103 has 'validation' and 'test'"):
        settings.check_settings(c)


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"workdir=.*file.* is an existing file, not a directory"):
        settings.check_workdir(str(path))
    settings.check_workdir(str(tmp_path / "new"))  # not there yet: created by the trainer


def test_config_arg_unknown_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown key 'nosuchkey' in 'nosuchkey'; known keys are"):
        get_config("memory_horizon", "nosuchkey")


def test_flag_errors_find_our_error_inside_absl_and_ml_collections_wrappers():
    from absl import flags

    # What absl / ml_collections do to an error raised by get_config: re-raise it twice, message rewritten.
    try:
        try:
            try:
                raise ConfigError("config arg: unknown key 'x'")
            except ValueError as e:
                raise ConfigError("Error whilst parsing config file:\n\nTraceback ...") from e
        except ValueError as e:
            raise flags.IllegalFlagValueError(f"flag --config=c.py:x: {e}")  # noqa: B904 - as absl does
    except flags.Error as e:
        assert cli.flag_error_message(e, []) == "config arg: unknown key 'x'"
    # A config file that fails with an error of its own is a bug: no one-line answer, the traceback stays.
    assert cli.flag_error_message(flags.IllegalFlagValueError("flag --config=c.py: Traceback ..."), []) is None
    assert cli.flag_error_message(RuntimeError("bug"), []) is None


def test_missing_config_file_message():
    assert "no such file 'configs/nofile.py'" in cli.missing_config_file_message(["p", "--config=configs/nofile.py:x"])
    assert cli.missing_config_file_message(["p", "--config", MH_TEST]) is None


def test_sample_flags_are_checked(monkeypatch):
    from absl import flags

    from gateloop_jax import sample

    flags.FLAGS(["sample", "--workdir=w", "--prompt=1"])  # the module's flags, parsed in-process
    try:
        sample.check_flags()  # the defaults pass
        for flag, value, expected in [
            ("max_new_tokens", 0, "--max_new_tokens=0: must be >= 1"),
            ("temperature", -1.0, "--temperature=-1.0"),
            ("top_k", 0, "--top_k=0"),
            ("top_p", 1.5, "--top_p=1.5"),
            ("mode", "bogus", "--mode='bogus'"),
        ]:
            default = flags.FLAGS[flag].value
            flags.FLAGS[flag].value = value
            with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
                sample.check_flags()
            flags.FLAGS[flag].value = default
    finally:
        flags.FLAGS.unparse_flags()


def test_load_missing_workdir_is_a_missing_path_error(tmp_path):
    import gateloop_jax

    with pytest.raises(MissingPathError, match="does not exist"):
        gateloop_jax.load(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--manual_dir", "/nonexistent/manual"], "manual_dir /nonexistent/manual does not exist"),
        (["--vocab_size", "0"], "--vocab_size=0: must be >= 1"),
        (["--read_threads", "-1"], "--read_threads=-1"),
    ],
)
def test_wikitext_prepare_arguments(args, expected, tmp_path):
    import argparse

    from gateloop_jax.data import wikitext103 as wt

    namespace = argparse.Namespace(
        manual_dir=None, data_dir=str(tmp_path), vocab_size=32000, input_sentence_size=100, read_threads=1
    )
    for flag, value in zip(args[::2], args[1::2]):
        setattr(namespace, flag[2:], value if flag == "--manual_dir" else int(value))
    with pytest.raises(UserError, match=expected):
        wt.check_args(namespace)


def test_one_line_folds_line_breaks():
    assert cli.one_line("does not exist. Prepare with\n  python -m x") == "does not exist. Prepare with python -m x"


# ---------------------------------------------------------------------------------------------------------------
# Subprocesses: the whole path of a mistake, and --debug.


def test_main_unknown_field_one_line(tmp_path):
    rc, _, err = run_cli(
        "gateloop_jax.main", "--config", MH_TEST, "--workdir", str(tmp_path / "w"), "--config.mesh.bogus_axis=2"
    )
    assert_one_line(rc, err, "gateloop_jax.main: error: --config.mesh.bogus_axis", "data, fsdp, sequence, tensor")


def test_main_negative_batch_one_line_and_debug_traceback(tmp_path):
    args = ("--config", MH_TEST, "--workdir", str(tmp_path / "w"), "--config.global_batch_size=-4")
    rc, _, err = run_cli("gateloop_jax.main", *args)
    assert_one_line(rc, err, "config.global_batch_size=-4: must be an integer >= 1")
    assert not os.path.exists(tmp_path / "w")  # nothing written, nothing computed
    rc, _, err = run_cli("gateloop_jax.main", *args, env={cli.DEBUG_ENV: "1"})
    assert rc == 1 and "Traceback" in err and "ConfigError: config.global_batch_size=-4" in err


def test_wikitext_missing_manual_dir_one_line(tmp_path):
    rc, _, err = run_cli(
        "gateloop_jax.data.wikitext103", "--manual_dir", "/nonexistent/manual", "--data_dir", str(tmp_path / "d")
    )
    assert_one_line(rc, err, "manual_dir /nonexistent/manual does not exist", "wikitext-103-raw-v1.zip")
