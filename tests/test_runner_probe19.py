"""Configs, data, runs and sweeps on cases the other tests do not try: decays that float32 rounds to 1 (an Adam run
that validated and never moved its parameters), the runner's building blocks given an unvalidated config, a
teacher-student noise whose targets overflow float32, a tuple key given twice on the command line (ml_collections
joined the values), load_trajectory given a file, a recorded config.json given to --config, an override of a key the
config file's section dropped, the horizontal mode without a continuous symmetry and Nesterov without momentum (both
the plain run bit for bit), and unquoted names joined by commas."""

import os
import re

import numpy as np
import pytest

from quotient_sgd.config import ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _tiny(**over):
    return validate(load_config(TINY, {"logging.plots": False, **over}))


# ---- defect 1: a decay that float32 rounds to 1 ------------------------------------------------------------------
@pytest.mark.parametrize("over, key", [
    ({"optim.name": "adam", "optim.momentum": 0.0, "optim.b2": 0.99999999}, "optim.b2"),
    ({"optim.name": "adamw", "optim.momentum": 0.0, "optim.b1": 0.999999999}, "optim.b1"),
    ({"optim.momentum": 0.99999999}, "optim.momentum"),
    ({"sweep.momentum": (0.5, 0.99999999)}, "sweep.momentum"),
    ({"optim.clip_norm": 1e-50}, "optim.clip_norm"),
])
def test_a_decay_that_float32_rounds_to_one_is_refused(over, key):
    """``optim.b2 = 0.99999999`` validated as "in [0, 1)", but the programs take it as float32, where it is 1.0:
    Adam's bias correction ``1 - b2^t`` is 0 and every update of the run was 0 (the loss of the tiny config only
    moved with the batches; optax's update of a gradient (1, 2, -3) was exactly (0, 0, 0)).  ``b1`` so rounded made
    the updates infinite, ``momentum`` a trace that never decays, and a ``clip_norm`` of 1e-50 (0 in float32)
    clipped every update to nothing.  Each is refused naming the key; the largest float32 below 1 passes."""
    with pytest.raises(ConfigError, match=rf"config\.{key} = .*the programs compute in float32, where"):
        _tiny(**over)
    below = float(np.nextafter(np.float32(1), np.float32(0)))
    s = _tiny(**{"optim.name": "adam", "optim.momentum": 0.0, "optim.b1": below, "optim.b2": below})
    assert np.float32(s.optim.b2) < 1
    _tiny(**{"optim.momentum": below, "optim.clip_norm": 1e-30})


# ---- defect 2: the runner's building blocks given what is no validated config ---------------------------------
def test_the_runners_building_blocks_refuse_what_is_no_validated_config():
    """``quotient_sgd.runner.make_dataset(config)`` with the ``ConfigDict`` itself (not ``validate(config)``) read
    it without validation: a ``data.name`` that is no data set (``'mnist'``) silently gave the digits, and
    ``make_optimizer`` ran any unknown ``optim.name`` as Adam (also for ``Settings`` changed by ``replace``, which
    does not validate); ``sweep_members(config)`` failed in a bare ``AttributeError: 'axes'`` and
    ``init_params(settings, ...)`` in ``AttributeError: 'settings'``.  Each now names the function and what it
    takes."""
    from flax import nnx

    from quotient_sgd import runner

    cfg = load_config(TINY)
    cfg.data.name = "mnist"
    calls = {"make_dataset": lambda: runner.make_dataset(cfg),
             "make_model": lambda: runner.make_model(cfg, nnx.Rngs(0)),
             "make_optimizer": lambda: runner.make_optimizer(cfg, None),
             "sweep_members": lambda: runner.sweep_members(cfg), "init_params": lambda: runner.init_params(cfg, 0, 0.0)}
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"^{name}: (s must be a quotient_sgd.config.Settings|b must be the "
                                            r"Built)"):
            call()
    s = _tiny()
    with pytest.raises(TypeError, match="pass build"):
        runner.init_params(s, 0, 0.0)
    with pytest.raises(ValueError, match=r"config.data.name = 'mnist': unknown data set; allowed: \['teacher_student'"):
        runner.make_dataset(s.replace(**{"data.name": "mnist"}))
    with pytest.raises(ValueError, match=r"config.optim.name = 'rmsprop': unknown optimiser"):
        runner.make_optimizer(s.replace(**{"optim.name": "rmsprop"}), None)
    assert runner.make_dataset(s).name == "teacher_student" and len(runner.sweep_members(s)) == 8


