"""Runs, sweeps and the CLI on what a finished run directory may lose or be given: the ``trajectory_parts/`` of a
finished run or sweep member removed (it duplicates ``trajectory.npz``) before the same command is run again;
overrides of observable settings that nothing in the run reads."""

import os
import shutil

import jax
import numpy as np
import pytest

from helpers import load_trajectory, sweep_records, tiny_settings
from quotient_sgd.config import load_config, unused_keys, validate
from quotient_sgd.runner import report, run, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---- defect 1: a finished run run again rebuilt trajectory.npz from its parts ------------------------------------
def test_a_finished_run_run_again_keeps_its_trajectory_without_its_parts(tmp_path):
    """A finished run (or sweep member) run again computes nothing and "keeps" its outputs, but its
    ``trajectory.npz`` was deleted and assembled again from ``trajectory_parts/``: with the parts removed (they
    duplicate the finished trajectory) the 20-step trajectory became an empty file, the summary said "steps: 0 of
    20" and the sweep table "unfinished (0 of 20 steps)".  Now the file is kept as it is."""
    s = tiny_settings(10)
    wd = str(tmp_path / "run")
    run(s, wd)
    want = load_trajectory(wd)
    shutil.rmtree(os.path.join(wd, "trajectory_parts"))
    res = run(s, wd)
    assert res.steps_done == 10
    _same(load_trajectory(wd), want)
    assert "- steps: 10 of 10" in report(wd)

    sw = sweep(tiny_settings(10, **{"sweep.seed": (0, 1), "sweep.lr": (0.05,)}), str(tmp_path / "sw"),
               devices=jax.devices()[:1])
    wants = [load_trajectory(d) for d in sw.member_dirs]
    for d in sw.member_dirs:
        shutil.rmtree(os.path.join(d, "trajectory_parts"))
    again = sweep(tiny_settings(10, **{"sweep.seed": (0, 1), "sweep.lr": (0.05,)}), str(tmp_path / "sw"),
                  devices=jax.devices()[:1])
    for d, w in zip(again.member_dirs, wants):
        _same(load_trajectory(d), w)
    with open(os.path.join(sw.workdir, "summary.md")) as f:
        table = f.read()
    assert table.count("| ok |") == 2 and "unfinished" not in table, table


# ---- defect 2: overrides of observables the run does not compute were taken silently ---------------------------
@pytest.mark.parametrize("args, key, reader", [
    (["--config.observables.per_example_grads=True"], "observables.per_example_grads", "observables.noise_every"),
    (["--config.symmetry.enabled=False", "--config.observables.names=()", "--config.observables.every=5"],
     "observables.every", "symmetry.enabled=False"),
    (["--config.model.hidden=()", "--config.observables.names=()", "--config.observables.every=5"],
     "observables.every", "no symmetry component"),
])
def test_an_override_of_an_observable_setting_nothing_reads_is_refused(tmp_path, capsys, args, key, reader):
    """``observables.per_example_grads`` is read only by the gradient-noise temperature, and ``observables.every``
    only by the quotient observables of a symmetry group: an override of either in a run without them ran, and did
    nothing (no per-example gradient was taken, every step recorded the loss alone).  As for the other keys a run
    does not read, it is refused before anything is written, naming the key and the setting that would read it; the
    same override beside the setting that reads it passes the check."""
    from quotient_sgd.cli import main

    wd = str(tmp_path / "out")
    assert main(["quotient-sgd", "run", f"--config={TINY}", f"--workdir={wd}", *args]) == 2
    err = capsys.readouterr().err
    assert f"config.{key} = " in err and "would have no effect" in err and reader in err, err
    assert not os.path.exists(wd)
    s = validate(load_config(TINY, {"observables.per_example_grads": True, "observables.noise_every": 5}))
    assert "observables.per_example_grads" not in unused_keys(s, "run")
    assert "observables.every" not in unused_keys(validate(load_config(TINY)), "run")


