"""Config and run-directory details: a bool assigned to a numeric key of a config file is refused (ml_collections
stored ``lr = True`` as 1.0); repeated ``symmetry.components`` are refused; a run or sweep directory whose recorded
config predates a key of the schema resumes when the key holds its default, and is refused otherwise; `report` names
a missing path; a run finished after a report of its killed directory records its wall time; an interrupt landing
in a garbage-collector callback is delivered, and Ctrl-C at start-up exits 130."""

import json
import os
import warnings

import numpy as np
import pytest

from helpers import load_metric_rows, load_trajectory, tiny_settings
from quotient_sgd.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _config_file(tmp_path, line: str) -> str:
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir(exist_ok=True)
    path = cfg_dir / "wrong.py"
    path.write_text("import numpy as np\n\nfrom quotient_sgd.config import default_config\n\n\ndef get_config():\n"
                    "    config = default_config()\n"
                    f"    {line}\n"
                    "    return config\n")
    return str(path)


@pytest.mark.parametrize("line,needle", [
    ("config.optim.lr = True", "config.optim.lr = True (in {path}, line 8): expected a float, got bool"),
    ("config.init_gauge = False", "config.init_gauge = False (in {path}, line 8): expected a float, got bool"),
    ("config.optim.momentum = np.bool_(False)", ("config.optim.momentum = False (in {path}, line 8): expected a "
                                                 "float, got bool")),  # a NumPy scalar is read as what it holds
    ("config.steps = True", "config.steps = True (in {path}, line 8): expected an int, got bool"),
    ("config.steps = 3.5", "config.steps = 3.5 (in {path}, line 8): expected an int, got float"),
    ("config.data.noise = '0.1'", "config.data.noise = '0.1' (in {path}, line 8): expected a float, got str"),
])
def test_cli_bool_or_wrong_number_for_a_numeric_key_in_a_config_file(tmp_path, monkeypatch, capsys, line, needle):
    """A bool where a float is expected was stored as 1.0 / 0.0 by ml_collections and ran; now every wrong type
    for a numeric key of a config file is refused, naming the dotted key, the value, what is allowed and the
    line, and nothing is written."""
    path = _config_file(tmp_path, line)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["quotient-sgd", "run", f"--config={path}", f"--workdir={work / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle.format(path=path) in err, err
    assert "Traceback" not in err
    assert os.listdir(work) == []


@pytest.mark.parametrize("key,value,kind", [("optim.lr", True, "a float"), ("optim.weight_decay", False, "a float"),
                                            ("init_gauge", np.bool_(True), "a float"), ("steps", True, "an int"),
                                            ("data.batch_size", False, "an int")])
def test_default_config_refuses_a_bool_for_a_numeric_key(key, value, kind):
    """The ConfigDict of default_config() refuses the assignment itself (the key keeps its value); bools still go
    to bool keys, numbers to numeric keys (an int to a float key, as ml_collections converts)."""
    from quotient_sgd.config import default_config, validate

    c = default_config()
    sect, _, leaf = key.rpartition(".")
    node = c[sect] if sect else c
    before = node[leaf]
    with pytest.raises(TypeError, match=rf"'{leaf}': {bool(value)!r} is a bool, and '{leaf}' holds {kind}"):
        setattr(node, leaf, value)
    assert node[leaf] == before and type(node[leaf]) is type(before)
    c.optim.nesterov = True
    c.logging.plots = False
    c.optim.lr = 1
    c.optim.momentum = 0.5
    s = validate(c)
    assert s.optim.lr == 1.0 and isinstance(s.optim.lr, float) and s.optim.nesterov is True
    assert s.logging.plots is False


def test_default_config_sections_stay_strict_after_copies():
    """Copies of the config (deepcopy, a locked one, a section replaced by a dict) keep refusing the bool, or
    leave it to validation, which names it."""
    import copy

    from quotient_sgd.config import ConfigError, default_config, validate

    c = default_config()
    c.lock()
    d = copy.deepcopy(c)
    with pytest.raises(TypeError, match="'lr': True is a bool"):
        d.optim.lr = True
    e = default_config()
    e.optim = dict(e.optim.to_dict(), lr=True)
    with pytest.raises(ConfigError, match=r"config\.optim\.lr = True: expected a float, got bool"):
        validate(e)


def test_repeated_symmetry_components_are_refused(tmp_path, monkeypatch, capsys):
    """``symmetry.components = ('rescale', 'rescale')`` was accepted (and recorded as such in config.json); it is
    refused like a repeated observable name, from a config file and from an override, before anything is
    written."""
    from quotient_sgd.config import ConfigError

    for comps in (("all", "all"), ("rescale", "permutation", "rescale"), ("rescale/layers.0", "rescale/layers.0")):
        with pytest.raises(ConfigError, match=r"config\.symmetry\.components = .*repeats \['" + comps[-1]):
            tiny_settings(**{"symmetry.components": comps})
    tiny_settings(**{"symmetry.components": ("rescale", "rescale/layers.0")})  # overlapping, not repeated: allowed
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code = main(["quotient-sgd", "run", f"--config={TINY}", "--config.symmetry.components=('rescale','rescale')",
                 f"--workdir={work / 'r'}"])
    err = capsys.readouterr().err
    assert code == 2 and "config.symmetry.components = ('rescale', 'rescale'): repeats ['rescale']" in err, err
    assert os.listdir(work) == []


def _record_without(path: str, settings, *drop: str, sweep: bool = False) -> None:
    d = settings.to_dict()
    for key in drop:
        sect, _, leaf = key.rpartition(".")
        del (d[sect] if sect else d)[leaf]
    with open(path, "w") as f:
        json.dump({"config": d} if sweep else d, f)


def test_recorded_config_without_a_newer_key_resumes_at_its_default(tmp_path):
    """A config.json written before ``model.norm`` / ``sweep.members_per_device`` existed was refused as a
    different config ('<absent>' != 'none'); the absent keys now read as their defaults (with a warning naming
    them), while an absent key set to another value, or any other difference, is still refused."""
    from quotient_sgd.runner import RunDirError
    from quotient_sgd.runner._rundir import check_workdir, config_diff

    s = tiny_settings(steps=10)
    wd = tmp_path / "old"
    wd.mkdir()
    _record_without(str(wd / "config.json"), s, "model.norm", "sweep.members_per_device")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_workdir(str(wd), s) is True
    msgs = [str(w.message) for w in caught]
    assert any("['model.norm', 'sweep.members_per_device']" in m and "model.norm = 'none'" in m for m in msgs), msgs
    with pytest.raises(RunDirError, match=r"model\.norm: '<absent>' \(in the directory\) != 'layer' \(now\)"):
        check_workdir(str(wd), s.replace(**{"model.norm": "layer"}))
    with pytest.raises(RunDirError, match=r"steps: 10 \(in the directory\) != 11 \(now\)"):
        check_workdir(str(wd), s.replace(steps=11))
    # a key the schema no longer has is a difference (nothing says what it did)
    d = s.to_dict()
    d["optim"]["dampening"] = 0.0
    assert config_diff(d, s.to_dict()) == {"optim.dampening": (0.0, "<absent>")}
    # a config.json that has the key recorded with a non-default value differs as before
    d = s.to_dict()
    d["model"]["norm"] = "layer"
    assert config_diff(d, s.to_dict()) == {"model.norm": ("layer", "none")}


def test_recorded_sweep_config_without_a_newer_key_resumes_at_its_default(tmp_path):
    """The sweep directory's check does the same with its sweep.json."""
    from quotient_sgd.runner import RunDirError
    from quotient_sgd.runner._sweep import _check_sweep_dir

    s = tiny_settings(steps=10)
    wd = tmp_path / "sw"
    wd.mkdir()
    _record_without(str(wd / "sweep.json"), s, "sweep.members_per_device", sweep=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = _check_sweep_dir(str(wd), s)
    assert meta is not None and "members_per_device" not in meta["config"]["sweep"]
    assert any("['sweep.members_per_device']" in str(w.message) for w in caught)
    with pytest.raises(RunDirError, match=r"sweep\.members_per_device: '<absent>' \(in the directory\) != 2"):
        _check_sweep_dir(str(wd), s.replace(**{"sweep.members_per_device": 2}))


@pytest.mark.slow
def test_run_recorded_before_a_newer_key_resumes_bitwise(tmp_path):
    """End to end: a run stopped after its first chunk, its config.json stripped of a key at its default, resumes
    (the file then records the key) and ends with the trajectory and rows of an uninterrupted run."""
    from quotient_sgd.runner import run

    s = tiny_settings(steps=20, **{"checkpoint.every": 10})
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "wd")
    run(s, ref)
    run(s, wd, max_chunks=1)
    _record_without(os.path.join(wd, "config.json"), s, "model.norm")
    with pytest.warns(UserWarning, match="model.norm"):
        run(s, wd)
    with open(os.path.join(wd, "config.json")) as f:
        assert json.load(f) == s.to_dict()
    a, b = load_trajectory(ref), load_trajectory(wd)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert load_metric_rows(ref) == load_metric_rows(wd)


def test_report_on_a_missing_path_or_a_file_says_so(tmp_path, capsys):
    """`report` on a path that does not exist said it had no config.json; it says the path does not exist, and
    that a file is a file; a directory without either record is still 'not a run directory'."""
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "d").mkdir()
    for arg, needle in ((tmp_path / "nope", "does not exist"), (tmp_path / "f.txt", "is a file, not a run directory"),
                        (tmp_path / "d", "is not a run directory (no config.json)")):
        code = main(["quotient-sgd", "report", str(arg)])
        err = capsys.readouterr().err
        assert code == 2 and f"error: {str(arg)!r} {needle}" in err, err
    assert sorted(os.listdir(tmp_path)) == ["d", "f.txt"] and os.listdir(tmp_path / "d") == []


