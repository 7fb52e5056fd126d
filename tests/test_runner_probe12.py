"""Run and sweep directories, the command line and the settings on what they misread or could not say: records
that parse as JSON but are not what quotient_sgd writes (a list, ``null``, another program's ``config.json``, a
``sweep.json`` without its keys, an ``events.json`` holding no events), ``--config=FILE:ARGUMENT``,
``Settings.replace`` of a key that is no value of the schema, a sweep member directory reached through a symbolic
link, and TensorBoard turned on when a run resumes."""

import json
import os
import re

import numpy as np
import pytest

from quotient_sgd.cli import main
from quotient_sgd.config import load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _tiny_config_json() -> str:
    """The config.json of `quotient-sgd run --config=configs/tiny.py --config.steps=10`."""
    return json.dumps(validate(load_config(TINY, {"steps": 10})).to_dict())


@pytest.mark.parametrize("cmd, files, needle", [
    # config.json holding valid JSON that is no object: run failed in "'list' object has no attribute 'items'"
    ("run", {"config.json": "[]"}, "its config.json holds a JSON list ([]), where a JSON object is written"),
    ("run", {"config.json": "null"}, "its config.json holds a JSON null (null)"),
    # another program's config.json (a model directory): said "holds a run of a different config (16 differing
    # keys ...)"; report drew the default config's summary of an empty `{}`
    ("run", {"config.json": '{"architectures": ["Bert"], "hidden_size": 768}'},
     "its config.json has none of the run sections"),
    ("report", {"config.json": "{}"}, "its config.json has none of the run sections"),
    # sweep.json without its keys or of another shape: KeyError 'config' / 'members', TypeError, AttributeError
    ("sweep", {"sweep.json": "{}"}, "its sweep.json has no key 'config'"),
    ("sweep", {"sweep.json": "[]"}, "its sweep.json holds a JSON list ([])"),
    ("report", {"sweep.json": "null"}, "its sweep.json holds a JSON null (null)"),
    ("report", {"sweep.json": '{"config": {}}'}, "its sweep.json has no key 'members'"),
    ("report", {"sweep.json": '{"config": {}, "members": [1], "num_devices": 1, "num_processes": 1}'},
     "its sweep.json has 'members' = [1], where a list of objects"),
    # run.json of another shape: report and run failed in "'list' object has no attribute 'get'"
    ("report", {"config.json": None, "run.json": "[1]"}, "its run.json holds a JSON list ([1])"),
    ("run", {"config.json": None, "run.json": "[1]"}, "its run.json holds a JSON list ([1])"),
])
def test_a_record_that_parses_but_is_no_record_is_named_and_nothing_is_written(tmp_path, monkeypatch, capsys, cmd,
                                                                                files, needle):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(_tiny_config_json() if text is None else text)
    before = {n: (d / n).read_text() for n in os.listdir(d)}
    args = [str(d)] if cmd == "report" else [f"--config={TINY}", "--config.steps=10", f"--workdir={d}"]
    code = main(["quotient-sgd", cmd, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err, err
    assert "not a record quotient_sgd wrote" in err and str(d) in err, err
    assert os.listdir(tmp_path) == ["d"] and {n: (d / n).read_text() for n in os.listdir(d)} == before


@pytest.mark.parametrize("events", ["null", '[1, {"note": "mine"}]'])
def test_report_detects_again_over_an_events_json_that_holds_no_events(tmp_path, monkeypatch, events):
    """``report`` (and ``detect_run``'s divergence) read ``events.json`` as a list of event objects: one that parses
    but holds something else failed in ``'NoneType' object is not iterable`` / ``'int' object has no attribute
    'get'``.  It is now ignored with a warning naming it, and the events are detected again, the divergence the
    run recorded (run.json) included."""
    import quotient_sgd.runner._report as report_module
    from quotient_sgd.runner import report

    monkeypatch.setattr(report_module, "make_plots", lambda *a, **k: [])  # (what is read, not what is drawn)
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.json").write_text(_tiny_config_json())
    loss = np.r_[np.linspace(1.0, 0.5, 9), np.nan].astype(np.float32)
    np.savez(d / "trajectory.npz", step=np.arange(10), loss=loss)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": float(loss[i])}) + "\n"
                                             for i in range(0, 9, 5)))
    div = {"step": 9, "reason": "non-finite loss (nan)"}
    (d / "run.json").write_text(json.dumps({"wall_s": 1.0, "resumed_from": 0, "diverged": div}))
    (d / "events.json").write_text(events)
    with pytest.warns(RuntimeWarning, match="events.json holds .*not a list of events"):
        text = report(str(d))
    assert "diverged at step 9" in text
    got = json.loads((d / "events.json").read_text())
    assert isinstance(got, list) and all(isinstance(e, dict) for e in got)
    assert [(e["step"], e["details"]["reason"]) for e in got if e["kind"] == "divergence"] == [(9, div["reason"])]


