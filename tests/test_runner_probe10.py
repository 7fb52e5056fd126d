"""Config validation, the CLI and the runner on settings a run cannot measure as asked: the gradient-noise
temperature of batches that hold one example, or of a batch-size sweep's masked members."""

import os

import pytest

from quotient_sgd.config import ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")

NOISE = {"observables.noise_every": 1, "observables.per_example_grads": True}


def _tiny(**overrides):
    return validate(load_config(TINY, overrides))


@pytest.mark.parametrize("over, key, value, fixed", [
    ({"data.batch_size": 1}, "observables.noise_every", "1", {"data.batch_size": 2}),
    ({"data.batch_size": 0, "data.n_train": 1}, "observables.noise_every", "1", {"data.n_train": 3, "data.batch_size": 2}),
    ({"sweep.batch_size": (4, 16)}, "sweep.batch_size", "(4, 16)", {"sweep.batch_size": ()}),
])
def test_noise_temperature_that_cannot_be_measured_is_refused(over, key, value, fixed):
    """A batch of one example has no sample variance (the temperature was NaN at every step), and a batch-size
    sweep measured every member's temperature over the largest, padded batch (a member of batch 2 in a sweep over
    (2, 8) recorded the temperature of batch 8, ten times off its own run's): both are refused by validation,
    naming the key, the value and what is allowed."""
    with pytest.raises(ConfigError) as e:
        _tiny(**NOISE, **over)
    msg = str(e.value)
    assert msg.startswith(f"config.{key} = {value}:"), msg
    assert "observables.noise_every=0" in msg, msg
    _tiny(**NOISE, **over | fixed)  # (batches of two examples, no batch-size sweep: measured)
    _tiny(**over | {"observables.noise_every": 0})  # (the same batches without the temperature pass)


def test_resume_is_not_refused_for_keys_the_command_does_not_read(tmp_path):
    """A run (or sweep) directory resumes after the config file changed only keys the command does not read (the
    ``sweep`` section for `run`, ``model.channels`` of an MLP, the ``optim.lr`` a ``sweep.lr`` replaces): the
    CLI refuses an override of those keys as having no effect, and resuming was refused as "a different config".
    A key the command reads still refuses it, naming that key only."""
    from quotient_sgd.runner import RunDirError
    from quotient_sgd.runner._rundir import check_workdir, write_config, write_json
    from quotient_sgd.runner._sweep import _check_sweep_dir

    s = _tiny()
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    run_dir.mkdir()
    sweep_dir.mkdir()
    write_config(str(run_dir / "config.json"), s)
    write_json(str(sweep_dir / "sweep.json"), {"config": s.to_dict()})
    unread = {"sweep.lr": (0.5,), "sweep.members_per_device": 2, "model.channels": (3,), "optim.b1": 0.5}
    assert check_workdir(str(run_dir), _tiny(**unread)) is True
    assert _check_sweep_dir(str(sweep_dir), _tiny(**{"optim.lr": 0.3, "seed": 7, "model.channels": (3,)}))
    for d, check, key, value in ((run_dir, check_workdir, "optim.lr", 0.3),
                                 (sweep_dir, _check_sweep_dir, "sweep.lr", (0.7,))):
        with pytest.raises(RunDirError) as e:
            check(str(d), _tiny(**unread | {key: value}))
        assert f"{key}: " in str(e.value) and "model.channels" not in str(e.value), str(e.value)


@pytest.mark.parametrize("args", [
    ["run", "--config=CFG", "--config.logging.plots", "False"],
    ["--config.symmetry.enabled", "0", "sweep", "--config=CFG"],
])
def test_a_bool_override_given_its_value_as_the_next_argument_is_named(tmp_path, monkeypatch, capsys, args):
    """``--config.logging.plots False`` (the space-separated form every other key takes) left absl's bool flag
    True and the value an argument of its own: "unexpected arguments ['False']", or "unknown subcommand '0'"
    before the subcommand, naming neither the key nor the fix.  It is refused naming both; nothing is written."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    key, value = next((a[len("--config."):], args[i + 1]) for i, a in enumerate(args) if a.startswith("--config."))
    assert main(["quotient-sgd", *(a.replace("CFG", TINY) for a in args)]) == 2
    err = capsys.readouterr().err
    assert f"config.{key} = {value!r}: a bool" in err and f"--config.{key}={value == 'True'}" in err, err
    assert os.listdir(tmp_path) == []


def test_config_flag_without_a_path_is_named(tmp_path, monkeypatch, capsys):
    """``quotient-sgd run --config`` (the path forgotten) said "cannot load the config file: Configuration is not
    available because of an earlier failure to load: Failed loading config file config_config"."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quotient-sgd", "run", "--config.steps=3", "--config"]) == 2
    err = capsys.readouterr().err
    assert "--config needs a file path" in err and "config_config" not in err, err
    assert os.listdir(tmp_path) == []


