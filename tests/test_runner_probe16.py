"""Probe 16: runs, resume and run directories: the evaluation of a lost chunk-end metrics row computed again
from the state its chunk ended at."""

import json
import os
import re
import shutil
import signal
import sys

import numpy as np
import pytest

from helpers import checkpoint_steps, child_xla_flags, kill_after_checkpoint, load_metric_rows, load_trajectory
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _tiny(**over):
    base = {"steps": 100, "logging.plots": False, "checkpoint.every": 10, "observables.names": ("loss", "grad_norm")}
    return {**base, **over}


# ---- defect 1: a lost chunk-end row lost its evaluation where the chunk's start had no kept checkpoint ---------
def test_lost_chunk_end_rows_get_their_evaluation_back_after_a_sigkill(tmp_path):
    """A run with ``checkpoint.keep = 1`` killed (SIGKILL) after its checkpoint of step ``L``, whose
    ``metrics.jsonl`` then lacks rows before ``L`` (a hand edit, a faulty file system): the chunk ends ``19`` and
    ``L - 1`` and the logged step ``5``.  The resume rewrote the chunk ends from the trajectory parts without their
    evaluation (``test_loss``, ``train_loss``), saying it was held in no other file; it is a pure function of the
    state the chunk ended at: the kept checkpoint of ``L`` for ``L - 1``, and a deterministic replay from the
    initial state to step 20 for 19.  Every row then equals an uninterrupted run's, bit for bit, each once."""
    over = _tiny(**{"checkpoint.keep": 1})
    wd, ref = str(tmp_path / "killed"), str(tmp_path / "ref")
    env = dict(os.environ, XLA_FLAGS=child_xla_flags())  # (compiled as this process compiles: compared bitwise)
    cmd = [sys.executable, "-m", "quotient_sgd.cli", "run", f"--config={TINY}", f"--workdir={wd}",
           *(f"--config.{k}={v}" for k, v in over.items())]
    assert kill_after_checkpoint(cmd, env, wd, 30, timeout=300) == -signal.SIGKILL, "finished before the kill"
    last = checkpoint_steps(wd)[-1]
    assert 30 <= last < 100
    for k in checkpoint_steps(wd)[:-1]:  # (keep = 1: what orbax deletes once the newest is finalised, if the kill
        shutil.rmtree(os.path.join(wd, "checkpoints", str(k)))  # came before it did)
    m = os.path.join(wd, "metrics.jsonl")
    with open(m) as f:
        lines = f.readlines()
    lost = (5, 19, last - 1)
    with open(m, "w") as f:
        f.writelines(line for line in lines if json.loads(line)["step"] not in lost)

    s = validate(load_config(TINY, over))
    with pytest.warns(RuntimeWarning, match=r"lacks the rows of steps \[5, 19, %d\]" % (last - 1)) as caught:
        run(s, wd)
    run(s, ref)
    rows, want = load_metric_rows(wd), load_metric_rows(ref)
    assert [r["step"] for r in rows] == [r["step"] for r in want]
    for r, w in zip(rows, want):
        assert r == w, r["step"]
    assert all("test_loss" in want[[w["step"] for w in want].index(k)] for k in (19, last - 1))
    said = " ".join(str(w.message) for w in caught)
    assert re.search(r"with the evaluation \(test_loss, ...\) of steps \[19, %d\] computed again" % (last - 1), said)
    assert "replayed from the initial state" in said and f"the checkpoint of step {last}" in said
    a, b = load_trajectory(wd), load_trajectory(ref)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


