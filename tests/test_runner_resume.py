"""Resume after a real SIGKILL: the restarted command ends with the trajectory of an uninterrupted run (bitwise,
CPU, same seed) and metrics.jsonl has every row exactly once; a different config never overwrites a run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from helpers import checkpoint_steps, child_xla_flags, kill_after_checkpoint, load_trajectory
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import RunDirError, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
#: 120 steps: killed after its checkpoint of step >= 30, the run has 90 steps (9 checkpoints) left to resume
STEPS = 120
ARGS = [f"--config={TINY}", f"--config.steps={STEPS}", "--config.checkpoint.every=10", "--config.logging.plots=False"]


def _cmd(workdir):
    # compiled as this process compiles (tests.helpers.child_xla_flags): the reference run is made here, and the
    # same program compiled with other options rounds differently
    env = dict(os.environ, XLA_FLAGS=child_xla_flags())
    return [sys.executable, "-m", "quotient_sgd.cli", "run", *ARGS, f"--workdir={workdir}"], env


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    """Two subprocesses (killed, restarted with the same command) against an uninterrupted run of the same
    settings in this process: issue 5's must-show, so it runs in the default suite (not marked slow);
    test_in_process_resume_and_config_guard checks the same property in one process."""
    killed, ref = str(tmp_path / "killed"), str(tmp_path / "ref")
    cmd, env = _cmd(killed)
    code = kill_after_checkpoint(cmd, env, killed, 30, timeout=180)
    assert code == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(killed, "summary.md"))
    last_ckpt = checkpoint_steps(killed)[-1]
    assert 30 <= last_ckpt < STEPS
    # the killed run's trajectory so far: its parts (those after the last checkpoint too), joined in step order
    from quotient_sgd.runner import load_trajectory as run_trajectory

    so_far = run_trajectory(killed)
    assert so_far.source.startswith("trajectory_parts/") and len(so_far["step"]) >= last_ckpt

    # restart with the same command; an uninterrupted run for reference
    _ok(subprocess.run(cmd, env=env, capture_output=True, text=True))
    c = load_config(TINY)
    c.update_from_flattened_dict({"steps": STEPS, "checkpoint.every": 10, "logging.plots": False})  # ARGS' overrides
    run(validate(c), ref)

    a, b = load_trajectory(killed), load_trajectory(ref)
    for k in b:
        np.testing.assert_array_equal(so_far[k], b[k][: len(so_far["step"])], err_msg=k)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise
    ra, rb = _rows(killed), _rows(ref)
    steps = [r["step"] for r in ra]
    assert steps == sorted(set(steps)), "duplicated or unordered metric rows"
    assert ra == rb, "lost or changed metric rows"
    assert f"resumed from step {last_ckpt}" in open(os.path.join(killed, "summary.md")).read() or last_ckpt == STEPS


def test_in_process_resume_and_config_guard(tmp_path):
    c = load_config(TINY)
    c.steps = 40
    c.logging.plots = False
    s = validate(c)
    wd = str(tmp_path / "r")
    part = run(s, wd, max_chunks=2)
    assert part.steps_done == 20 and not os.path.exists(os.path.join(wd, "summary.md"))
    full = run(s, wd)
    assert full.resumed_from == 20
    ref = run(s, str(tmp_path / "ref"))
    for k in ref.trajectory:
        np.testing.assert_array_equal(full.trajectory[k], ref.trajectory[k], err_msg=k)
    assert [r["step"] for r in _rows(wd)] == [r["step"] for r in _rows(str(tmp_path / "ref"))]

    # a different config: refused, naming the directory and the differing keys; nothing changes
    before = {f: os.path.getmtime(os.path.join(wd, f)) for f in os.listdir(wd)}
    c.optim.lr = 0.01
    with pytest.raises(RunDirError) as e:
        run(validate(c), wd)
    msg = str(e.value)
    assert wd in msg and "optim.lr" in msg and "0.05" in msg and "0.01" in msg
    assert {f: os.path.getmtime(os.path.join(wd, f)) for f in os.listdir(wd)} == before

    # a non-run directory is refused too
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="no config.json"):
        run(s, str(other))
    assert os.listdir(other) == ["notes.txt"]


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """A checkpoint step whose files are incomplete (a kill inside orbax's finalisation) is deleted with a
    warning and the run resumes from the one before; the result still equals an uninterrupted run."""
    import shutil

    c = load_config(TINY)
    c.steps = 40
    c.logging.plots = False
    s = validate(c)
    wd = str(tmp_path / "r")
    run(s, wd, max_chunks=3)
    assert checkpoint_steps(wd) == [20, 30]
    shutil.rmtree(os.path.join(wd, "checkpoints", "30", "default"))
    with pytest.warns(RuntimeWarning, match="checkpoint 30"):
        resumed = run(s, wd)
    assert resumed.resumed_from == 20
    ref = run(s, str(tmp_path / "ref"))
    for k in ref.trajectory:
        np.testing.assert_array_equal(resumed.trajectory[k], ref.trajectory[k], err_msg=k)
    assert _rows(wd) == _rows(str(tmp_path / "ref"))


def test_ctrl_c_is_held_back_until_a_checkpoint_write_ends():
    """SIGINT inside ``sigint_deferred`` (around every checkpoint save / close) does not interrupt the block; it
    is delivered to the previous handler (KeyboardInterrupt) when the block ends, and the handler is restored."""
    import time

    from quotient_sgd.runner._rundir import sigint_deferred

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with sigint_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                finished.append(True)
        assert finished == [True]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with sigint_deferred():  # nothing received: nothing raised
            finished.append(True)
        assert finished == [True, True]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_after_a_kill_inside_a_trajectory_part_write(tmp_path):
    """A SIGKILL while ``trajectory_parts/part_<a>.npz`` is being written leaves its temporary file
    (``part_<a>.npz.tmp.npz``) behind: it is not a part, the same command resumes over it (and removes it), and
    the run ends with every step once."""
    from helpers import tiny_settings

    s = tiny_settings(steps=30, **{"checkpoint.every": 10})
    wd = str(tmp_path / "r")
    run(s, wd, max_chunks=2)
    parts = tmp_path / "r" / "trajectory_parts"
    (parts / "part_000000020.npz.tmp.npz").write_bytes(b"PK\x03\x04 torn")  # the write the kill interrupted
    done = run(s, wd)
    assert done.resumed_from == 20
    np.testing.assert_array_equal(load_trajectory(wd)["step"], np.arange(30))
    assert sorted(os.listdir(parts)) == [f"part_{a:09d}.npz" for a in (0, 10, 20)]
    assert [r["step"] for r in _rows(wd)] == sorted({r["step"] for r in _rows(wd)})


def test_new_run_killed_while_writing_its_config_starts_again(tmp_path):
    """A kill between ``config.json.tmp`` and its rename leaves a directory holding only that file: the same
    command starts the run there (it is not refused as a foreign directory); any other file is still refused."""
    from helpers import tiny_settings

    s = tiny_settings(steps=10)
    wd = tmp_path / "r"
    wd.mkdir()
    (wd / "config.json.tmp").write_text('{"name": "tin')  # torn
    done = run(s, str(wd))
    assert done.steps_done == 10 and json.loads((wd / "config.json").read_text()) == s.to_dict()
    assert not (wd / "config.json.tmp").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json.tmp").write_text("{}")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="no config.json"):
        run(s, str(other))


def test_resume_with_other_checkpoint_keep_and_enabled(tmp_path):
    """``checkpoint.keep`` and ``checkpoint.enabled`` change neither the trajectory nor the rows: a resume with
    other values runs (it used to be refused as another config), records them in config.json, and ends with
    the trajectory and rows of an uninterrupted run; keys that change what is computed are still refused."""
    from helpers import tiny_settings

    s = tiny_settings(40, **{"checkpoint.keep": 3})
    ref = run(s, str(tmp_path / "ref"))
    wd = str(tmp_path / "r")
    run(s, wd, max_chunks=3)
    assert checkpoint_steps(wd) == [10, 20, 30]
    s1 = tiny_settings(40, **{"checkpoint.keep": 1})
    done = run(s1, wd)
    assert done.resumed_from == 30 and checkpoint_steps(wd) == [40]
    assert json.load(open(os.path.join(wd, "config.json"))) == json.loads(json.dumps(s1.to_dict()))
    for k in ref.trajectory:
        np.testing.assert_array_equal(done.trajectory[k], ref.trajectory[k], err_msg=k)  # bitwise
    assert _rows(wd) == _rows(str(tmp_path / "ref"))

    # without checkpoints: an unfinished run restarts from step 0 (same steps, same rows); a finished one
    # computes nothing and keeps its record
    wd2 = str(tmp_path / "r2")
    run(s, wd2, max_chunks=2)
    off = tiny_settings(40, **{"checkpoint.keep": 3, "checkpoint.enabled": False})
    done = run(off, wd2)
    assert done.resumed_from == 0
    assert json.load(open(os.path.join(wd2, "config.json")))["checkpoint"]["enabled"] is False
    for k in ref.trajectory:
        np.testing.assert_array_equal(done.trajectory[k], ref.trajectory[k], err_msg=k)
    assert _rows(wd2) == _rows(str(tmp_path / "ref"))
    record = json.load(open(os.path.join(wd2, "run.json")))
    again = run(off, wd2)
    assert again.steps_done == 40 and json.load(open(os.path.join(wd2, "run.json"))) == record
    assert _rows(wd2) == _rows(str(tmp_path / "ref"))

    for key, value in (("checkpoint.every", 20), ("logging.every", 7)):
        with pytest.raises(RunDirError, match=key.replace(".", r"\.")):
            run(tiny_settings(40, **{"checkpoint.keep": 3, key: value}), wd)


def test_finished_run_again_without_plots_keeps_them(tmp_path):
    """A finished run run again with ``logging.plots=False`` keeps the plots an earlier call drew (it used to
    delete plots/); a run that computes more steps removes plots that describe its shorter trajectory."""
    from helpers import tiny_settings
    from quotient_sgd.runner import report

    wd = tmp_path / "r"
    run(tiny_settings(20, **{"logging.plots": True}), str(wd))
    plots = {p.name: p.read_bytes() for p in (wd / "plots").iterdir()}
    assert "loss.png" in plots
    run(tiny_settings(20), str(wd))
    assert {p.name: p.read_bytes() for p in (wd / "plots").iterdir()} == plots
    assert "plots/loss.png" in (wd / "summary.md").read_text()
    assert json.load(open(wd / "config.json"))["logging"]["plots"] is False

    part = tmp_path / "part"
    run(tiny_settings(20), str(part), max_chunks=1)
    report(str(part))  # the plots of the first 10 steps
    assert (part / "plots" / "loss.png").exists()
    run(tiny_settings(20), str(part))
    assert not (part / "plots").exists()


def test_resume_over_a_half_deleted_old_checkpoint(tmp_path, caplog):
    """A kill while orbax deletes a checkpoint beyond ``keep`` (file by file, after finalising a newer one) leaves
    part of that step's directory: the resume removes it quietly (orbax used to log "Metadata file does not
    exist" for it), resumes from the newest step and ends with the trajectory and rows of an uninterrupted run."""
    import logging
    import shutil
    import warnings

    from helpers import tiny_settings

    s = tiny_settings(40)
    wd = str(tmp_path / "r")
    run(s, wd, max_chunks=3)
    ck = os.path.join(wd, "checkpoints")
    assert checkpoint_steps(wd) == [20, 30]
    for step, lost in ((10, "_CHECKPOINT_METADATA"), (0, "default")):  # what two interrupted deletions leave
        shutil.copytree(os.path.join(ck, "20"), os.path.join(ck, str(step)))
        shutil.rmtree(os.path.join(ck, str(step), lost)) if lost == "default" else \
            os.remove(os.path.join(ck, str(step), lost))
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = run(s, wd)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert done.resumed_from == 30 and sorted(os.listdir(ck)) == ["30", "40"]
    ref = run(s, str(tmp_path / "ref"))
    for k in ref.trajectory:
        np.testing.assert_array_equal(done.trajectory[k], ref.trajectory[k], err_msg=k)
    assert _rows(wd) == _rows(str(tmp_path / "ref"))