# ---- defect 3: NumPy scalars assigned to a config's number and bool keys were refused ---------------------------
def test_numpy_scalars_set_in_a_config_or_given_as_overrides_are_the_values_they_hold(tmp_path):
    """``validate`` reads a NumPy scalar as the value it holds, but the ``ConfigDict`` before it refused one:
    ``load_config(path, {"data.batch_size": np.int64(32)})`` (a value of ``np.arange``) raised "expected an int
    (as its value 16), got int64", ``np.float32`` learning rates "expected a float", and ``np.bool_(False)`` for
    ``logging.plots`` "expected a bool (as its value True), got bool"; so did a config file writing them, on
    ``default_config()`` or on a plain ``ml_collections.ConfigDict``.  Now they are the Python values they hold
    (``config.json`` stays plain JSON); a bool for a number, a number for a bool, and a float for an int are still
    refused."""
    import json

    from quotient_sgd.config import ConfigError, default_config

    over = {"data.batch_size": np.arange(40)[32], "optim.lr": np.float32(0.25), "optim.momentum": np.float64(0.5),
            "logging.plots": np.bool_(False), "steps": np.int32(30), "init_gauge": np.int16(1)}
    s = validate(load_config(TINY, over))
    got = (s.data.batch_size, s.optim.lr, s.optim.momentum, s.logging.plots, s.steps, s.init_gauge)
    assert got == (32, float(np.float32(0.25)), 0.5, False, 30, 1.0), got
    assert [type(v) for v in got] == [int, float, float, bool, int, float]
    json.dumps(s.to_dict())
    for bad in ({"optim.lr": np.bool_(True)}, {"logging.plots": np.int64(0)}, {"steps": np.float64(30.0)}):
        with pytest.raises(ConfigError, match=rf"config\.{next(iter(bad))} = "):
            load_config(TINY, bad)
    cfg = tmp_path / "np_config.py"
    cfg.write_text("import numpy as np\nimport ml_collections\nfrom quotient_sgd.config import default_config\n\n\n"
                   "def get_config():\n    c = default_config()\n    c.steps = np.int64(12)\n"
                   "    c.optim.lr = np.float32(0.5)\n    c.logging.plots = np.bool_(False)\n"
                   "    d = ml_collections.ConfigDict(c.to_dict())\n    d.data.seed = np.uint8(3)\n    return d\n")
    s = validate(load_config(str(cfg)))
    assert (s.steps, s.optim.lr, s.logging.plots, s.data.seed) == (12, 0.5, False, 3)
    c = default_config()
    c.seed = np.int64(-4)
    with pytest.raises(TypeError, match="bool"):
        c.optim.lr = np.bool_(True)
    assert c.seed == -4 and type(c.seed) is int


# ---- defect 4: the experiment scripts' key=value overrides ------------------------------------------------------
@pytest.mark.parametrize("name, argv, needles", [
    ("catapult", ["scale=papr"], ["scale='papr'", "['cpu', 'test', 'paper']", "did you mean 'paper'"]),
    ("catapult", ["foo.bar=1"], ["unknown config key 'foo.bar'", "eta_lambda0"]),
    ("catapult", ["seed.x=1"], ["'seed.x'", "'seed' is int 0, not a section"]),
    ("shock_lr", ["problem.widht=64"], ["unknown config key 'problem.widht'", "did you mean 'problem.width'"]),
    ("shock_lr", ["problem=3"], ["'problem' is a section", "problem.drop_factor=VALUE"]),
    ("shock_lr", ["problem.scale=paper"], ["problem.scale='paper'", "set with scale=..."]),
    ("hj_slices", ["checkpoints=5"], ["checkpoints='5'", "a JSON list is needed", "checkpoints=[0, 25, 100, 300]"]),
    ("hj_slices", ["checkpoints=[0, 1.5]"], ["checkpoints='[0, 1.5]'", "element 1.5 is not an int"]),
    ("hj_slices", ['extents=["a"]'], ["element 'a' is not a number"]),
])
def test_experiment_overrides_that_are_no_values_of_the_config_are_named(name, argv, needles):
    """``python experiments/<name>.py key=value``: ``scale=papr`` ran the CPU default while recording ``scale =
    'papr'``; an unknown section (``foo.bar=1``) or a key below a number (``seed.x=1``) failed in a bare
    ``KeyError`` / ``TypeError``, as did a number for a tuple (``checkpoints=5``); list elements of another type
    than the default's (``checkpoints=[0, 1.5]``: GD steps) were taken, and ``problem.scale=paper`` relabelled the
    nested problem of ``shock_lr`` without changing its sizes.  Each now stops the script with a message
    naming the key, the value and what is allowed; overrides that fit still apply, nested ones included."""
    import sys

    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import _common as C

    with pytest.raises(SystemExit) as exc:
        C.load_config(name, argv)
    msg = str(exc.value)
    assert all(n in msg for n in needles), msg
    cfg = C.load_config("hj_slices", ["scale=test", "extents=[1, 0.5]", 'model=["hidden=[8]"]'])
    assert (cfg.scale, cfg.extents, cfg.model) == ("test", (1.0, 0.5), ("hidden=[8]",))
    assert type(cfg.extents[0]) is float
    assert C.load_config("shock_lr", ["problem.width=64"]).problem.width == 64


