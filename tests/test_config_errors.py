"""Every class of bad config fails on load with a message naming the key, the value and what is allowed --
before any compute, and without writing anything."""

import os

import pytest

from quotient_sgd.cli import main
from quotient_sgd.config import ConfigError, default_config, load_config, quickstart_path, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**over):
    c = load_config(quickstart_path())
    for k, v in over.items():
        node = c
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        with node.unlocked() if hasattr(node, "unlocked") else _null():
            node[parts[-1]] = v
    return c


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("over,needles", [
    ({"optim.lr": -0.1}, ["config.optim.lr", "-0.1", "> 0"]),
    ({"optim.lr": 0.0}, ["config.optim.lr", "0.0", "> 0"]),
    ({"data.batch_size": 5000}, ["config.data.batch_size", "5000", "larger than the training set", "1348"]),
    ({"steps": 0}, ["config.steps", "0", ">= 1"]),
    ({"symmetry.components": ("qk",)}, ["config.symmetry.components", "'qk'", "not a symmetry", "rescale"]),
    ({"observables.noise_every": 5}, ["config.observables.noise_every", "5", "per-example gradients",
                                      "per_example_grads=True"]),
    ({"optim.momentum": 1.5}, ["config.optim.momentum", "1.5", "[0, 1)"]),
    ({"model.name": "resnet"}, ["config.model.name", "'resnet'", "mlp"]),
    ({"sweep.lr": (0.1, -1.0)}, ["config.sweep.lr", "every value must be"]),
    ({"sweep.mode": "zip", "sweep.seed": (0, 1, 2)}, ["config.sweep.mode", "zip needs equally long lists"]),
])
def test_out_of_range_values(over, needles):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(**over))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def _tiny(**over):
    c = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return c


