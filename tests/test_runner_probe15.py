"""Probe 15: configs, experiments and resume: model constructor errors that escaped validation, integer keys
given floats in tuples, experiment results that did not record their config and were overwritten, experiment
values that were not range-checked, and metric rows lost before the newest checkpoint."""

import json
import os
import re

import numpy as np
import pytest

from quotient_sgd.config import ConfigError, default_config, load_config, validate

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "configs", "tiny.py")


# ---- defect 1: a model constructor's ValueError escaped validate ----------------------------------------------
@pytest.mark.parametrize("changes, key, value", [
    ({"model.name": "transformer", "data.name": "modular_arithmetic", "model.d_model": 1, "model.num_heads": 1},
     "model.d_model", "1"),
    ({"model.name": "transformer", "data.name": "modular_arithmetic", "model.d_model": 2, "model.num_heads": 1},
     "model.d_model", "2"),
    ({"model.name": "cnn", "data.name": "digits", "model.norm": "layer", "model.channels": (4, 1)},
     "model.channels", "(4, 1)"),
    ({"model.name": "cnn", "data.name": "digits", "model.norm": "layer", "model.channels": (2, 4)},
     "model.channels", "(2, 4)"),
])
def test_settings_a_model_refuses_are_config_errors(changes, key, value):
    """A Transformer with ``model.d_model = 1`` and a CNN with ``model.norm = 'layer'`` over a one-channel layer
    (and, since a LayerNorm over two features passes only a sign, ``d_model = 2`` and two-channel layers) were
    refused during ``validate`` by the model's constructor, in a ``ValueError`` ("Transformer: d_model must
    be >= 2") that named no config key; they are ConfigErrors naming the key, the value and what is allowed."""
    cfg = default_config()
    for k, v in changes.items():
        sect, name = k.split(".")
        cfg[sect][name] = v
    with pytest.raises(ConfigError, match=rf"config\.{re.escape(key)} = {re.escape(value)}(?s:.*)(>= 3|at least 3)"):
        validate(cfg)


def test_a_model_constructor_error_validation_did_not_foresee_is_a_config_error(monkeypatch):
    """Any other ``ValueError`` of a model constructor met while validation builds the model abstractly is a
    ConfigError naming ``model.name`` and the model's own reason."""
    from quotient_sgd.runner import _build

    def refuse(s, rngs):
        raise ValueError("MLP: something about the widths")

    monkeypatch.setattr(_build, "make_model", refuse)
    cfg = default_config()
    cfg.model.hidden = (13, 7)  # (settings no earlier test built: the abstract model is cached per settings)
    with pytest.raises(ConfigError, match=r"config\.model\.name = 'mlp'.*MLP: something about the widths"):
        validate(cfg)


# ---- defect 5: an integer sweep axis given floats ---------------------------------------------------------------
@pytest.mark.parametrize("key, value", [("sweep.seed", (1.0,)), ("sweep.batch_size", (8, 16.0)), ("steps", 10.0),
                                        ("model.hidden", (np.float64(8.0),))])
def test_a_float_for_an_integer_key_is_refused_in_tuples_as_in_scalars(key, value):
    """``--config.seed=1.0`` is refused ("expected an int") while ``--config.sweep.seed="(1.0,)"`` was read as
    ``(1,)``: a float for an integer key (or an element of an integer tuple) is refused, whole or not, naming the
    key and the element; integers (NumPy's too) are still read."""
    cfg = load_config(TINY)
    d = cfg.to_dict()
    sect, _, name = key.rpartition(".")
    (d[sect] if sect else d)[name] = value
    with pytest.raises(ConfigError, match=r"expected an int, got float"):
        validate(d)
    (d[sect] if sect else d)[name] = (tuple(int(v) for v in value) if isinstance(value, tuple) else int(value))
    validate(d)


def test_a_float_sweep_seed_on_the_command_line_is_refused(tmp_path, capsys):
    from quotient_sgd.cli import main

    wd = tmp_path / "sw"
    assert main(["quotient-sgd", "sweep", f"--config={TINY}", "--config.sweep.seed=(1.0,)", f"--workdir={wd}"]) == 2
    assert "config.sweep.seed[0] = 1.0: expected an int" in capsys.readouterr().err
    assert not wd.exists()


# ---- defect 3: experiment values were not range-checked --------------------------------------------------------
def _experiments():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import _common as C

    return C