def test_run_killed_after_its_last_checkpoint_and_reported_records_its_wall_time(tmp_path):
    """A run killed after the checkpoint of its last step but before run.json, then reported (summary.md drawn
    without a wall time), then run again: the call that finishes it records its wall time and the step it
    resumed from (they were None, read back from the report's summary.md)."""
    from quotient_sgd.runner import report, run

    s = tiny_settings(steps=6, **{"checkpoint.every": 3})
    wd = str(tmp_path / "r")
    run(s, wd)
    for name in ("run.json", "summary.md", "events.json", "trajectory.npz"):  # what the kill left unwritten
        os.remove(os.path.join(wd, name))
    report(wd)
    res = run(s, wd)
    with open(os.path.join(wd, "run.json")) as f:
        rec = json.load(f)
    assert res.resumed_from == 6 and rec["resumed_from"] == 6, rec
    assert isinstance(rec["wall_s"], float) and rec["wall_s"] >= 0, rec
    with open(os.path.join(wd, "summary.md")) as f:
        assert "- wall time: " in f.read()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_arriving_in_a_gc_callback_is_not_dropped(sig):
    """Ctrl-C (or SIGTERM) landing while a garbage-collector callback runs (JAX registers one; collections run at
    any allocation) raised there, where Python drops the exception ("Exception ignored in ...") and the run went
    on to its end with exit status 0. The command's handlers deliver it again once the callback is over."""
    import gc
    import signal
    import time

    from quotient_sgd.cli import _sigterm_raises, _Terminated

    signum = getattr(signal, sig)
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(phase)
            signal.raise_signal(signum)
            for _ in range(1000):  # bytecodes: the Python-level handler runs here, inside the callback
                pass

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt) as info, _sigterm_raises():
            # the youngest generation only: its callbacks are the same, and a full collection of a test process
            # that has run many tests took ~3 s
            gc.collect(0)
            deadline = time.time() + 2.0
            while time.time() < deadline:
                time.sleep(0.001)
        assert fired and (type(info.value) is _Terminated) == (sig == "SIGTERM")
        assert time.time() < deadline - 1.5  # delivered right after the callback, not at the end of the block
    finally:
        gc.callbacks.remove(callback)
        signal.signal(signal.SIGINT, previous)