@pytest.mark.parametrize("over,needles", [
    # a deep linear stack whose GL chain is not minimal has no canonical representative (SymmetryError at compute)
    ({"model.name": "deep_linear", "model.hidden": (4, 4)},
     ["config.model.hidden = (4, 4)", "not minimal", "min(input, output) = 1", "'grad_norm_canonical'"]),
    ({"model.name": "deep_linear", "model.hidden": (4,), "observables.names": ("loss", "invariant_norms")},
     ["config.model.hidden = (4,)", "not minimal", "'invariant_norms'"]),
    ({"model.name": "deep_linear", "model.hidden": (2, 3), "data.dout": 4, "observables.names": ("loss",),
      "observables.hessian_every": 5}, ["config.model.hidden = (2, 3)", "observables.hessian_every = 5"]),
    ({"model.name": "deep_linear", "model.hidden": (4, 4), "observables.names": ("loss",),
      "symmetry.mode": "gauge_fix"}, ["config.model.hidden", "symmetry.mode = 'gauge_fix'"]),
    ({"model.name": "deep_linear", "model.hidden": (4, 4), "observables.names": ("loss", "curvature"),
      "symmetry.mode": "horizontal"}, ["config.model.hidden", "['curvature'] with symmetry.mode='horizontal'"]),
    # Lanczos: k extremes need k steps (ValueError at compute)
    ({"observables.hessian_every": 2, "observables.hessian_k": 5, "observables.lanczos_steps": 2},
     ["config.observables.hessian_k = 5", "<= observables.lanczos_steps = 2"]),
    # seeds are int32 inputs (OverflowError at compute)
    ({"seed": 2**31}, ["config.seed = 2147483648", "int32"]),
    ({"sweep.seed": (0, 2**40)}, ["config.sweep.seed = (0, 1099511627776)", "int32"]),
    ({"data.seed": -1}, ["config.data.seed = -1", "[0, 2147483647]"]),
    # empty splits
    ({"data.name": "digits", "data.test_fraction": 1e-5}, ["config.data.test_fraction = 1e-05", "0 test images",
                                                           "at least one example"]),
    ({"data.name": "modular_arithmetic", "data.p": 2, "data.train_fraction": 0.1, "data.batch_size": 1},
     ["config.data.train_fraction = 0.1", "0 training and 4 test pairs", "at least one example"]),
    ({"data.name": "modular_arithmetic", "data.p": 3, "data.train_fraction": 0.95, "data.batch_size": 1},
     ["config.data.train_fraction = 0.95", "9 training and 0 test pairs"]),
    # re-gauging without a continuous symmetry
    ({"init_gauge": 1.0, "model.activation": "tanh"}, ["config.init_gauge = 1.0", "have none", "'tanh'"]),
    ({"init_gauge": 1.0, "symmetry.components": ("permutation",)}, ["config.init_gauge = 1.0", "have none"]),
    ({"sweep.init_gauge": (0.0, 2.0), "symmetry.components": ("permutation",)},
     ["config.sweep.init_gauge = (0.0, 2.0)", "have none"]),
    # non-finite values
    ({"init_gauge": float("inf")}, ["config.init_gauge = inf", "finite"]),
    ({"init_gauge": float("nan")}, ["config.init_gauge = nan", "finite"]),
    ({"optim.weight_decay": float("inf")}, ["config.optim.weight_decay = inf", "finite"]),
    ({"optim.weight_decay": float("nan")}, ["config.optim.weight_decay = nan", "finite"]),
    ({"sweep.weight_decay": (0.0, float("inf"))}, ["config.sweep.weight_decay", "finite"]),
    # integer settings are int32 in the compiled programs (OverflowError there, after the run had started)
    ({"steps": 2**31}, ["config.steps = 2147483648", "must be <= 2147483647", "int32"]),
    ({"observables.every": 2**40}, ["config.observables.every = 1099511627776", "<= 2147483647"]),
    ({"checkpoint.every": 2**31}, ["config.checkpoint.every = 2147483648", "<= 2147483647"]),
    ({"model.hidden": (16, 2**31)}, ["config.model.hidden = (16, 2147483648)", "<= 2147483647"]),
    # an empty selection said "this mlp declares no symmetry" (it declares three) about another key
    ({"symmetry.components": ()}, ["config.symmetry.components = ()", "selects no component", "'rescale/layers.0'",
                                   "symmetry.enabled=False"]),
    ({"name": "  "}, ["config.name = '  '", "non-blank"]),
    # repeated sweep values: identical members
    ({"sweep.lr": (0.05, 0.05)}, ["config.sweep.lr = (0.05, 0.05)", "repeats [0.05]", "identical members"]),
    ({"sweep.seed": (3, 1, 3)}, ["config.sweep.seed = (3, 1, 3)", "repeats [3]"]),
    ({"sweep.mode": "zip", "sweep.seed": (0, 0), "sweep.lr": (0.1, 0.1)},
     ["config.sweep.mode = 'zip'", "repeat the member(s) [(0, 0.1)]"]),
])
def test_configs_that_would_fail_at_compute_are_refused(over, needles):
    with pytest.raises(ConfigError) as e:
        validate(_tiny(**over))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("over", [
    {"model.name": "deep_linear", "model.hidden": (1, 1)},                     # minimal: canonical section exists
    {"model.name": "deep_linear", "model.hidden": (4, 4), "data.dout": 4, "observables.hessian_every": 5},
    {"model.name": "deep_linear", "model.hidden": (4, 4), "observables.names": ("loss", "grad_norm", "charges"),
     "symmetry.mode": "horizontal"},                                           # nothing needs it
    {"model.name": "deep_linear", "model.hidden": (4, 2), "data.dout": 4, "symmetry.components": ("gl/layers.1",)},
    {"observables.hessian_every": 2, "observables.hessian_k": 2, "observables.lanczos_steps": 2},
    {"seed": 2**31 - 1, "sweep.seed": (-(2**31), 0)},
    {"init_gauge": 1.0, "model.activation": "tanh", "symmetry.components": ("all",), "data.name": "digits",
     "model.name": "cnn", "model.norm": "layer"},                              # tanh, but the norm's scale symmetry
    {"init_gauge": 0.0, "symmetry.components": ("permutation",)},
])
def test_neighbouring_configs_still_validate(over):
    validate(_tiny(**over))


