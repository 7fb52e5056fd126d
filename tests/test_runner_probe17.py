"""Probe 17: sweeps, runs and the CLI: a sweep member's lost chunk-end evaluation computed again, and defects of
the command line and of run directories."""

import json
import os
import warnings

import jax
import numpy as np
import pytest

from helpers import assert_sweeps_bitwise, checkpoint_steps, load_metric_rows, tiny_settings
from quotient_sgd.runner import sweep


def _drop_rows(member_dir: str, steps) -> None:
    path = os.path.join(member_dir, "metrics.jsonl")
    with open(path) as f:
        lines = f.readlines()
    with open(path, "w") as f:
        f.writelines(line for line in lines if json.loads(line)["step"] not in steps)


# ---- the evaluation of a sweep member's lost chunk-end row ------------------------------------------------------
def test_sweep_member_lost_chunk_end_rows_get_their_evaluation_back(tmp_path, monkeypatch):
    """A sweep stopped after its checkpoint of step 40 whose members' ``metrics.jsonl`` lack chunk-end rows before
    it (a hand edit, a faulty file system): the resume rewrote them from the trajectory parts without their
    evaluation (``test_loss``, ``train_loss``), which a member computes inside the grouped program, saying it
    could not be computed again.  It is computed again from the groups' state at that step, in the grouping of the
    chunk that ended there (one member at a time, then all three vmapped from step 10): step 9 replayed from the
    initial state, step 19 replayed through the sweep's regrouping, step 29 from the kept checkpoint of step 30,
    step 39 from the restored one of step 40.  Every member's rows and trajectory then equal an uninterrupted
    sweep's bit for bit."""
    from quotient_sgd.runner import _sweep

    monkeypatch.setattr(_sweep, "choose_members_per_device", lambda **kw: (3, {"forced": True}))
    over = {"sweep.lr": (0.05, 0.02, 0.03), "sweep.seed": (0, 1, 2), "sweep.mode": "zip", "checkpoint.keep": 2}
    s = tiny_settings(50, **over)
    dev = jax.devices()[:1]
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "sw")
    sweep(s, ref, devices=dev)
    part = sweep(s, wd, devices=dev, max_chunks=4)
    assert part.schedule[-1] == {"from_step": 10, "members_per_device": 3}
    assert checkpoint_steps(wd) == [30, 40]
    lost = {0: (9, 19, 29, 39), 1: (19,), 2: (5, 29)}
    for i, steps in lost.items():
        _drop_rows(os.path.join(wd, "members", f"{i:03d}"), steps)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sweep(s, wd, devices=dev)
    said = [str(w.message) for w in caught if "lacks the rows" in str(w.message)]
    assert len(said) == 3, said
    assert not any("without the evaluation" in m for m in said), said
    assert any("computed again from the state its chunk ended at" in m and "[9, 19, 29, 39]" in m for m in said), said
    for i in range(3):  # (the chunk-end rows hold an evaluation: what is compared below includes it)
        rows = {r["step"]: r for r in load_metric_rows(os.path.join(ref, "members", f"{i:03d}"))}
        assert all("test_loss" in rows[k] and "train_loss" in rows[k] for k in (9, 19, 29, 39))
    text = " ".join(said)
    assert "steps 0 to 10 replayed from the initial state" in text and "steps 0 to 20 replayed" in text, text
    assert "step 29: the checkpoint of step 30" in text and "step 39: the checkpoint of step 40" in text, text
    assert_sweeps_bitwise(wd, ref, 3)


# ---- seeds and learning rates given as JAX numbers and arrays -------------------------------------------------
def test_jax_and_numpy_arrays_are_accepted_as_the_numbers_they_hold(tmp_path):
    """A config file computing its values with JAX or NumPy: ``optim.lr = jnp.float32(0.1)``, ``seed =
    jnp.int32(3)``, ``logging.plots = jnp.bool_(False)``, ``sweep.lr = tuple(jnp.logspace(-3, -1, 3))``,
    ``sweep.seed = jnp.arange(3)``, ``sweep.momentum = np.linspace(0, 0.9, 2)``.  NumPy scalars were accepted
    as the numbers they hold, JAX's 0-d arrays refused ("cannot be casted to type <class 'float'>", "expected a
    float, got ArrayImpl") and so were 1-D arrays for a tuple key.  They validate to the Python values they hold
    (the settings are written to config.json), from a file starting from ``default_config()`` and from one
    building a plain ``ml_collections.ConfigDict``; a JAX bool for a number key is still refused, as a Python bool
    is."""
    import jax.numpy as jnp
    import numpy as np

    from quotient_sgd.config import default_config, load_config, validate

    body = """
def get_config():
    c = {start}
    c.optim.lr = jnp.float32(0.1)
    c.seed = jnp.int32(3)
    c.logging.plots = jnp.bool_(False)
    c.sweep.lr = tuple(jnp.logspace(-3, -1, 3))
    c.sweep.seed = jnp.arange(3)
    c.sweep.momentum = np.linspace(0.0, 0.9, 2)
    c.model.hidden = jnp.array([16, 8])
    return c
"""
    head = "import jax.numpy as jnp\nimport numpy as np\nimport ml_collections\n"
    head += "from quotient_sgd.config import default_config\n"
    want = {("optim", "lr"): float(np.float32(0.1)), ("seed",): 3, ("logging", "plots"): False,
            ("sweep", "lr"): [float(x) for x in np.asarray(jnp.logspace(-3, -1, 3))], ("sweep", "seed"): [0, 1, 2],
            ("sweep", "momentum"): [0.0, 0.9], ("model", "hidden"): [16, 8]}
    for name, start in (("strict", "default_config()"),
                        ("plain", "ml_collections.ConfigDict(default_config().to_dict())")):
        path = tmp_path / f"{name}.py"
        path.write_text(head + body.format(start=start))
        d = validate(load_config(str(path))).to_dict()
        for key, w in want.items():
            got = d[key[0]][key[1]] if len(key) == 2 else d[key[0]]
            assert got == w, (name, key, got)
            for x, y in zip(got if isinstance(w, list) else [got], w if isinstance(w, list) else [w]):
                assert type(x) is type(y), (name, key, got)
        json.dumps(d)  # (config.json)
    c = default_config()
    with pytest.raises(TypeError, match="is a bool"):
        c.optim.lr = jnp.bool_(True)


