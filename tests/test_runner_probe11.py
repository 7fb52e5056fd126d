"""The command line, configs and the runner's arguments on what they did not check or could not say: the sweep's
multi-host options (flags and environment: counts, ids, addresses, a coordinator that cannot start), overrides
validation needs, a value for a whole section, config keys written as flags, load_config's overrides of the wrong
kind, a batch-size sweep of a full-batch config, unvalidated settings and bad members_per_device / devices
arguments given to the runner, a relative XDG_CACHE_HOME; and the run configs shipped in configs/ (validate and
build; slow: run and report)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QSGD_", "XLA_FLAGS", "JAX_"))}
    env.update(PYTHONPATH=ROOT, QSGD_NO_MALLOC_TUNING="1", QSGD_COMPILATION_CACHE="off", JAX_PLATFORMS="cpu")
    return env


def _unreached(monkeypatch):
    """Reaching jax.distributed.initialize or the sweep fails the test (the options are refused before)."""
    import jax

    import quotient_sgd.runner as runner_pkg

    def reached(*a, **k):
        raise AssertionError("the command went on past its option checks")

    monkeypatch.setattr(runner_pkg, "sweep", reached)
    monkeypatch.setattr(jax.distributed, "initialize", reached)


@pytest.mark.parametrize("args, env, needle", [
    (["--num_processes=0"], {}, "--num_processes (or QSGD_NUM_PROCESSES) = 0: must be >= 1"),
    ([], {"QSGD_NUM_PROCESSES": "-3"}, "--num_processes (or QSGD_NUM_PROCESSES) = -3: must be >= 1"),
    (["--distributed", "--process_id=-1"], {}, "--process_id (or QSGD_PROCESS_ID) = -1: must be >= 0"),
    (["--distributed", "--num_processes=2", "--process_id=5"], {},
     "--process_id (or QSGD_PROCESS_ID) = 5: must be in [0, 1] (--num_processes = 2)"),
    (["--distributed", "--num_processes=0"], {}, "--num_processes (or QSGD_NUM_PROCESSES) = 0: must be >= 1"),
    (["--coordinator_address=nohost", "--num_processes=1", "--process_id=0"], {},
     "--coordinator_address (or QSGD_COORDINATOR_ADDRESS) = 'nohost': expected HOST:PORT"),
    (["--num_processes=1", "--process_id=0"], {"QSGD_COORDINATOR_ADDRESS": "127.0.0.1:port"},
     "= '127.0.0.1:port': expected HOST:PORT, a host name or address and a port in [1, 65535]"),
    (["--coordinator_address=127.0.0.1:70000", "--num_processes=1", "--process_id=0"], {},
     "= '127.0.0.1:70000': expected HOST:PORT"),
])
def test_multi_host_counts_ids_and_addresses_out_of_range_are_refused(tmp_path, monkeypatch, capsys, args, env,
                                                                      needle):
    """A process count below 1 (flag or QSGD_NUM_PROCESSES) without a coordinator passed silently: the sweep ran
    as one process (``--num_processes=-3``: exit 0).  With ``--distributed`` a negative id, or one outside the
    count, went to jax.distributed.initialize, and a coordinator address without a port failed there with an
    ``IndexError`` traceback (``'nohost'``) or a "Failed to start RPC server" (``'127.0.0.1:port'``).  Each is
    refused naming the option, the value and what is allowed, before anything starts or is written."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    for k in ("QSGD_COORDINATOR_ADDRESS", "QSGD_NUM_PROCESSES", "QSGD_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _unreached(monkeypatch)
    code = main(["quotient-sgd", "sweep", f"--config={TINY}", "--config.steps=2", *args, "--workdir=w"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_a_coordinator_that_cannot_start_is_named_without_a_traceback(tmp_path):
    """``--distributed`` where JAX's cluster auto-detection finds no cluster ended in JAX's traceback
    ("ValueError: coordinator_address should be defined", exit 1), and a coordinator port another program listens
    on in JAX's "Failed to start RPC server" traceback or a segmentation fault of its gRPC service (exit 139).
    Both are named (the option, the address, what to do), exit status 2, nothing written."""
    script = (
        "import socket, sys\n"
        "from quotient_sgd.cli import main\n"
        "busy = socket.socket(); busy.bind(('127.0.0.1', 0)); busy.listen(1); port = busy.getsockname()[1]\n"
        f"common = ['quotient-sgd', 'sweep', '--config={TINY}', '--config.steps=2', '--workdir=w']\n"
        "codes = [main(common + ['--distributed']),\n"
        "         main(common + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=1', '--process_id=0'])]\n"
        "print('CODES', codes, port, flush=True)\n")
    env = _child_env()
    env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "KUBERNETES_"))}
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "CODES [2, 2]" in p.stdout, (p.returncode, p.stdout, p.stderr[-3000:])
    port = p.stdout.split()[-1]
    assert "--distributed: jax.distributed.initialize() failed (ValueError: coordinator_address should be " \
           "defined.)" in p.stderr, p.stderr
    assert f"--coordinator_address=127.0.0.1:{port}, and this machine's port {port} is taken" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert os.listdir(tmp_path) == []