# ---- defect 3: a teacher-student noise whose targets overflow float32 ------------------------------------------
def test_a_noise_whose_targets_overflow_float32_is_named(tmp_path, capsys):
    """``--config.data.noise=3e38`` on the tiny config validated ("a finite number >= 0") and ended the command in
    a traceback of ``make_dataset``: "y_train holds 99 value(s) that are not finite in float32", naming no key;
    ``teacher_student(noise=3e38)`` named ``y_train``, not its argument.  Now the generator names ``noise``, the
    command stops with a message naming ``data.name`` and the generator's reason, writing nothing, and a noise
    that is infinite in float32 (1e39) is refused by validation naming ``data.noise``."""
    from quotient_sgd import cli
    from quotient_sgd.data import teacher_student

    with pytest.raises(ValueError, match=r"^teacher_student: noise=3e\+38 is not allowed; need a noise whose targets"):
        teacher_student(noise=3e38)
    with pytest.raises(ConfigError, match=r"config\.data\.noise = 1e\+39: the programs compute in float32"):
        _tiny(**{"data.noise": 1e39})
    work = tmp_path / "run"
    code = cli.main(["quotient-sgd", "run", f"--config={TINY}", "--config.steps=2", "--config.data.noise=3e38",
                     f"--workdir={work}"])
    err = capsys.readouterr().err
    assert code == 2 and "config.data.name = 'teacher_student'" in err and "noise=3e+38 is not allowed" in err, err
    assert "Traceback" not in err and not work.exists()
    assert teacher_student(noise=1e30).num_train == 512


# ---- defect 4: a tuple key given twice on the command line -----------------------------------------------------
@pytest.mark.parametrize("args, key", [
    (["--config.model.hidden=(8,)", "--config.model.hidden=(4,)"], "model.hidden"),
    (["--config.sweep.lr=0.1", "-config.sweep.lr", "0.3"], "sweep.lr"),
])
def test_a_tuple_key_given_twice_is_refused(tmp_path, capsys, args, key):
    """The README says a key given twice takes its last value, but ``ml_collections`` joins the values of a
    repeated tuple flag: ``--config.model.hidden=(8,) --config.model.hidden=(4,)`` trained a 8-4 two-layer MLP
    (``config.json``: ``hidden = [8, 4]``), ``--config.sweep.lr=(0.1,) --config.sweep.lr=(0.3,0.5)`` swept
    (0.1, 0.3, 0.5).  Neither reading is safe to guess: the command refuses, naming the key and the values,
    writing nothing."""
    from quotient_sgd import cli

    work = tmp_path / "run"
    code = cli.main(["quotient-sgd", "run", f"--config={TINY}", "--config.steps=2", *args, f"--workdir={work}"])
    err = capsys.readouterr().err
    assert code == 2 and f"config.{key} is given 2 times" in err and "would join the values" in err, err
    assert not work.exists()


# ---- defect 5: load_trajectory given a file -----------------------------------------------------------------------
def test_load_trajectory_of_a_file_says_it_is_a_file(tmp_path):
    """``load_trajectory('runs/x/trajectory.npz')`` (the file for its directory, as ``np.load`` takes it) said
    "run_dir='runs/x/trajectory.npz' does not exist", and so did ``detect_run``; the file exists.  Now both say it
    is a file and name the directory holding it."""
    from quotient_sgd.diagnostics import detect_run
    from quotient_sgd.runner import load_trajectory

    f = tmp_path / "trajectory.npz"
    np.savez(f, step=np.arange(3), loss=np.ones(3))
    for call, name in ((load_trajectory, "load_trajectory"), (detect_run, "detect_run")):
        with pytest.raises(FileNotFoundError, match=rf"^{name}: run_dir=.* is a file, not a run directory; pass the "
                                                    rf"run directory \(the one holding it is '{tmp_path}'\)"):
            call(str(f))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trajectory(str(tmp_path / "missing"))