@pytest.mark.parametrize("over,needles", [
    # data.p = 50000 asked for 10^15 bytes of one-hot inputs: the run died building them, or the machine swapped
    ({"data.name": "modular_arithmetic", "data.p": 50000},
     ["config.data.p = 50000", "2500000000 examples", "GiB to build", "use a smaller data.p", "p^3"]),
    ({"data.name": "modular_arithmetic", "data.p": 500},
     ["config.data.p = 500", "250000 examples", "2.79 GiB to build, more than this machine's 2 GiB"]),
    ({"data.name": "teacher_student", "data.n_train": 10**8},
     ["config.data.n_train = 100000000", "GiB to build"]),
    ({"data.name": "sparse_parity", "data.n_test": 10**8, "data.n_bits": 40},
     ["config.data.n_test = 100000000", "GiB to build"]),
    ({"data.name": "teacher_student", "data.n_train": 2**30, "data.n_test": 2**30, "data.din": 1},
     ["config.data.n_train = 1073741824", "2147483648 examples (train and test)", "at most 2147483647 are "
      "indexable"]),
])
def test_data_sets_larger_than_memory_are_refused(monkeypatch, over, needles):
    import quotient_sgd.config._validate as v

    big = over.get("data.n_test") == 2**30   # the int32 limit, on a machine with the memory for the data
    monkeypatch.setattr(v, "physical_memory", lambda: (2**50 if big else 2 * 2**30))   # else a 2 GiB machine
    with pytest.raises(ConfigError) as e:
        validate(_tiny(**over))
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    if over.get("data.p") == 500:   # the same on a machine with the memory for it, and smaller data on this one
        monkeypatch.setattr(v, "physical_memory", lambda: 4 * 2**30)
        validate(_tiny(**over))
        monkeypatch.setattr(v, "physical_memory", lambda: 2 * 2**30)
        validate(_tiny(**{**over, "data.p": 400}))
        validate(_tiny(**{**over, "data.p": 500, "model.name": "transformer"}))  # tokens: p^2, not p^3


def test_wrong_types():
    c = default_config()
    c.optim.lr = 0.1
    d = c.to_dict()
    d["optim"]["lr"] = "0.1"
    with pytest.raises(ConfigError, match=r"config\.optim\.lr = '0\.1': expected a float, got str"):
        validate(d)
    d = c.to_dict()
    d["steps"] = 10.5
    with pytest.raises(ConfigError, match=r"config\.steps = 10\.5: expected an int"):
        validate(d)
    d = c.to_dict()
    d["model"]["hidden"] = (32, "a")
    with pytest.raises(ConfigError, match=r"config\.model\.hidden\[1\] = 'a': expected an int"):
        validate(d)


def test_numpy_numbers_are_the_numbers_they_hold():
    """``config.sweep.seed = tuple(np.arange(4))`` (NumPy integers) and NumPy floats / booleans in a nested dict
    validate as the Python numbers they hold (``config.json`` stays plain JSON); a NumPy bool is still not an int."""
    import json

    import numpy as np

    s = validate(_tiny(**{"sweep.seed": tuple(np.arange(4)), "sweep.lr": tuple(np.float32([0.5, 0.25]))}))
    assert s.sweep.seed == (0, 1, 2, 3) and all(type(v) is int for v in s.sweep.seed)
    assert s.sweep.lr == (0.5, 0.25) and all(type(v) is float for v in s.sweep.lr)
    d = default_config().to_dict()
    d["steps"], d["optim"]["lr"], d["logging"]["plots"] = np.int64(7), np.float32(0.5), np.bool_(False)
    s = validate(d)
    assert (type(s.steps), type(s.optim.lr), s.logging.plots) == (int, float, False)
    json.dumps(s.to_dict())
    d["steps"] = np.bool_(True)
    with pytest.raises(ConfigError, match=r"config\.steps = .*expected an int, got bool"):
        validate(d)