# ---- defect 2: a resume restored a checkpoint newer than the trajectory parts ---------------------------------
def test_resume_after_a_command_without_checkpoints_keeps_every_step(tmp_path):
    """A run stopped after its checkpoint of step 30 (rows and parts of steps 0-29, checkpoints 20 and 30), then a
    command with ``checkpoint.enabled=False`` (which starts again from step 0, dropping the parts and rows, and
    keeps the checkpoints) stopped after one chunk, then the run resumed with checkpoints on: it restored the
    stale checkpoint of step 30 and finished with a trajectory of 20 of its 40 steps (steps 10-29 in no file) and
    without their metric rows, blaming "a hand edit or a faulty file system".  It resumes from the step its parts
    reach (here 0) and ends with the trajectory and rows of an uninterrupted run, bit for bit; the message of the
    interrupted command without checkpoints named the stale checkpoint as the one a command with them resumes
    from, and names step 0."""
    from helpers import tiny_settings

    on, off = tiny_settings(40), tiny_settings(40, **{"checkpoint.enabled": False})
    ref = run(on, str(tmp_path / "ref"))
    wd = str(tmp_path / "r")
    run(on, wd, max_chunks=3)
    run(off, wd, max_chunks=1)
    assert checkpoint_steps(wd) == [20, 30]
    # what the interrupted command without checkpoints says a command with them resumes from
    from quotient_sgd.cli import _interrupted

    said = _interrupted(wd, checkpoints=False, every=on.checkpoint.every)
    assert "checkpoint.enabled=True resumes from step 0" in said and "step 30" not in said, said
    with pytest.warns(RuntimeWarning) as caught:
        done = run(on, wd)
    traj = load_trajectory(wd)
    assert traj["step"].tolist() == list(range(40))
    assert done.resumed_from == 0
    assert any(re.search(r"no part of the chunk from step 10 on, before the checkpoint of step 30.*resuming from "
                         r"step 0", str(w.message)) for w in caught)
    assert sorted(traj) == sorted(ref.trajectory)
    for k in traj:
        np.testing.assert_array_equal(traj[k], ref.trajectory[k], err_msg=k)
    assert load_metric_rows(wd) == load_metric_rows(str(tmp_path / "ref"))


def test_sweep_resume_after_a_command_without_checkpoints_keeps_every_step(tmp_path):
    """The same for a sweep (one member diverges at step ~1, the other lives): its members' trajectories lacked
    steps 10-29 after the resume from the stale checkpoint of step 30.  It resumes from step 0 and ends as the
    uninterrupted sweep, bit for bit, the diverged member's record included."""
    import jax

    from helpers import assert_sweeps_bitwise, tiny_settings
    from quotient_sgd.runner import sweep

    kw = {"sweep.lr": (0.05, 500.0), "sweep.seed": (0,)}
    on, off = tiny_settings(40, **kw), tiny_settings(40, **kw, **{"checkpoint.enabled": False})
    dev = jax.devices()[:1]
    sweep(on, str(tmp_path / "ref"), devices=dev)
    wd = str(tmp_path / "sw")
    sweep(on, wd, devices=dev, max_chunks=3)
    sweep(off, wd, devices=dev, max_chunks=1)
    assert checkpoint_steps(wd) == [20, 30]
    with pytest.warns(RuntimeWarning) as caught:
        done = sweep(on, wd, devices=dev)
    assert load_trajectory(done.member_dirs[0])["step"].tolist() == list(range(40))
    assert done.resumed_from == 0 and set(done.diverged) == {1}
    assert_sweeps_bitwise(wd, str(tmp_path / "ref"), 2)
    assert any("no trajectory part of the chunk from step 10 on" in str(w.message) for w in caught)


def test_selected_components_keep_the_model_groups_solver_settings():
    """The run's group (``symmetry.components`` selected from the model's Product) and its gauge group keep the
    model Product's solver settings (they were built with the defaults whatever the model's Product held)."""
    import flax.nnx as nnx

    from quotient_sgd.runner._build import make_model, select_group, solver_settings
    from quotient_sgd.symmetry import Product

    s = validate(load_config(TINY, {}))
    full = make_model(s, nnx.Rngs(0)).symmetries()
    custom = Product(list(full.components), name=full.name, newton=True, newton_iters=7, sweeps=11, dense_max=5)
    picked = select_group(s, custom)
    assert solver_settings(picked) == {"newton": True, "newton_iters": 7, "sweeps": 11, "dense_max": 5}
    assert solver_settings(select_group(s, full)) == solver_settings(full)