# ---- defect 6: a recorded config.json given to --config -----------------------------------------------------------
def test_a_recorded_config_json_given_as_the_config_file_is_named(tmp_path, capsys):
    """``quotient-sgd run --config=runs/x/config.json`` (a run's recorded config, to run it again) was imported as
    Python and refused as "cannot load the config file ..., line 8: NameError: name 'false' is not defined".  Now
    the message says the file is JSON, what ``--config`` takes and what reads a recorded config; nothing written."""
    import json

    from quotient_sgd import cli

    record = tmp_path / "config.json"
    record.write_text(json.dumps(_tiny(steps=2).to_dict(), indent=1))
    work = tmp_path / "run"
    code = cli.main(["quotient-sgd", "run", f"--config={record}", f"--workdir={work}"])
    err = capsys.readouterr().err
    assert code == 2 and "holds JSON (a run directory's config.json" in err and "NameError" not in err, err
    assert "quotient_sgd.config.from_dict" in err and not work.exists()


# ---- defect 7: an override of a key the config file's own section lacks -----------------------------------------
_PARTIAL = '''import sys
sys.path.append({configs!r})  # (appended: at the front it would shadow other modules for the rest of the process)
from tiny import get_config as base


def get_config():
    c = base()
    c.optim = {{"name": "sgd", "lr": 0.05}}
    del c["seed"]
    return c
'''