# ---- defect 5: a workdir that is no path ---------------------------------------------------------------------
def test_a_workdir_that_is_no_path_is_named(tmp_path, monkeypatch):
    """``run(settings, None)`` (or ``sweep``, ``report``, ``load_trajectory`` given ``None``) failed in a bare
    "stat: path should be string, bytes, os.PathLike or integer, not NoneType" or "expected str, bytes or
    os.PathLike object", and an integer was looked up as a file descriptor; each is now a ``TypeError`` naming the
    function, its argument and the value, before anything is written."""
    from quotient_sgd.runner import load_trajectory

    monkeypatch.chdir(tmp_path)
    s = tiny_settings(10)
    calls = [("run", lambda w: run(s, w), "workdir"), ("sweep", lambda w: sweep(s, w), "workdir"),
             ("report", report, "workdir"), ("load_trajectory", load_trajectory, "run_dir")]
    for name, call, arg in calls:
        for bad in (None, 3, 2.5):
            with pytest.raises(TypeError, match=rf"^{name}: {arg}={bad!r} is not a directory path; need a str or "
                                                rf"os\.PathLike"):
                call(bad)
    assert os.listdir(tmp_path) == []


# ---- defect 6: a finished run without its trajectory.npz was reported as unfinished -----------------------------
def test_a_finished_run_read_from_its_parts_is_not_called_unfinished(tmp_path):
    """``load_trajectory`` (and the summary ``report`` draws from it) of a finished run whose ``trajectory.npz``
    was removed read the parts and said "no trajectory.npz: an unfinished or killed run" beside "final (step 9)",
    and without checkpoints "1 part(s) from step 0 on are after step 0 (no checkpoint): a resume recomputes them",
    where running it again computes nothing.  Now it says the run finished; an unfinished run keeps its wording."""
    from quotient_sgd.runner import load_trajectory as read

    wd = str(tmp_path / "run")
    s = tiny_settings(10, **{"checkpoint.enabled": False})
    run(s, wd)
    want = load_trajectory(wd)
    os.remove(os.path.join(wd, "trajectory.npz"))
    got = read(wd)
    _same(dict(got), want)
    assert "removed after the run finished" in got.source and "unfinished" not in got.source, got.source
    assert "recomputes" not in got.source, got.source
    text = report(wd)
    assert "final (step 9)" in text and "unfinished" not in text and "recomputes" not in text, text
    os.remove(os.path.join(wd, "run.json"))  # (as a run killed before recording that it finished)
    assert "an unfinished or killed run" in read(wd).source


# ---- defect 7: plots a report drew while the run computed outlived it ------------------------------------------
def test_plots_a_report_drew_while_the_run_computed_do_not_outlive_it(tmp_path, monkeypatch):
    """``quotient-sgd report`` on a run (or sweep) still training draws ``plots/`` of the steps done so far; with
    ``logging.plots=False`` the finished run kept them: ``plots/loss.png`` of 10 steps beside a ``summary.md`` of
    20.  A call that computed steps now removes such plots when it does not draw its own (a call that computes
    nothing keeps the plots it finds, as before)."""
    from quotient_sgd.runner import _rundir

    reports: list[str] = []
    append = _rundir.MetricsLog.append

    def append_then_report(self, rows):  # (a user's report after the first chunk's rows, while the run goes on)
        append(self, rows)
        if not reports:
            for d in watched:
                reports.append(report(d))

    monkeypatch.setattr(_rundir.MetricsLog, "append", append_then_report)
    wd = str(tmp_path / "run")
    watched = [wd]
    run(tiny_settings(20), wd)
    assert "10 of 20 steps recorded" in reports[0]
    assert not os.path.exists(os.path.join(wd, "plots")), os.listdir(os.path.join(wd, "plots"))

    reports.clear()
    sw = str(tmp_path / "sw")
    watched = [os.path.join(sw, "members", "000"), sw]
    res = sweep(tiny_settings(20, **{"sweep.seed": (0, 1), "sweep.lr": (0.05,)}), sw, devices=jax.devices()[:1],
                members_per_device=1)
    assert len(reports) == 2 and "unfinished (10 of 20 steps)" in reports[1], reports
    for d in (sw, *res.member_dirs):
        assert not os.path.exists(os.path.join(d, "plots")), d