def test_an_override_that_validation_needs_is_not_refused_as_without_effect(tmp_path, monkeypatch, capsys):
    """Validation checks every key whatever the command: ``data.batch_size = 16`` of configs/tiny.py above a
    training set shrunk to 10 examples is refused also on a sweep whose ``sweep.batch_size`` replaces it, and the
    override that fixes it (``--config.data.batch_size=8``) was refused as "would have no effect": no command line
    ran the sweep.  The override passes when the file's own value does not validate; one that is not needed is
    still refused."""
    from types import SimpleNamespace

    import quotient_sgd.runner as runner_pkg
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    got = []

    def fake_sweep(settings, workdir, **kw):
        got.append(settings)
        return SimpleNamespace(num_members=2, wrote=True, wall_s=0.0)

    monkeypatch.setattr(runner_pkg, "sweep", fake_sweep)
    common = ["quotient-sgd", "sweep", f"--config={TINY}", "--config.sweep.batch_size=(4,8)", "--workdir=w"]
    assert main(common + ["--config.data.n_train=10"]) == 2
    assert "config.data.batch_size = 16: larger than the training set (10 examples" in capsys.readouterr().err
    assert main(common + ["--config.data.n_train=10", "--config.data.batch_size=8"]) == 0, capsys.readouterr().err
    assert got and got[0].data.n_train == 10 and got[0].data.batch_size == 8 and got[0].sweep.batch_size == (4, 8)
    assert main(common + ["--config.data.batch_size=8"]) == 2  # (16 fits the file's 128 examples: not needed)
    assert "config.data.batch_size = 8: this override would have no effect" in capsys.readouterr().err
    assert len(got) == 1 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("arg, needle", [
    ("--config.model=mlp", "config.model = mlp: config.model is a section, not a key; set one of its keys, e.g. "
                           "--config.model.name=mlp (keys of config.model: ['activation', "),
    ("--config.sweep=()", "config.sweep = (): config.sweep is a section, not a key; set one of its keys, e.g. "
                          "--config.sweep.mode=VALUE"),
])
def test_a_value_given_to_a_whole_section_is_named(tmp_path, monkeypatch, capsys, arg, needle):
    """``--config.model=mlp`` (meaning ``model.name``) failed in ml_collections' parser: "Failed to parse 'mlp' as a
    ConfigDict: ValueError('malformed node or string on line 1: <ast.Name object at 0x...>')".  It is named as a
    section with its keys, before anything is written."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quotient-sgd", "run", f"--config={TINY}", arg, "--workdir=w"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "ast.Name" not in err and "Failed to parse" not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("arg, hint", [
    ("--steps=3", "did you mean --config.steps?"),
    ("--lr=0.1", "did you mean --config.optim.lr?"),
    ("--optim.lr=0.1", "did you mean --config.optim.lr?"),
    ("--every=5", "did you mean --config.observables.every or --config.logging.every or --config.checkpoint.every?"),
])
def test_a_config_key_given_as_a_flag_of_its_own_is_pointed_to_its_config_spelling(tmp_path, monkeypatch, capsys,
                                                                                    arg, hint):
    """``--steps=3`` or ``--lr=0.1`` got absl's bare "Unknown command line flag 'steps'"; the message now says how
    config keys are set and which key(s) the name is.  A name that is no key gets no hint."""
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["quotient-sgd", "run", f"--config={TINY}", arg]) == 2
    err = capsys.readouterr().err
    assert "Unknown command line flag" in err and "config keys are set as --config.KEY=VALUE: " + hint in err, err
    assert main(["quotient-sgd", "run", f"--config={TINY}", "--stepz=3"]) == 2
    assert "--config.KEY" not in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_unvalidated_config_given_to_run_or_sweep_is_named_and_writes_nothing(tmp_path, command):
    """``quotient_sgd.runner.sweep(config)`` with the ``ConfigDict`` itself (not ``validate(config)``) failed in a
    bare ``AttributeError: 'axes'`` and left the sweep directory it had created behind (empty); ``run`` named
    ``build``'s argument.  Both name their own argument and what to pass, before the directory is made."""
    from quotient_sgd import runner
    from quotient_sgd.config import load_config

    workdir = tmp_path / "out"
    with pytest.raises(TypeError, match=rf"^{command}: settings must be a quotient_sgd.config.Settings \(a "
                                        r"validated config\), got StrictConfigDict; pass quotient_sgd.config.validate"):
        getattr(runner, command)(load_config(TINY), str(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("value", [-2, 2.5, "2", True])
def test_sweep_members_per_device_argument_out_of_range_is_refused(tmp_path, value):
    """``sweep(..., members_per_device=-2)`` ran with one member per device as a fixed choice (the cost measurement
    skipped), 2.5 ran as 2, ``"2"`` failed in a bare ``TypeError`` ('<' between int and str), ``True`` ran as 1;
    ``sweep.members_per_device`` in a config is validated, the argument was not.  Refused naming it, nothing
    written."""
    from quotient_sgd import runner
    from quotient_sgd.config import load_config, validate

    s = validate(load_config(TINY, {"steps": 2, "sweep.seed": (0,), "logging.plots": False}))
    with pytest.raises(ValueError, match=rf"^sweep: members_per_device={value!r} is not allowed; need an integer"):
        runner.sweep(s, str(tmp_path / "out"), members_per_device=value)
    assert not (tmp_path / "out").exists()


def test_run_builds_what_its_settings_describe(tmp_path):
    """``run(settings, workdir, built=...)`` trained the model of whatever ``Built`` it was handed (a 8-wide MLP for
    settings that record a 16-wide one: ``config.json`` and the trajectory disagreed, silently); ``build`` is
    cached on the settings, so the argument saved nothing.  ``run`` takes no ``built``: it builds its settings."""
    from quotient_sgd import runner
    from quotient_sgd.config import load_config, validate

    s = validate(load_config(TINY, {"steps": 2, "logging.plots": False}))
    other = runner.build(validate(load_config(TINY, {"steps": 2, "model.hidden": (8,)})))
    with pytest.raises(TypeError, match="built"):
        runner.run(s, str(tmp_path / "out"), built=other)
    assert not (tmp_path / "out").exists()


def test_sweep_devices_argument_that_is_no_device_list_is_refused(tmp_path):
    """``sweep(..., devices=[])`` failed in a ``ZeroDivisionError``, a device listed twice in XLA's "Number of
    processed shards does not match the number of addressable devices", ``devices="cpu"`` in an ``AttributeError``.
    Refused naming the argument, nothing written."""
    import jax

    from quotient_sgd import runner
    from quotient_sgd.config import load_config, validate

    s = validate(load_config(TINY, {"steps": 2, "sweep.seed": (0,), "logging.plots": False}))
    for bad in ([], [jax.devices()[0]] * 2, "cpu"):
        with pytest.raises(ValueError, match=r"^sweep: devices=.* is not allowed; need a non-empty list of distinct "
                                             r"jax.Device objects"):
            runner.sweep(s, str(tmp_path / "out"), devices=bad)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("xdg", ["cache", "./cache", ""])
def test_compilation_cache_ignores_a_relative_xdg_cache_home(monkeypatch, xdg):
    """A relative ``XDG_CACHE_HOME`` (which the XDG base directory specification says to ignore) put the
    compilation cache under each command's working directory (``cache/quotient_sgd/jax`` beside the runs); it
    falls back to ``~/.cache`` as an unset one does.  An absolute one is used."""
    from quotient_sgd.cli import compilation_cache_dir

    monkeypatch.delenv("QSGD_COMPILATION_CACHE", raising=False)
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert compilation_cache_dir() == os.path.join("/home/someone", ".cache", "quotient_sgd", "jax")
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/me")
    assert compilation_cache_dir() == os.path.join("/var/cache/me", "quotient_sgd", "jax")


def test_a_batch_size_sweep_of_a_full_batch_config_says_how_to_run_it(tmp_path, monkeypatch, capsys):
    """``quotient-sgd sweep --config=configs/grokking.py --config.sweep.batch_size="(32,64)"`` (a full-batch
    config; here configs/tiny.py with data.batch_size = 0) was refused ("cannot sweep the batch size of a
    full-batch run") without saying what to do, and the override that does it, ``--config.data.batch_size=32``,
    was refused as "would have no effect".  The message names the override, and the override runs the sweep."""
    from types import SimpleNamespace

    import quotient_sgd.runner as runner_pkg
    from quotient_sgd.cli import main

    monkeypatch.chdir(tmp_path)
    got = []
    monkeypatch.setattr(runner_pkg, "sweep", lambda s, w, **k: got.append(s) or SimpleNamespace(
        num_members=1, wrote=True, wall_s=0.0))
    (tmp_path / "full.py").write_text("from quotient_sgd.config import load_config\n\n\ndef get_config():\n"
                                      f"    c = load_config({TINY!r})\n    c.data.batch_size = 0\n    return c\n")
    common = ["quotient-sgd", "sweep", "--config=full.py", "--config.sweep.batch_size=(8,32)",
              "--config.sweep.seed=(0,)", "--workdir=w"]
    assert main(common) == 2
    err = capsys.readouterr().err
    assert "config.sweep.batch_size = (8, 32): cannot sweep the batch size of a full-batch run (data.batch_size=0);" \
           " set data.batch_size to a batch size (e.g. --config.data.batch_size=32: the sweep's values replace it)" \
           in err, err
    assert main(common + ["--config.data.batch_size=32"]) == 0, capsys.readouterr().err
    assert got and got[0].data.batch_size == 32 and got[0].sweep.batch_size == (8, 32)
    assert os.listdir(tmp_path) == ["full.py"]


@pytest.mark.parametrize("override, message", [
    ({"optim.lr": "0.1"}, "config.optim.lr = '0.1': expected a float (as its value 0.05), got str"),
    ({"steps": 10.5}, "config.steps = 10.5: expected an int (as its value 200), got float"),
    ({"model.hidden": 32}, "config.model.hidden = 32: expected a tuple (as its value (16,)), got int"),
    ({"optim.lr.x": 1}, "config.optim.lr.x = 1: config.optim.lr is a float, not a section; set it as config.optim.lr"),
    ({"model": "mlp"}, "config.model = 'mlp': config.model is a section, not a value; override its keys"),
])
def test_load_config_overrides_of_the_wrong_kind_name_the_dotted_key(override, message):
    """``load_config(path, {"optim.lr": "0.1"})`` raised ml_collections' ``TypeError`` naming the last part only
    ("Could not override field 'lr' (reference). 0.1 is of original type <class 'str'> ..."), and
    ``{"optim.lr.x": 1}`` a bare "argument of type 'float' is not iterable".  Each is a ``ConfigError`` naming the
    dotted key, the value and what the key takes; overrides of the right kind still load."""
    from quotient_sgd.config import ConfigError, load_config, validate

    with pytest.raises(ConfigError) as e:
        load_config(TINY, override)
    assert str(e.value).startswith(message), str(e.value)
    s = validate(load_config(TINY, {"optim.lr": 0.2, "steps": 10, "model.hidden": [8], "model": {"name": "mlp"}}))
    assert (s.optim.lr, s.steps, s.model.name) == (0.2, 10, "mlp")


#: The configs in configs/ that are run configs (README: the others run with `python experiments/<name>.py`).
RUN_CONFIGS = ("digits_bn_cnn", "digits_cnn", "grokking", "quickstart", "tiny")


def test_the_run_configs_and_their_sweep_members_validate_and_build():
    """Every config file in configs/ that validates is one of the run configs the README names (the others are
    experiment configs), each builds (model, group, data, optimiser; nothing compiled), and each member of its
    sweep is itself a valid run config (what ``members/<i>/config.json`` records)."""
    import glob

    from quotient_sgd.config import ConfigError, load_config, validate
    from quotient_sgd.runner import build, sweep_members
    from quotient_sgd.runner._sweep import member_settings

    runs = []
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        try:
            s = validate(load_config(path))
        except ConfigError:
            continue
        runs.append(os.path.basename(path)[:-3])
        assert build(s).settings.model == s.model
        members = sweep_members(s)
        assert len(members) > 1, path  # (each ships a sweep)
        for i, m in enumerate(members):
            ms = member_settings(s, i, m)
            assert validate(ms.to_dict()) == ms and ms.name == f"{s.name}-{i:03d}" and not ms.sweep.axes()
    assert tuple(runs) == RUN_CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RUN_CONFIGS if n not in ("quickstart", "tiny")])