@pytest.mark.parametrize("arg, needle", [
    ("--config.optim.momentum=0.5", "config.optim.momentum: the config's section config.optim has no key 'momentum' "
                                    "(its keys: ['lr', 'name']), though the schema has one (default 0.0)"),
    ("--config.seed=3", "config.seed: the config has no key 'seed'"),
])
def test_an_override_of_a_key_the_config_file_dropped_is_named(tmp_path, capsys, arg, needle):
    """A config file replacing a section by a dict of its own (``config.optim = {"name": "sgd", "lr": 0.05}``) and
    the override ``--config.optim.momentum=0.5`` (a key of the schema) were refused as "bad config override among
    ['--config.steps=2', '--config.optim.momentum=0.5']: momentum" (``ml_collections``' bare ``KeyError``), and
    ``load_config(path, {"optim.momentum": 0.5})`` called it an unknown key.  Now both say that the file's section
    lacks the schema's key and how to keep it; nothing written."""
    from quotient_sgd import cli

    path = tmp_path / "partial.py"
    path.write_text(_PARTIAL.format(configs=os.path.dirname(TINY)))
    work = tmp_path / "run"
    code = cli.main(["quotient-sgd", "run", f"--config={path}", "--config.steps=2", arg, f"--workdir={work}"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err, err
    assert not work.exists()
    key, value = arg.removeprefix("--config.").split("=")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(str(path), {key: float(value)})


# ---- defect 8: the horizontal mode with no continuous symmetry selected ---------------------------------------------
@pytest.mark.parametrize("over", [
    {"model.activation": "tanh"},                      # a tanh MLP has its hidden permutations only
    {"symmetry.components": ("permutation",)},
])
def test_the_horizontal_mode_without_a_continuous_symmetry_is_refused(over):
    """``symmetry.mode='horizontal'`` on a tanh (or GELU) MLP, or with ``symmetry.components = ('permutation',)``,
    validated and ran: the projection off the orbits of no continuous symmetry is the identity, and the run was the
    ``observe`` run bit for bit (4 steps of the tiny config: every loss equal), recorded as 'horizontal'.  Now
    refused naming the mode and the selected components, as ``init_gauge`` is without a continuous component;
    ``gauge_fix`` (a canonical ordering of the permutations) stays allowed."""
    with pytest.raises(ConfigError, match=r"config\.symmetry\.mode = 'horizontal': projects the updates off the "
                                          r"orbits of the continuous symmetries, .* have none"):
        _tiny(**over, **{"symmetry.mode": "horizontal"})
    assert _tiny(**over, **{"symmetry.mode": "gauge_fix"}).symmetry.mode == "gauge_fix"
    assert _tiny(**{"symmetry.mode": "horizontal"}).symmetry.mode == "horizontal"


# ---- defect 9: unquoted names separated by commas -------------------------------------------------------------------
@pytest.mark.parametrize("key, value, tup", [
    ("observables.names", "loss,grad_norm", "('loss', 'grad_norm')"),
    ("symmetry.components", "rescale,permutation", "('rescale', 'permutation')"),
])
def test_unquoted_names_joined_by_commas_are_pointed_to_the_tuple(key, value, tup):
    """``--config.observables.names=loss,grad_norm`` (as ``--config.sweep.lr=0.1,0.3`` gives two numbers) is the one
    name ``'loss,grad_norm'`` (ml_collections splits no unquoted names), refused with the suggestion "did you mean
    'loss,grad_norm' -> 'grad_norm'?", which drops the loss.  Now the message says the value is one name holding
    commas and writes the tuple meant."""
    with pytest.raises(ConfigError) as e:
        _tiny(**{key: (value,)})
    assert f"is one name holding commas: quote each name of the tuple, e.g. --config.{key}=\"{tup}\"" in str(e.value)
    assert "did you mean" not in str(e.value)


# ---- defect 10: Nesterov without momentum ---------------------------------------------------------------------------
def test_nesterov_without_momentum_is_an_override_without_effect(tmp_path, capsys):
    """``--config.optim.nesterov=True`` with ``optim.momentum = 0`` ran, and its trajectory, events and observables
    were those of the run without it bit for bit (3 steps of the tiny config: every key's difference 0.0): the
    look-ahead along a trace that decays at once is the gradient.  Like the other overrides nothing reads, it is
    refused, saying what reads it; with momentum (or a sweep over momenta not all 0) it is read."""
    from quotient_sgd import cli
    from quotient_sgd.config import unused_keys

    work = tmp_path / "run"
    code = cli.main(["quotient-sgd", "run", f"--config={TINY}", "--config.steps=2", "--config.optim.momentum=0",
                     "--config.optim.nesterov=True", f"--workdir={work}"])
    err = capsys.readouterr().err
    assert code == 2 and "config.optim.nesterov = True: this override would have no effect" in err, err
    assert "optim.momentum = 0.0" in err and not work.exists()
    s = _tiny(**{"optim.momentum": 0.0, "sweep.momentum": (0.0, 0.5)})
    assert "optim.nesterov" in unused_keys(s, "run") and "optim.nesterov" not in unused_keys(s, "sweep")
    assert "sweep.momentum = (0.0,)" in unused_keys(s.replace(**{"sweep.momentum": (0.0,)}), "sweep")["optim.nesterov"]
    assert "optim.nesterov" not in unused_keys(_tiny(), "run")


# ---- defect 11: observables.every with the loss alone ---------------------------------------------------------------
def test_observables_every_with_the_loss_alone_is_an_override_without_effect(tmp_path, capsys):
    """With ``observables.names = ('loss',)`` the loss is recorded at every step whatever ``observables.every`` is
    (8 steps of the tiny config with every=1 and every=3, the Hessian extremes and the noise temperature on: every
    trajectory entry equal), yet ``--config.observables.every=5`` was taken, unlike the other keys nothing reads.
    Now refused before anything is written, naming the key and what reads it; the default given explicitly, and
    ``every`` beside an observable it refreshes, pass."""
    from quotient_sgd import cli
    from quotient_sgd.config import unused_keys

    work = tmp_path / "run"
    loss_only = "--config.observables.names=('loss',)"
    code = cli.main(["quotient-sgd", "run", f"--config={TINY}", "--config.steps=2", loss_only,
                     "--config.observables.every=5", f"--workdir={work}"])
    err = capsys.readouterr().err
    assert code == 2 and "config.observables.every = 5: this override would have no effect" in err, err
    assert "observables.names = ('loss',) records the loss alone" in err and not work.exists()
    s = _tiny(**{"observables.names": ("loss",)})
    argv = ["quotient-sgd", "run", f"--config={TINY}", loss_only, "--config.observables.every=1"]
    assert cli._unused_override_error(argv, s, "run") is None  # (the default asks for nothing)
    assert "observables.every" not in unused_keys(_tiny(**{"observables.names": ("loss", "grad_norm")}), "run")
    assert "observables.every" not in unused_keys(_tiny(**{"observables.names": ()}), "run")  # (the defaults)


# ---- defect 12: "1 steps" and "symmetry: all" in the summary of a one-step run of a model without symmetry -------
def test_a_one_step_run_of_a_model_without_symmetry_is_summarised_as_such(tmp_path, capsys):
    """A one-step run printed "quotient-sgd: 1 steps; wrote ..." and an MLP without hidden layers (no symmetry, the
    run has no group) was summarised as "symmetry: all (mode observe)".  Now "1 step" and "symmetry: none (this mlp
    declares no symmetry, ...)"; a model with a symmetry keeps its components and mode."""
    from quotient_sgd import cli

    work = tmp_path / "run"
    code = cli.main(["quotient-sgd", "run", f"--config={TINY}", "--config.steps=1", "--config.model.hidden=()",
                     "--config.observables.names=()", "--config.sweep.lr=()", "--config.sweep.seed=()",
                     f"--workdir={work}"])
    out = capsys.readouterr().out
    assert code == 0 and "quotient-sgd: 1 step; wrote" in out, out
    text = (work / "summary.md").read_text()
    assert "- steps: 1 of 1\n" in text and "- symmetry: none (this mlp declares no symmetry" in text, text
    assert "all (mode" not in text
    from quotient_sgd.runner._report import _symmetry_text, last_evaluation_text

    assert _symmetry_text(_tiny()) == "all (mode observe)"
    assert _symmetry_text(_tiny(**{"symmetry.enabled": False, "observables.names": ("loss",)})) == "off (mode observe)"
    assert last_evaluation_text({"step": 0}, 0, 1, None) == "last evaluation (step 0; 0 of 1 step recorded)"


# ---- defect 13: the gradient-noise temperature of a full-batch run --------------------------------------------------
@pytest.mark.parametrize("over, what", [
    ({"data.batch_size": 0}, "data.batch_size = 0 (0: full batch, all 128 training examples)"),
    ({"data.batch_size": 128}, "data.batch_size = 128 (the whole training set, all 128 training examples)"),
])
def test_the_noise_temperature_of_a_full_batch_run_is_refused(over, what):
    """``T = eta sigma^2 / (2B)`` is the temperature of SGD's mini-batch noise (THEORY section 3); a full-batch run
    (``data.batch_size = 0`` or the whole training set: the runner's batches hold distinct examples) takes plain
    gradient-descent steps without gradient noise, yet ``observables.noise_every`` was taken there and recorded a
    nonzero temperature and viscosity (the per-example spread divided by 2N).  Now refused naming both keys; a
    mini-batch passes, and a recorded config is still read (a run made before the check can be reported)."""
    noise = {"observables.noise_every": 1, "observables.per_example_grads": True}
    with pytest.raises(ConfigError) as e:
        _tiny(**noise, **over)
    msg = str(e.value)
    assert msg.startswith("config.observables.noise_every = 1: the gradient-noise temperature") and what in msg, msg
    assert "data.batch_size in [2, 127]" in msg and "observables.noise_every=0" in msg, msg
    assert _tiny(**noise, **{"data.batch_size": 127}).observables.noise_every == 1
    validate(load_config(TINY, {**noise, **over}), check_memory=False)