# ---- a trajectory part that does not load --------------------------------------------------------------------
def _tear(path: str, how: str) -> None:
    if how == "truncated":  # (renamed into place before its data reached the disk)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:  # (its blocks never written)
        with open(path, "wb") as f:
            f.write(b"\0" * 64)


def test_resume_recomputes_a_trajectory_part_that_does_not_load(tmp_path):
    """A run stopped after its checkpoint of step 30 whose trajectory part of steps 10-19 does not load (torn by
    a crash of the machine on a file system that does not honour ``fsync``): the resume computed steps 30-39,
    then failed assembling ``trajectory.npz`` ("File is not a zip file", "pickled (object) data"), and so did
    every later command (the run, finished at its checkpoint, only assembles).  The part counts as missing: the
    run resumes from the checkpoint of step 10, with a warning, and ends as an uninterrupted run, bit for bit."""
    from helpers import load_trajectory
    from quotient_sgd.runner import run

    s = tiny_settings(40, **{"checkpoint.keep": 3})
    ref, wd = run(s, str(tmp_path / "ref")), str(tmp_path / "r")
    run(s, wd, max_chunks=3)
    _tear(os.path.join(wd, "trajectory_parts", f"part_{10:09d}.npz"), "truncated")
    with pytest.warns(RuntimeWarning, match=r"no part of the chunk from step 10 on.*does not load.*checkpoint of "
                                            r"step 10"):
        done = run(s, wd)
    assert done.resumed_from == 10
    traj = load_trajectory(wd)
    assert sorted(traj) == sorted(ref.trajectory)
    for k in traj:
        np.testing.assert_array_equal(traj[k], ref.trajectory[k], err_msg=k)
    assert load_metric_rows(wd) == load_metric_rows(str(tmp_path / "ref"))


def test_sweep_resume_recomputes_a_member_part_that_does_not_load(tmp_path):
    """The same for a member of a sweep (its part zeroed: its blocks never written): the sweep resumes from the
    checkpoint at or before the torn part and ends as the uninterrupted sweep, bit for bit."""
    kw = {"sweep.lr": (0.05, 0.02), "sweep.seed": (0,)}
    s = tiny_settings(40, **kw)
    dev = jax.devices()[:1]
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "sw")
    sweep(s, ref, devices=dev)
    sweep(s, wd, devices=dev, max_chunks=3)
    _tear(os.path.join(wd, "members", "001", "trajectory_parts", f"part_{20:09d}.npz"), "zeroed")
    with pytest.warns(RuntimeWarning, match=r"no trajectory part of the chunk from step 20 on.*does not load"):
        done = sweep(s, wd, devices=dev)
    assert done.resumed_from == 20
    assert_sweeps_bitwise(wd, ref, 2)


# ---- a report drawn while the run finishes ----------------------------------------------------------------------
def test_report_of_a_run_finishing_meanwhile_leaves_the_finished_outputs(tmp_path, monkeypatch):
    """``quotient-sgd report`` on a run still computing reads its unfinished trajectory (20 of 40 steps), then
    draws and writes.  Where the run finished in between (here: while the report draws its plots), the report
    wrote after the run's own outputs: the finished directory was left with ``summary.md`` saying ``steps: 20 of
    40``, the plots of 20 steps (the run has ``logging.plots=False``) and the events of the shorter trajectory.
    The run's finishing now waits for the report, and its outputs are those of an uninterrupted run."""
    import fcntl
    import threading

    from quotient_sgd.runner import _report, report, run

    s = tiny_settings(40)
    wd, ref = str(tmp_path / "r"), str(tmp_path / "ref")
    run(s, ref)
    run(s, wd, max_chunks=2)
    waiting, finished, errors, threads = threading.Event(), threading.Event(), [], []
    real_flock, real_plots = fcntl.flock, _report.make_plots

    def flock(fd, op):  # (a blocking lock the run's thread waits for: the report holds it)
        if op == fcntl.LOCK_EX and threading.current_thread() is not threading.main_thread():
            try:
                return real_flock(fd, op | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting.set()
        return real_flock(fd, op)

    def finish():
        try:
            run(s, wd)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finished.set()

    def make_plots(*args, **kw):
        if threading.current_thread() is threading.main_thread() and not threads:
            threads.append(threading.Thread(target=finish))
            threads[0].start()
            for _ in range(6000):  # (the run ends, or waits for this report)
                if finished.wait(0.01) or waiting.is_set():
                    break
        return real_plots(*args, **kw)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(_report, "make_plots", make_plots)
    text = report(wd)
    threads[0].join()
    assert not errors, errors
    assert "20 of 40" in text  # (the report drew the unfinished run)
    with open(os.path.join(wd, "summary.md")) as f:
        summary = f.read()
    assert "40 of 40" in summary and "20 of 40" not in summary, summary
    assert not os.path.exists(os.path.join(wd, "plots"))  # (logging.plots=False: a finished run keeps none)
    with open(os.path.join(wd, "events.json")) as f, open(os.path.join(ref, "events.json")) as g:
        assert json.load(f) == json.load(g)