def test_unknown_keys():
    d = default_config().to_dict()
    d["optim"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match=r"config\.optim\.lrr: unknown key \(did you mean 'lr'\?\)"):
        validate(d)
    d = default_config().to_dict()
    d["stepz"] = 3
    with pytest.raises(ConfigError, match=r"config\.stepz: unknown key \(did you mean 'steps'\?\)"):
        validate(d)


@pytest.mark.parametrize("args,needle", [
    (["--config.optim.lr=-1"], "config.optim.lr = -1.0: must be a finite number > 0"),
    (["--config.optim.lrr=1"], "config.optim.lrr = 1: unknown key (did you mean 'lr'?); allowed keys of "
                               "config.optim: ['b1', 'b2', 'clip_norm', 'eps', 'lr', 'momentum', 'name',"),
    (["--config.foo=1"], "config.foo = 1: unknown key; allowed top-level keys: ['checkpoint', 'data',"),
    (["--config.optim.foo", "2"], "config.optim.foo = 2: unknown key; allowed keys of config.optim: ["),
    (["--config.optim.lr.x=1"], "config.optim.lr.x = 1: config.optim.lr is a float, not a section"),
    (["--config.optim.lr=abc"], "config.optim.lr = 'abc': expected a float (could not convert string to float"),
    (["--config.symmetry.enabled=yes"], "config.symmetry.enabled = 'yes': expected a bool (True/False)"),
    (["--config.steps=1e3"], "config.steps = '1e3': expected an int"),
    (["--config.data.batch_size=100000"], "config.data.batch_size = 100000"),
    (["--config.steps=0"], "config.steps = 0: must be >= 1"),
    (["--config.symmetry.components=('gl',)"], "'gl' is not a symmetry"),
    (["--config.observables.noise_every=3"], "per-example gradients"),
    (["--config=does_not_exist.py"], "does_not_exist.py"),
    (["--config.model.name=deep_linear", "--config.model.hidden=(16,16)"], "config.model.hidden = (16, 16)"),
    (["--config.observables.hessian_k=30"], "config.observables.hessian_k = 30"),
    (["--config.seed=4294967296"], "config.seed = 4294967296"),
    (["--config.model.hidden=(4,x)"], "config.model.hidden = '(4,x)': expected a tuple of ints, got a string"),
    (["--config.observables.names=(loss,grad_norm)"], "config.observables.names = '(loss,grad_norm)': expected a "
     "tuple of strings, got a string that does not parse as one: quote each name, e.g. "
     "--config.observables.names=\"('loss', 'grad_norm')\""),
    (["--config.symmetry.components=(rescale)"], "quote each name, e.g. --config.symmetry.components=\"('rescale',)\""),
    (["--config.init_gauge=1.0", "--config.symmetry.components=('permutation',)"], "config.init_gauge = 1.0"),
])
def test_cli_bad_config_writes_nothing(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    wd = tmp_path / "runs" / "x"
    code = main(["quotient-sgd", "run", *args, f"--workdir={wd}"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err, err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("var,value", [("QSGD_NUM_PROCESSES", "abc"), ("QSGD_PROCESS_ID", "1.5")])
def test_cli_bad_environment_variable_is_named(tmp_path, monkeypatch, capsys, var, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(var, value)
    code = main(["quotient-sgd", "sweep", "--config.steps=10", f"--workdir={tmp_path / 'sw'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"environment variable {var}={value!r}: expected an integer" in err, err
    assert "override" not in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("cmd", ["run", "sweep"])
@pytest.mark.parametrize("sub", ["", "sub"])
def test_cli_workdir_that_is_a_file(tmp_path, monkeypatch, capsys, cmd, sub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    wd = tmp_path / "afile" / sub if sub else tmp_path / "afile"
    code = main(["quotient-sgd", cmd, "--config.steps=10", f"--workdir={wd}"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("exists and is not a directory" if not sub else "is not a directory") in err, err
    assert str(tmp_path / "afile") in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["afile"] and (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("cmd", ["run", "sweep"])
def test_cli_empty_workdir_is_refused(tmp_path, monkeypatch, capsys, cmd):
    """``--workdir=$RUNDIR`` with the variable unset ran into the default runs/<name> instead."""
    monkeypatch.chdir(tmp_path)
    code = main(["quotient-sgd", cmd, "--config.steps=10", "--workdir="])
    err = capsys.readouterr().err
    assert code == 2 and "--workdir is empty" in err and "runs/" in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("line,needle", [
    ('config.optim.lr = "0.1"', "config.optim.lr = '0.1' (in {path}, line 6): expected a float, got str"),
    ("config.logging.tensorboard = 1", "config.logging.tensorboard = 1 (in {path}, line 6): expected a bool"),
    ("config.optim = 0.1", "config.optim = 0.1 (in {path}, line 6): expected a section (ConfigDict), got float"),
    ("config.steps = 2.5", "config.steps = 2.5 (in {path}, line 6): expected an int, got float"),
])
def test_cli_wrong_type_in_config_file_names_the_dotted_key(tmp_path, monkeypatch, capsys, line, needle):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    path = cfg_dir / "wrong.py"
    path.write_text("from quotient_sgd.config import default_config\n\n\ndef get_config():\n"
                    "    config = default_config()\n"
                    f"    {line}\n"
                    "    return config\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["quotient-sgd", "run", f"--config={path}", f"--workdir={work / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle.format(path=path) in err, err
    assert "Traceback" not in err
    assert os.listdir(work) == []


def test_loaded_settings_are_frozen_and_typed():
    s = validate(load_config(quickstart_path()))
    assert isinstance(s.optim.lr, float) and isinstance(s.model.hidden, tuple)
    with pytest.raises(Exception):
        s.optim.lr = 1.0  # frozen
    assert validate(s.to_dict()) == s  # config.json round-trips


@pytest.mark.parametrize("overrides", [[], ["--config.steps=40", "--config.logging.progress=False"]])
def test_cli_experiment_config_is_named_as_not_a_run_config(tmp_path, monkeypatch, capsys, overrides):
    """An experiment's config (configs/catapult.py) given to `run`, with or without overrides of run keys it
    lacks: the error says the file is not a run config and where experiment configs run; nothing is written."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "catapult.py")
    monkeypatch.chdir(tmp_path)
    code = main(["quotient-sgd", "run", f"--config={path}", *overrides, f"--workdir={tmp_path / 'runs' / 'x'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "it is not a run config" in err and "python experiments/<name>.py" in err, err
    assert ("before any --config.* override" in err) == bool(overrides), err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["run", "--help"], ["sweep", "-h"], ["help"]])
def test_cli_help(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    assert main(["quotient-sgd", *args]) == 0
    out = capsys.readouterr().out
    assert "quotient-sgd run" in out and "--config.KEY=VALUE" in out and "--workdir=DIR" in out
    assert os.listdir(tmp_path) == []


def test_cli_version(capsys):
    from quotient_sgd import __version__

    assert main(["quotient-sgd", "--version"]) == 0
    assert capsys.readouterr().out.strip() == f"quotient-sgd {__version__}"


@pytest.mark.parametrize("overrides", [[], ["--config.steps=3"]])
def test_cli_config_file_without_get_config_or_py_suffix(tmp_path, monkeypatch, capsys, overrides):
    """A config file whose name does not end in .py loads like any other (ml_collections reads it; so does
    load_config); one that defines no get_config() is named as such, not as a 'bad config override among []',
    also in a process that loaded another config file before (whose get_config() was kept and run)."""
    monkeypatch.chdir(tmp_path)
    assert main(["quotient-sgd", "run", f"--config={os.path.join(ROOT, 'configs', 'tiny.py')}", "--config.steps=0",
                 "--workdir=r"]) == 2  # loads configs/tiny.py (and stops at validation)
    capsys.readouterr()
    (tmp_path / "notes.txt").write_text("x = 1\n")
    code = main(["quotient-sgd", "run", f"--config={tmp_path / 'notes.txt'}", *overrides, "--workdir=r"])
    err = capsys.readouterr().err
    assert code == 2
    assert "notes.txt' defines no get_config()" in err and "override among" not in err, err
    assert ("before any --config.* override" in err) == bool(overrides), err
    with open(os.path.join(ROOT, "configs", "tiny.py")) as f:
        (tmp_path / "tiny_config").write_text(f.read())
    assert validate(load_config(tmp_path / "tiny_config", {"steps": 3})).steps == 3
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "tiny_config"]


@pytest.mark.parametrize("cmd,args,env,needle", [
    ("sweep", ["--num_processes=2", "--process_id=0"], {}, "without a coordinator: each process would run the "
                                                           "whole sweep on its own into the same directory"),
    ("sweep", [], {"QSGD_NUM_PROCESSES": "2", "QSGD_PROCESS_ID": "1"}, "--num_processes = 2, --process_id = 1"),
    ("run", ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=0"], {},
     "--coordinator_address, --num_processes, --process_id: a run is one process"),
    ("run", ["--distributed"], {}, "--distributed: a run is one process"),
    ("sweep", ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"], {},
     "--process_id (or QSGD_PROCESS_ID) = 2: must be in [0, 1]"),
])
def test_cli_multi_host_options_that_would_be_ignored_are_refused(tmp_path, monkeypatch, capsys, cmd, args, env,
                                                                   needle):
    """Multi-host options that would be ignored (a process count without a coordinator: every process would run
    the whole sweep into one directory; any of them on a run) fail before anything starts, naming them."""
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code = main(["quotient-sgd", cmd, "--config.steps=10", *args, f"--workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("over", [
    {"steps": 2**31 - 1, "checkpoint.every": 2**31 - 1},
    {"sweep.mode": "zip", "sweep.seed": (0, 0), "sweep.lr": (0.02, 0.05)},   # distinct members
    {"symmetry.enabled": False, "symmetry.components": (), "observables.names": ("loss",)},
])
def test_more_neighbouring_configs_still_validate(over):
    validate(_tiny(**over))


@pytest.mark.parametrize("cfg", [[], None, "configs/tiny.py", 3])
def test_validate_needs_a_mapping(cfg):
    """A config.json holding a list validated as the default config (``dict([]) == {}``)."""
    with pytest.raises(ConfigError, match=r"config = .*: expected a ConfigDict or a dict of the run sections"):
        validate(cfg)


def _no_runner(monkeypatch):
    """Make reaching the runner (compute) a failure of the test rather than a long run."""
    import quotient_sgd.runner as runner_pkg

    def reached(settings, workdir, **kw):
        raise AssertionError("the command reached the runner")

    monkeypatch.setattr(runner_pkg, "run", reached)
    monkeypatch.setattr(runner_pkg, "sweep", reached)


@pytest.mark.parametrize("args,needle", [
    # overrides of keys the configured model / data / optimiser does not read had no effect
    (["--config.model.channels=(4,)"], "config.model.channels = (4,): this override would have no effect: only "
                                       "model.name in ['cnn'] reads it, and this config has model.name = 'mlp'"),
    (["--config.model.d_model=64"], "only model.name in ['transformer'] reads it"),
    (["--config.data.n_train=10"], "config.data.n_train = 10: this override would have no effect: only data.name in "
                                   "['teacher_student', 'sparse_parity'] reads it, and this config has data.name = "
                                   "'digits'"),
    (["--config.optim.b1=0.5"], "config.optim.b1 = 0.5: this override would have no effect: only optim.name in "
                                "['adam', 'adamw'] reads it"),
    (["--config.observables.hessian_every=0", "--config.observables.lanczos_steps=5"],
     "config.observables.lanczos_steps = 5: this override would have no effect: read only with "
     "observables.hessian_every > 0"),
    (["--config.symmetry.gauge_fix_every=5"], "read only with symmetry.mode='gauge_fix'"),
    (["--config.checkpoint.enabled=False", "--config.checkpoint.keep=5"], "config.checkpoint.keep = 5: this override "
                                                                          "would have no effect: not read with "
                                                                          "checkpoint.enabled=False"),
    (["--config.sweep.lr=(0.5,0.6)"], "config.sweep.lr = (0.5,0.6): this override would have no effect: the sweep "
                                      "section is read by `quotient-sgd sweep`"),
    (["--config.steps=3000000000"], "config.steps = 3000000000: must be <= 2147483647"),
])
def test_cli_override_without_effect_is_refused(tmp_path, monkeypatch, capsys, args, needle):
    _no_runner(monkeypatch)
    monkeypatch.chdir(tmp_path)
    code = main(["quotient-sgd", "run", *args, f"--workdir={tmp_path / 'runs' / 'x'}"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_cli_overrides_that_are_read_reach_the_runner(tmp_path, monkeypatch, capsys):
    """The neighbours of the refused overrides: the same keys with the model that reads them, and an emptied sweep
    axis on `run` (it asks for no sweep), reach the runner with the values given."""
    import quotient_sgd.runner as runner_pkg

    got = []
    monkeypatch.setattr(runner_pkg, "run", lambda settings, workdir, **kw: got.append(settings) or 1 / 0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZeroDivisionError):
        main(["quotient-sgd", "run", "--config.model.name=cnn", "--config.model.channels=(4,)",
              "--config.optim.name=adam", "--config.optim.b1=0.5", "--config.optim.momentum=0.0",
              "--config.sweep.lr=()", "--config.sweep.seed=()", f"--workdir={tmp_path / 'w'}"])
    assert got[0].model.channels == (4,) and got[0].optim.b1 == 0.5 and got[0].sweep.axes() == {}


@pytest.mark.parametrize("body,needle", [
    ("def get_config():\n    raise RuntimeError('boom')\n", "{path!r}, line 2: RuntimeError: boom"),
    ("def get_config(:\n    pass\n", "{path!r}, line 1: SyntaxError: invalid syntax"),
    ("import not_a_module_qsgd\n", "{path!r}, line 1: ModuleNotFoundError: No module named 'not_a_module_qsgd'"),
    ("def get_config():\n    pass\n", "{path!r}: get_config() returned None (NoneType), not a ConfigDict"),
    ("def get_config(scale):\n    pass\n", "{path!r}: get_config(scale) cannot be called without arguments"),
    (None, "config file {path!r} is a directory"),
    ("", "config file {path!r} does not exist"),
])
def test_cli_config_file_that_does_not_load(tmp_path, monkeypatch, capsys, body, needle):
    """A config file that raises (in its body or in get_config()), does not parse, returns no config, needs
    arguments, is a directory or is missing: exit status 2 and one line naming the file, what went wrong and
    where -- no traceback (an exception raised by get_config() escaped as one), nothing written."""
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    path = cfg_dir / "c.py"
    if body is None:
        path.mkdir()
    elif body:
        path.write_text(body)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _no_runner(monkeypatch)
    code = main(["quotient-sgd", "sweep", f"--config={path}", f"--workdir={work / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert needle.format(path=str(path)) in err and "Traceback" not in err, err
    assert os.listdir(work) == []


@pytest.mark.parametrize("cmd,record", [("report", "config.json"), ("report", "sweep.json"),
                                        ("run", "config.json"), ("sweep", "sweep.json")])
def test_cli_directory_with_a_corrupt_record(tmp_path, monkeypatch, capsys, cmd, record):
    """A run / sweep directory whose config.json or sweep.json does not parse (a truncated copy): `report`, and
    `run` / `sweep` on it as --workdir, name the file and stop (a JSONDecodeError traceback before); nothing in the
    directory changes."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    (d / record).write_text('{"name": "quickst')
    args = [str(d)] if cmd == "report" else ["--config.steps=10", f"--workdir={d}"]
    code = main(["quotient-sgd", cmd, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{d / record} is not valid JSON" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == ["d"] and os.listdir(d) == [record]


@pytest.mark.parametrize("extra,needle", [
    (["--config.logging.plots=False"], "--config.logging.plots: `report` takes only the run or sweep directory"),
    (["--config={tiny}"], "--config: `report` takes only"),
    (["--workdir={d}"], "--workdir: `report` takes only"),
])
def test_cli_report_refuses_run_options(tmp_path, monkeypatch, capsys, extra, needle):
    """`report DIR` with --config / --config.* / --workdir ignored them and redrew from DIR's config.json."""
    import json

    monkeypatch.chdir(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(validate(_tiny()).to_dict()))
    tiny = os.path.join(ROOT, "configs", "tiny.py")
    code = main(["quotient-sgd", "report", str(d), *[a.format(tiny=tiny, d=d) for a in extra]])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert os.listdir(tmp_path) == ["d"] and os.listdir(d) == ["config.json"]


@pytest.mark.parametrize("over,needle", [
    ({"model.name": "mpl"}, "config.model.name = 'mpl': allowed: ['mlp', 'cnn', 'transformer', 'meanfield', "
                            "'deep_linear'] (did you mean 'mlp'?)"),
    ({"optim.name": "Adam"}, "config.optim.name = 'Adam': allowed: ['sgd', 'adam', 'adamw'] (did you mean 'adam'?)"),
    ({"symmetry.mode": "horizonal"}, "(did you mean 'horizontal'?)"),
    ({"data.name": "teacher-student"}, "(did you mean 'teacher_student'?)"),
    ({"sweep.mode": "prodcut"}, "(did you mean 'product'?)"),
    ({"model.activation": "Tanh"}, "(did you mean 'tanh'?)"),
    ({"observables.names": ("loss", "grad_nrom")}, "unknown ['grad_nrom']; allowed: ['loss', "),
    ({"observables.names": ("loss", "grad_nrom")}, "(did you mean 'grad_nrom' -> 'grad_norm'?)"),
    ({"symmetry.components": ("rescal",)}, "'rescal' is not a symmetry of this mlp"),
    ({"symmetry.components": ("rescal",)}, "(did you mean 'rescale'?)"),
])
def test_misspelt_choices_are_suggested(over, needle):
    with pytest.raises(ConfigError) as e:
        validate(_tiny(**over))
    assert needle in str(e.value), str(e.value)


def test_unrelated_choice_gets_no_suggestion():
    with pytest.raises(ConfigError) as e:
        validate(_tiny(**{"model.name": "resnet"}))
    assert "did you mean" not in str(e.value), str(e.value)


def test_cli_help_says_where_the_keys_are_and_the_exit_statuses(capsys):
    import subprocess
    import sys

    assert main(["quotient-sgd", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Exit status: 0 done; 2 a bad config" in out and "130 interrupted" in out, out
    cmd = next(line for line in out.splitlines() if "default_config()" in line).split("python -c ", 1)[1]
    cmd = cmd.split(")\"", 1)[0] + ")\""
    code = cmd.strip().strip('"')
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "lr: 0.1" in res.stdout and "hidden:" in res.stdout, res.stderr[-2000:]