def test_every_run_config_runs_a_few_steps_and_reports(tmp_path, name):
    """The slow variant: each run config the other tests do not run (quickstart and tiny are) runs 2 steps with its
    own model, data, optimiser and observables (Hessian extremes included) through the command, writes every file
    of the run directory, and ``report`` redraws it."""
    env = _child_env()
    wd = tmp_path / "run"
    cmd = [sys.executable, "-m", "quotient_sgd.cli", "run", f"--config={os.path.join(ROOT, 'configs', name + '.py')}",
           "--config.steps=2", f"--workdir={wd}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for f in ("config.json", "trajectory.npz", "metrics.jsonl", "events.json", "run.json", "summary.md"):
        assert (wd / f).is_file(), f
    plots = sorted(os.listdir(wd / "plots"))
    assert len(plots) == 6 and all((wd / "plots" / f).stat().st_size > 1000 for f in plots), plots
    p = subprocess.run([sys.executable, "-m", "quotient_sgd.cli", "report", str(wd)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0 and "- steps: 2 of 2" in p.stdout, (p.stdout, p.stderr[-2000:])


def test_the_port_checked_is_the_one_the_coordinator_binds(monkeypatch):
    """Process 0 checks the port JAX's coordinator will bind: that of ``--coordinator_address``, or of
    ``JAX_COORDINATOR_BIND_ADDRESS`` when set (JAX binds there instead); other processes check nothing."""
    import socket
    from types import SimpleNamespace

    import jax

    from quotient_sgd.cli import _init_distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        fv = SimpleNamespace(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=0, distributed=False)
        assert f"port {port} is taken" in _init_distributed(fv) and not calls
        assert _init_distributed(SimpleNamespace(**{**vars(fv), "process_id": 1})) is None and len(calls) == 1
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            other = free.getsockname()[1]
        monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{other}")
        assert _init_distributed(fv) is None and len(calls) == 2
        monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}")
        monkeypatch.setattr(fv, "coordinator_address", f"127.0.0.1:{other}")
        assert f"port {port} is taken" in _init_distributed(fv) and len(calls) == 2