@pytest.mark.parametrize("name, argv, needles", [
    ("catapult", ["width=-3"], ["width=-3", "an integer >= 1"]),
    ("catapult", ["num_steps=0"], ["num_steps=0", "an integer >= 1"]),
    ("normalised_cnn", ["norm=foo"], ["norm='foo'", "'layer'"]),
    ("normalised_cnn", ["channels=[8, 1]"], ["channels=[8, 1]", ">= 3 with norm='layer'"]),
    ("normalised_cnn", ["channels=[2, 16]"], ["channels=[2, 16]", ">= 3 with norm='layer'"]),
    ("grokking", ["num_heads=3"], ["num_heads=3", "divisor of d_model = 64"]),
    ("grokking", ["train_fraction=1.5"], ["train_fraction=1.5", "(0, 1)"]),
    ("hj_slices", ["checkpoints=[100, 25]"], ["checkpoints=[100, 25]", "increasing order"]),
    ("hj_slices", ['model=["hidden=[0]"]'], ["hidden=[0]", "widths >= 1"]),
    ("shock_lr", ["problem.width=0"], ["problem.width=0", "an integer >= 1"]),
    ("shock_lr", ["seeds=[]"], ["seeds=[]", "non-empty list of distinct integers"]),
    ("catapult", ["spike_factor=0.5"], ["spike_factor=0.5", "> 1"]),
])
def test_experiment_values_out_of_range_are_refused_when_the_overrides_are_applied(name, argv, needles):
    """``python experiments/<name>.py width=-3`` (or ``num_steps=0``, ``norm=foo``, a head count that does not
    divide ``d_model``) was accepted and failed later in a model or a data set, or ran (``checkpoints=[100, 25]``
    took the slice labelled 25 at step 100); each stops the script naming the key, the value and what is allowed,
    while the defaults of every scale load."""
    C = _experiments()
    with pytest.raises(SystemExit) as exc:
        cfg = C.load_config(name, argv)
        if name == "hj_slices":  # (the trained MLP's overrides are read as experiment 1's config)
            C.load_config("edge_of_stability", list(cfg.model))
    msg = str(exc.value)
    assert all(n in msg for n in needles), msg
    for scale in C.SCALES:
        C.load_config(name, [f"scale={scale}"])