def test_an_unread_key_given_twice_is_named_with_the_value_in_effect(tmp_path, monkeypatch, capsys):
    """``--config.data.n_train=5 --config.data.n_train=7`` on the digits: the refusal named the first value (5),
    not the 7 that the config holds (the last of a key given twice wins)."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quotient-sgd", "run", "--config.data.n_train=5", "--config.data.n_train=7"]) == 2
    err = capsys.readouterr().err
    assert "config.data.n_train = 7: this override would have no effect" in err, err
    assert os.listdir(tmp_path) == []


def test_more_hessian_extremes_than_the_horizontal_space_has_are_refused():
    """A deep linear 2-1-1 stack has 3 parameters and one GL direction: its horizontal space has 2 dimensions.
    ``observables.hessian_k = 3`` ran, and the third "eigenvalue" at each end was a spurious Lanczos value
    (top 1.111, 0.545, then 0.994 again and again).  Refused, naming the dimension; ``hessian_k`` up to it passes."""
    over = {"model.name": "deep_linear", "model.hidden": (1,), "data.din": 2, "observables.hessian_every": 5,
            "observables.names": ("loss", "charges")}
    with pytest.raises(ConfigError) as e:
        _tiny(**over | {"observables.hessian_k": 3})
    msg = str(e.value)
    assert msg.startswith("config.observables.hessian_k = 3:") and "2-dimensional horizontal space" in msg, msg
    assert "observables.hessian_k <= 2" in msg, msg
    _tiny(**over | {"observables.hessian_k": 2})
    _tiny(**over | {"observables.hessian_k": 3, "observables.hessian_every": 0})


def test_a_config_file_given_with_one_dash_is_checked_as_with_two(tmp_path, monkeypatch, capsys):
    """absl reads ``-config=PATH`` as ``--config=PATH``, and so did the command's reordering, but not its checks
    of the file: a missing file was "Configuration is not available because of an earlier failure to load ...
    config_config", a file raising in get_config() "Error whilst parsing config file:" and ml_collections' text."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.py").write_text("def get_config():\n    raise ValueError('no such experiment')\n")
    for args, needle in ((["-config=missing.py"], "config file 'missing.py' does not exist"),
                         (["-config", "bad.py"], "'bad.py', line 2: ValueError: no such experiment")):
        assert main(["quotient-sgd", "run", *args, "--config.steps=3"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "config_config" not in err and "Error whilst" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["bad.py"]


@pytest.mark.parametrize("arg", ["--help", "--version"])
def test_output_into_a_closed_pipe_ends_without_a_traceback(arg):
    """``quotient-sgd report DIR | head -1`` (or ``--help | head``): the reader gone, printing raised
    ``BrokenPipeError`` and the command ended with its traceback (status 1); now quietly, status 128 + SIGPIPE as
    a shell reports a command the pipe ended."""
    import signal
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # (no reader: the command's first write to stdout fails)
    try:
        p = subprocess.run([sys.executable, "-m", "quotient_sgd.cli", arg], stdout=w, stderr=subprocess.PIPE,
                           env=dict(os.environ, QSGD_NO_MALLOC_TUNING="1"), timeout=120)
    finally:
        os.close(w)
    assert p.returncode == 128 + signal.SIGPIPE and b"Traceback" not in p.stderr, p.stderr.decode()


def test_a_config_file_returning_a_frozen_config_is_named(tmp_path, monkeypatch, capsys):
    """A get_config() returning a FrozenConfigDict was refused as "bad config override among
    ['--config.steps=3']: FrozenConfigDict is immutable. Cannot call lock()", blaming the override."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "frozen.py").write_text(
        "import ml_collections\nfrom quotient_sgd.config import default_config\n\n\n"
        "def get_config():\n    return ml_collections.FrozenConfigDict(default_config())\n")
    assert main(["quotient-sgd", "run", "--config=frozen.py", "--config.steps=3"]) == 2
    err = capsys.readouterr().err
    assert "get_config() returned a FrozenConfigDict" in err and "bad config override" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["frozen.py"]


def test_importing_the_package_leaves_jax_distributed_initialize_possible():
    """``jax.distributed.initialize`` must come before anything starts JAX's backend, so importing quotient_sgd
    (every subpackage, the CLI included) computes nothing: an optax state built at import time to read its type
    started the backend, and every multi-host sweep failed in ``initialize``."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    code = ("import quotient_sgd, quotient_sgd.cli, quotient_sgd.config, quotient_sgd.data, quotient_sgd.diagnostics, "
            "quotient_sgd.hj, quotient_sgd.models, quotient_sgd.observables, quotient_sgd.optim, quotient_sgd.runner, "
            "quotient_sgd.symmetry\n"
            "import jax\n"
            f"jax.distributed.initialize(coordinator_address='127.0.0.1:{port}', num_processes=1, process_id=0)\n"
            "print('processes', jax.process_count())\n"
            "jax.distributed.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and "processes 1" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("flags", [["--workdir=a", "--workdir=b"], ["--workdir=a", "--workdir", "b"],
                                   ["--process_id=0", "--process_id=1"]])
def test_a_command_line_flag_given_twice_is_refused(flags, tmp_path, monkeypatch, capsys):
    """absl keeps the last of a flag given twice without a word (``--workdir=a ... --workdir=b`` wrote into b); like
    ``--config``, the command's own flags are refused when given twice, naming every value, and nothing is written."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quotient-sgd", "run", f"--config={TINY}", "--config.steps=3", *flags]) == 2
    err = capsys.readouterr().err
    name = flags[0].partition("=")[0]
    assert f"{name} is given 2 times" in err, err
    assert os.listdir(tmp_path) == []