@pytest.mark.parametrize("suffix", [":cpu", ":"])
def test_a_config_file_with_an_argument_is_refused_saying_the_file_exists(tmp_path, monkeypatch, capsys, suffix):
    """``--config=configs/grokking.py:cpu`` (ml_collections' FILE:ARGUMENT form, which calls ``get_config("cpu")``)
    was refused with "config file 'configs/grokking.py:cpu' does not exist", of a file that exists.  The command
    calls ``get_config()`` with no argument: the message says so and names the file; nothing is written."""
    monkeypatch.chdir(tmp_path)
    grokking = os.path.join(ROOT, "configs", "grokking.py")
    code = main(["quotient-sgd", "run", f"--config={grokking}{suffix}", "--config.steps=2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "does not exist" not in err and f"the file {grokking!r} exists" in err, err
    assert "get_config() with no argument" in err and f"--config={grokking} " in err, err
    assert os.listdir(tmp_path) == []


def test_settings_replace_refuses_what_is_no_value_of_the_schema():
    """``Settings.replace(**{"optim.lr.x": 0.5})`` set ``optim.lr`` (the third part was dropped) and
    ``replace(optim=0.5)`` replaced the whole section by a float, silently; both name the key now, as an unknown
    key does.  The values of the schema are still replaced."""
    from quotient_sgd.config import Settings

    s = Settings()
    for key in ("optim.lr.x", "optim", "steps.x", "optim.lrr", "stepz"):
        with pytest.raises(KeyError, match=rf"Settings\.replace: '{re.escape(key)}' is not a value of the schema"):
            s.replace(**{key: 0.5})
    r = s.replace(**{"optim.lr": 0.5, "seed": 3, "sweep.lr": (0.1,)})
    assert (r.optim.lr, r.seed, r.sweep.lr, s.optim.lr) == (0.5, 3, (0.1,), Settings().optim.lr)


@pytest.mark.parametrize("link_to", ["member", "members"])
def test_run_into_a_sweep_member_reached_through_a_link_is_refused(tmp_path, link_to):
    """`run` refuses a sweep's member directory as its workdir (the sweep writes it, under the sweep directory's
    lock); a symbolic link to the member directory (``latest -> sw/members/000``), or to the ``members`` folder,
    got past the check and the run resumed the member as a run of its own."""
    from quotient_sgd.runner import RunDirError, run

    s = validate(load_config(TINY, {"steps": 10}))
    sw = tmp_path / "sw"
    (sw / "members" / "000").mkdir(parents=True)
    (sw / "sweep.json").write_text("{}")
    (sw / "members" / "000" / "config.json").write_text(json.dumps(s.to_dict()))
    if link_to == "member":
        os.symlink(sw / "members" / "000", tmp_path / "latest")
        workdir = tmp_path / "latest"
    else:
        os.symlink(sw / "members", tmp_path / "m")
        workdir = tmp_path / "m" / "000"
    with pytest.raises(RunDirError, match="is a member directory of the sweep"):
        run(s, str(workdir))
    assert os.listdir(sw / "members" / "000") == ["config.json"]


def test_tensorboard_turned_on_at_a_resume_holds_every_row_of_the_metrics(tmp_path):
    """``logging.tensorboard`` may change between a run and its resumption; a run resumed at step 10 with it
    turned on wrote the rows from step 10 only (TensorBoard showed steps [10, 15, 19], metrics.jsonl has [0, 5, 9,
    10, 15, 19]).  Now TensorBoard shows every row of metrics.jsonl once, with its value, as after a run that had it
    on throughout; and so after a further resume (rows already in TensorBoard are not doubled)."""
    from helpers import load_metric_rows, read_tensorboard, tiny_settings
    from quotient_sgd.runner import run

    wd = str(tmp_path / "r")
    run(tiny_settings(30, **{"checkpoint.every": 10}), wd, max_chunks=1)  # TensorBoard off, stopped at 10
    with_tb = tiny_settings(30, **{"checkpoint.every": 10, "logging.tensorboard": True})
    run(with_tb, wd, max_chunks=1)  # resumed at 10 with TensorBoard on, stopped at 20
    run(with_tb, wd)  # resumed at 20
    rows = load_metric_rows(wd)
    tb = read_tensorboard(wd)
    assert [r["step"] for r in rows] == [0, 5, 9, 10, 15, 19, 20, 25, 29]
    for key in ("loss", "grad_norm", "test_loss"):
        want = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in tb[key]] == [s for s, _ in want], key
        np.testing.assert_allclose([v for _, v in tb[key]], [v for _, v in want], rtol=1e-6, err_msg=key)


def _refusal(over) -> str:
    """The message of the ConfigError that validating the default config with the overrides ``over`` raises."""
    from quotient_sgd.config import ConfigError, default_config

    c = default_config()
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    with pytest.raises(ConfigError) as e:
        validate(c)
    return str(e.value)


@pytest.mark.parametrize("over, key", [
    ({"data.name": "sparse_parity", "data.n_bits": 2**31 - 1}, "data.n_bits"),
    ({"data.name": "teacher_student", "data.din": 10**9}, "data.din"),
    ({"data.name": "teacher_student", "data.teacher_hidden": 2 * 10**9}, "data.teacher_hidden"),
    ({"data.name": "teacher_student", "data.n_train": 2 * 10**9, "data.batch_size": 0}, "data.n_train"),
])
def test_a_data_set_too_large_names_the_key_that_makes_it_so(over, key):
    """768 examples of 2^31 - 1 sparse-parity bits (18 TiB) were refused as "config.data.n_train = 512: ... use a
    smaller data.n_train", after 30 s computing 2**n_bits; 768 teacher-student examples of 10^9 inputs the same.
    The key named is the one that makes the data set large (the example count where that is it)."""
    msg = _refusal(over)
    assert msg.startswith(f"config.{key} = {over[key]}:") and f"use a smaller {key}" in msg, msg


@pytest.mark.parametrize("over, key", [
    ({"model.hidden": (100000, 100000)}, "model.hidden"),
    ({"model.name": "meanfield", "model.width": 10**9}, "model.width"),
    ({"model.name": "cnn", "model.channels": (100000, 100000)}, "model.channels"),
    ({"model.name": "transformer", "data.name": "modular_arithmetic", "data.batch_size": 0, "model.d_model": 100000,
      "model.num_heads": 1, "optim.name": "adamw"}, "model.d_model"),
    ({"model.name": "transformer", "data.name": "modular_arithmetic", "data.batch_size": 0, "model.mlp_ratio": 10**8},
     "model.mlp_ratio"),
    ({"model.name": "cnn", "model.kernel_size": 20000}, "model.kernel_size"),
])
def test_a_model_too_large_for_memory_is_refused_before_anything_is_built(over, key):
    """``model.hidden = (100000, 100000)`` on the digits (10^10 parameters: 112 GiB for the parameters, their
    gradient and SGD's momentum in float32) validated, and the run went on to initialise it.  Like a data set
    larger than memory, it is refused naming the key that sets the model's size; the configs the tests run
    still validate."""
    from quotient_sgd.config._validate import physical_memory

    msg = _refusal(over)
    assert msg.startswith(f"config.{key} = ") and f"use a smaller {key}" in msg, msg
    assert f"{physical_memory() / 2**30:.3g} GiB of memory" in msg, msg
    validate(load_config(TINY))


@pytest.mark.parametrize("over", [{"model.hidden": (100000, 100000)},
                                  {"data.name": "modular_arithmetic", "data.p": 20000, "data.batch_size": 0}])
def test_a_run_recorded_on_a_larger_machine_is_reported_here(tmp_path, monkeypatch, over):
    """``report`` re-validates the recorded config.json, and validation refuses a data set (or model) too large for
    this machine's memory: a run made on a larger machine could not be reported on this one ("its config.json is
    not a valid config: ... more than this machine's 23.5 GiB of memory").  A recorded config is read without the
    checks of this machine's memory (``from_dict``); a config to run is still checked (``validate``)."""
    import quotient_sgd.runner._report as report_module
    from quotient_sgd.config import ConfigError, Settings, from_dict
    from quotient_sgd.runner import report

    monkeypatch.setattr(report_module, "make_plots", lambda *a, **k: [])
    s = Settings().replace(**{"name": "big", **over})
    with pytest.raises(ConfigError, match="of memory"):
        validate(s.to_dict())
    assert from_dict(s.to_dict()) == s
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(s.to_dict()))
    assert report(str(d)).startswith("# Run `big`")


def test_a_home_directory_in_workdir_and_config_is_expanded(tmp_path, monkeypatch):
    """``--workdir=~/runs/x`` reaches the command with its ``~`` (the shell expands one only at the start of a
    word): the run went into ``./~/runs/x``, a directory named ``~`` under the working directory, and
    ``--config=~/tiny.py`` "did not exist".  Both are the home directory's now."""
    import shutil

    import quotient_sgd.runner as runner_pkg

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    shutil.copy(TINY, home / "tiny.py")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    seen = []
    monkeypatch.setattr(runner_pkg, "run", lambda settings, workdir: seen.append((settings, workdir)) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # (the run itself is not what is tested)
        main(["quotient-sgd", "run", "--config=~/tiny.py", "--config.steps=3", "--workdir=~/runs/x"])
    (settings, workdir), = seen
    assert workdir == str(home / "runs" / "x") and settings.steps == 3 and settings.name == "tiny"
    assert os.listdir(cwd) == []