# ---- defect 2: experiment results recorded no config and were overwritten silently ----------------------------
def test_experiment_results_record_their_config_and_another_config_does_not_overwrite_them(tmp_path, monkeypatch):
    """``results/<name>/result.json`` did not say which config and overrides produced it, and a run with
    ``seed=3`` replaced the seed-0 results without a word.  ``result.json`` records the resolved config and the
    overrides; a run of another config is stopped when it loads its config (before any compute) and at ``save``,
    unless ``overwrite=true``; the same config run again replaces its results."""
    C = _experiments()
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path))
    monkeypatch.setattr(C, "_LOADED", {})
    d = tmp_path / "catapult"

    def run(argv, loss):
        cfg = C.load_config("catapult", argv, results=True)
        C.save("catapult", {"loss": np.asarray([loss])}, [], [{"final loss": loss}])
        return cfg

    cfg = run(["scale=test", "eta_lambda0=2.5"], 1.0)
    res = json.loads((d / "result.json").read_text())
    assert res["overrides"] == {"scale": "test", "eta_lambda0": "2.5"}
    assert res["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert res["config"]["eta_lambda0"] == 2.5 and res["config"]["width"] == 256  # (the test scale's width)
    with pytest.raises(SystemExit, match=r"another config \(seed: 0 -> 3\).*overwrite=true"):
        C.load_config("catapult", ["scale=test", "eta_lambda0=2.5", "seed=3"], results=True)
    with pytest.raises(SystemExit, match="another config"):  # (save checks again)
        C.save("catapult", {"loss": np.asarray([9.0])}, [], [{"final loss": 9.0}])
    assert json.loads((d / "result.json").read_text())["table"] == [{"final loss": 1.0}]
    run(["eta_lambda0=2.5", "scale=test"], 2.0)  # the same config: its results are replaced
    assert json.loads((d / "result.json").read_text())["table"] == [{"final loss": 2.0}]
    run(["scale=test", "seed=3", "overwrite=true"], 3.0)
    res = json.loads((d / "result.json").read_text())
    assert (res["table"], res["config"]["seed"], res["overrides"]) == ([{"final loss": 3.0}], 3,
                                                                        {"scale": "test", "seed": "3"})
    (d / "result.json").write_text(json.dumps({"table": []}))  # (results of a version that recorded no config)
    with pytest.raises(SystemExit, match="record no config"):
        C.load_config("catapult", ["scale=test", "seed=3"], results=True)
    with pytest.raises(SystemExit, match="overwrite='maybe'"):
        C.load_config("catapult", ["overwrite=maybe"], results=True)


# ---- defect 4: metric rows lost before the newest checkpoint ---------------------------------------------------
def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_resume_writes_again_metric_rows_lost_before_the_newest_checkpoint(tmp_path):
    """A ``metrics.jsonl`` row before the newest checkpoint cut or deleted (step 19 with checkpoint 20: a hand
    edit, a faulty file system) was dropped by a resume without a word.  A lost chunk-end row (it holds the
    chunk's evaluation) is computed again from a kept checkpoint of its chunk's start; other lost rows are
    rewritten from the trajectory parts; the rows then equal an uninterrupted run's, each once, with a warning
    naming the steps.  Where no checkpoint of the chunk's start is kept, the chunk end's evaluation is computed
    again from the kept checkpoint of its end (tests/test_runner_probe16.py: or by a replay from the initial
    state)."""
    from quotient_sgd.runner import run

    s = validate(load_config(TINY, {"steps": 30, "logging.plots": False}))
    run(s, str(tmp_path / "ref"))
    ref = _rows(tmp_path / "ref" / "metrics.jsonl")
    ref_traj = np.load(tmp_path / "ref" / "trajectory.npz")

    wd = tmp_path / "cut"
    run(s, str(wd), max_chunks=2)
    m = wd / "metrics.jsonl"
    m.write_bytes(m.read_bytes()[:-7])  # (the row of step 19, the second chunk's end, cut)
    with pytest.warns(RuntimeWarning, match=r"lacks the rows of steps \[19\] before the checkpoint of step 20.*"
                                            r"resuming from step 10"):
        run(s, str(wd))
    assert _rows(m) == ref
    traj = np.load(wd / "trajectory.npz")
    assert all(np.array_equal(traj[k], ref_traj[k], equal_nan=True) for k in ref_traj.files)

    s1 = validate(load_config(TINY, {"steps": 30, "logging.plots": False, "checkpoint.keep": 1}))
    wd = tmp_path / "keep1"
    run(s1, str(wd), max_chunks=2)
    m = wd / "metrics.jsonl"
    m.write_text("".join(line for line in m.read_text().splitlines(True) if json.loads(line)["step"] not in (5, 19)))
    with pytest.warns(RuntimeWarning, match=r"steps \[5, 19\].*rewrote the rows of steps \[5, 19\] from the "
                                            r"trajectory parts, with the evaluation \(test_loss, ...\) of steps "
                                            r"\[19\] computed again"):
        run(s1, str(wd))
    assert _rows(m) == ref
    assert "test_loss" in ref[[e["step"] for e in ref].index(19)]


def test_sweep_resume_rewrites_a_members_lost_metric_rows_from_its_trajectory_parts(tmp_path):
    """The same for a sweep member: a row of ``members/001/metrics.jsonl`` before the sweep's checkpoint deleted
    was dropped by the resume without a word; it is rewritten from the member's trajectory parts, equal to the
    row that was lost, once, with a warning naming the member's file and the step."""
    from quotient_sgd.runner import sweep

    s = validate(load_config(TINY, {"steps": 30, "logging.plots": False, "sweep.seed": (0, 1), "sweep.lr": ()}))
    wd = tmp_path / "sw"
    sweep(s, str(wd), max_chunks=2)
    m = wd / "members" / "001" / "metrics.jsonl"
    before = _rows(m)
    m.write_text("".join(line for line in m.read_text().splitlines(True) if json.loads(line)["step"] != 15))
    with pytest.warns(RuntimeWarning, match=r"001/metrics\.jsonl lacks the rows of steps \[15\].*rewrote"):
        sweep(s, str(wd))
    after = _rows(m)
    assert [r["step"] for r in after] == [0, 5, 9, 10, 15, 19, 20, 25, 29]
    assert after[:len(before)] == before