# ---- defect 8: a sweep member's record that does not parse --------------------------------------------------------
@pytest.mark.parametrize("name", ["events.json", "run.json", "config.json"])
def test_a_sweep_members_record_that_does_not_parse_is_named(tmp_path, capsys, name):
    """``quotient-sgd report SWEEP`` (and ``sweep``) name a run directory's record that does not parse, but a
    member's (``members/001/events.json`` cut short) escaped as a bare ``JSONDecodeError`` traceback; the command
    now names the member's file and exits with status 2, writing nothing."""
    from quotient_sgd.cli import main

    sw = tmp_path / "sw"
    sweep_records(sw)
    bad = sw / "members" / "001" / name
    bad.write_text(bad.read_text()[:-1])
    before = sorted(str(p) for p in sw.rglob("*"))
    assert main(["quotient-sgd", "report", str(sw)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not valid JSON" in err and "Traceback" not in err, err
    assert sorted(str(p) for p in sw.rglob("*")) == before


# ---- defect 9: a sweep member's config that is no valid config was blamed on sweep.json ----------------------------
def test_a_sweep_members_invalid_config_is_named_as_the_members(tmp_path, capsys):
    """``quotient-sgd report SWEEP`` whose member's ``config.json`` holds a value validation refuses (``optim.lr =
    -1``) said "its sweep.json's config is not a valid config", sending the user to a file that is valid; it now
    names the member's ``config.json``."""
    import json

    from quotient_sgd.cli import main

    sw = tmp_path / "sw"
    sweep_records(sw)
    path = sw / "members" / "001" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["optim"]["lr"] = -1.0
    path.write_text(json.dumps(cfg))
    assert main(["quotient-sgd", "report", str(sw)]) == 2
    err = capsys.readouterr().err
    assert f"the config.json of its member {str(sw / 'members' / '001')!r} is not a valid config" in err, err
    assert "config.optim.lr = -1.0" in err and "sweep.json" not in err, err


# ---- defect 10: a sweep member's diverged.json that is no record ---------------------------------------------------
@pytest.mark.parametrize("text, needle", [("[1]", "holds a JSON list"), ('{"x": 1}', "has no key 'step'"),
                                         ('{"step": "3", "reason": "r"}', 'has \'step\' = "3"'),
                                         ('{"step": 3}', "has no key 'reason'")])
def test_a_sweep_members_diverged_json_that_is_no_record_is_named(tmp_path, capsys, text, needle):
    """A member's ``diverged.json`` that parses but is no divergence record (a hand edit: a list, an object without
    an integer ``step`` or a string ``reason``) failed ``report`` (and ``sweep``, ``detect_run``) in a bare
    ``TypeError`` / ``KeyError`` traceback, where the other records are named; it is named now, status 2."""
    from quotient_sgd.cli import main

    sw = tmp_path / "sw"
    sweep_records(sw)
    (sw / "members" / "001" / "run.json").unlink()  # (an unfinished member: its diverged.json is read)
    (sw / "members" / "001" / "diverged.json").write_text(text)
    assert main(["quotient-sgd", "report", str(sw)]) == 2
    err = capsys.readouterr().err
    assert "its diverged.json" in err and needle in err and "Traceback" not in err, err


# ---- defect 11: a run.json whose values are no record ----------------------------------------------------------
@pytest.mark.parametrize("record, key", [({"wall_s": "x", "resumed_from": None, "diverged": None}, "wall_s"),
                                         ({"wall_s": 1.0, "resumed_from": None, "diverged": [1]}, "diverged"),
                                         ({"wall_s": 1.0, "resumed_from": True, "diverged": None}, "resumed_from"),
                                         ({"wall_s": None, "resumed_from": 0, "diverged": {"step": 3}}, "diverged")])
def test_a_run_json_whose_values_are_no_record_is_named(tmp_path, capsys, record, key):
    """A ``run.json`` that is a JSON object but whose values are not what the runner writes (a hand edit:
    ``"wall_s": "x"``, ``"diverged": [1]``) passed the record check and failed ``report`` in the summary ("Unknown
    format code 'f' for object of type 'str'") or in a bare ``TypeError`` / ``KeyError``; the command names the
    file, the key and the value now (status 2), as for a record that is no object; valid values still report."""
    import json

    from quotient_sgd.cli import main

    sw = tmp_path / "sw"
    sweep_records(sw)
    member = sw / "members" / "000"
    (member / "run.json").write_text(json.dumps(record))
    assert main(["quotient-sgd", "report", str(member)]) == 2
    err = capsys.readouterr().err
    assert f"its run.json has {key!r} = " in err and "Traceback" not in err, err
    if record["wall_s"] != "x":
        return
    (member / "run.json").write_text(json.dumps({"wall_s": 2.5, "resumed_from": 10, "diverged": None}))
    assert main(["quotient-sgd", "report", str(member)]) == 0
    out = capsys.readouterr().out
    assert "- wall time: 2.5 s" in out and "resumed from step 10" in out, out


# ---- defect 12: events whose step is no step -----------------------------------------------------------------------
@pytest.mark.parametrize("events", [[{"step": "x", "kind": "loss_spike"}], [{"step": None, "kind": "fold"}],
                                    [{"step": 3, "kind": 5}], [{"step": 3, "kind": "divergence", "details": 5}]])
def test_events_json_whose_events_are_no_events_is_detected_again(tmp_path, events):
    """``events.json`` is read when it is a list of objects with ``step`` and ``kind``, else detected again with a
    warning; but an event at step ``"x"`` was then drawn as a category of the step axis and listed in the summary
    (``| x | loss_spike |``), one at step ``null`` failed in a bare ``TypeError`` (comparing it with the axis), and
    ``details`` that are no object in an ``AttributeError``.  Such a file is now one that holds no events."""
    import json

    from quotient_sgd.runner._report import read_events

    sw = tmp_path / "sw"
    sweep_records(sw)
    member = sw / "members" / "000"
    (member / "events.json").write_text(json.dumps(events))
    with pytest.warns(RuntimeWarning, match="not a list of events"):
        assert read_events(str(member)) is None
    if events[0]["kind"] == "fold":
        with pytest.warns(RuntimeWarning, match="not a list of events"):
            text = report(str(member))
        assert "## Detected events\n\nNone." in text, text
    (member / "events.json").write_text(json.dumps([{"step": 3, "kind": "fold", "details": {}}]))
    assert read_events(str(member)) == [{"step": 3, "kind": "fold", "details": {}}]


# ---- defect 13: report into a directory it cannot write -------------------------------------------------------------
def test_report_of_a_directory_it_cannot_write_is_named(tmp_path, capsys, monkeypatch):
    """``quotient-sgd report`` on a run directory it may read but not write (another user's runs, a read-only
    mount: ``EACCES`` / ``EROFS`` when it writes ``summary.md`` or ``plots/``) ended in a bare ``PermissionError``
    / ``OSError`` traceback; it is now an error naming the directory, the reason and the file, status 2."""
    import errno

    from quotient_sgd.cli import main
    from quotient_sgd.runner import _report

    sw = tmp_path / "sw"
    sweep_records(sw)
    member = str(sw / "members" / "000")

    def refuse(path, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(_report, "durable_write", refuse)
    monkeypatch.setattr(_report, "make_plots", lambda *a, **k: [])
    assert main(["quotient-sgd", "report", member]) == 2
    err = capsys.readouterr().err
    assert f"cannot report {member!r}: {os.strerror(errno.EROFS)} ({os.path.join(member, 'summary.md')})" in err, err
    assert "Traceback" not in err