def test_ctrl_c_before_the_run_starts_exits_130_without_a_traceback(monkeypatch, capsys, tmp_path):
    """Ctrl-C while the command imports and validates (before `run` or `sweep` starts) printed a Python traceback
    and ended with -SIGINT; it now exits with status 130 and says nothing was written."""
    import quotient_sgd.config as config_pkg

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(config_pkg, "validate", interrupted)
    monkeypatch.chdir(tmp_path)
    code = main(["quotient-sgd", "run", f"--config={TINY}", f"--workdir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted before anything was written" in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []


def test_ctrl_c_in_a_gc_callback_while_the_command_starts_is_delivered(monkeypatch, capsys, tmp_path):
    """The same before `run` starts (importing, validating: seconds on a loaded machine): a Ctrl-C that lands in a
    gc callback then was dropped too, and the run went on; it now ends the command with status 130."""
    import gc
    import signal
    import time

    import quotient_sgd.config as config_pkg

    validate = config_pkg.validate
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(phase)
            signal.raise_signal(signal.SIGINT)
            for _ in range(1000):
                pass

    def slow_validate(cfg):
        gc.callbacks.append(callback)
        try:
            gc.collect(0)  # (the youngest generation: the same callbacks, without a full collection's seconds)
            deadline = time.time() + 2.0
            while time.time() < deadline:
                time.sleep(0.001)
        finally:
            gc.callbacks.remove(callback)
        return validate(cfg)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(config_pkg, "validate", slow_validate)
        monkeypatch.chdir(tmp_path)
        code = main(["quotient-sgd", "run", f"--config={TINY}", f"--workdir={tmp_path / 'r'}"])
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert fired and code == 130 and "interrupted before anything was written" in err, err
    assert os.listdir(tmp_path) == []


def test_an_interrupt_arriving_in_a_weakref_callback_is_not_dropped():
    """As in a gc callback, Python drops an exception raised in a weakref callback (a WeakKeyDictionary's entry
    removal, run whenever a key dies): the command's handler delivers the Ctrl-C again afterwards."""
    import signal
    import time
    import weakref

    from quotient_sgd.cli import _sigterm_raises

    class Key:
        pass

    fired = []

    def callback(ref):
        fired.append(ref)
        signal.raise_signal(signal.SIGINT)
        for _ in range(1000):
            pass

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), _sigterm_raises():
            key = Key()
            ref = weakref.ref(key, callback)
            del key  # the callback runs here
            deadline = time.time() + 2.0
            while time.time() < deadline:
                time.sleep(0.001)
        assert fired and fired[0] is ref and time.time() < deadline - 1.5
    finally:
        signal.signal(signal.SIGINT, previous)
