"""The run directory read and reported at its edges: a sweep reported part-way and resumed without plots, the
last evaluation of a diverged run or member, re-detecting a diverged run's events, the trajectory of an
unfinished or killed run (``load_trajectory``), a file system without locks, a torn ``metrics.jsonl``, the
directories ``report`` and ``detect_run`` are given by mistake, and files fsynced before they are renamed."""

import errno
import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

from helpers import load_metric_rows, tiny_settings
from quotient_sgd.cli import main
from quotient_sgd.diagnostics import detect, detect_run
from quotient_sgd.diagnostics._live import _options_from_config
from quotient_sgd.runner import load_trajectory, report, run, sweep
from quotient_sgd.runner._report import inferred_divergence
from quotient_sgd.runner._rundir import lock_directory, read_metrics, unlock_directory
from quotient_sgd.runner._sweep import report_sweep

#: tiny with momentum 0.9 at lr 1.0 diverges in its second chunk (step 16), after one evaluation (step 9)
DIVERGING = {"optim.lr": 1.0}


def _events(d):
    with open(os.path.join(d, "events.json")) as f:
        return json.load(f)


def _plots(d):
    p = os.path.join(d, "plots")
    return {n: open(os.path.join(p, n), "rb").read() for n in sorted(os.listdir(p))} if os.path.isdir(p) else {}


def _last_eval_step(d):
    return [r["step"] for r in load_metric_rows(d) if "test_loss" in r][-1]


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("div") / "r")
    r = run(tiny_settings(40, **DIVERGING), wd)
    assert r.diverged is not None and r.diverged["step"] > 10, r.diverged  # after the first evaluation
    return wd, r.diverged


# ---- 1. a sweep's plots ------------------------------------------------------------------------------------------
def test_sweep_reported_part_way_then_resumed_without_plots_drops_the_stale_plots(tmp_path):
    """``report`` on an unfinished sweep draws ``plots/`` of its first steps; the sweep resumed with
    ``logging.plots=False`` computes the rest: the stale plots (and table) go, as a run's do.  A finished sweep
    run again without plots keeps the plots a ``report`` drew of it."""
    s = tiny_settings(20, **{"sweep.seed": (), "sweep.lr": (0.02, 0.05)})
    wd = str(tmp_path / "sw")
    dev = jax.devices()[:1]
    sweep(s, wd, members_per_device=1, devices=dev, max_chunks=1)
    assert "unfinished (10 of 20 steps)" in report(wd)
    assert set(_plots(wd)) == {"loss.png", "final.png"}
    done = sweep(s, wd, members_per_device=1, devices=dev)
    assert done.steps_done == 20 and done.resumed_from == 10
    assert _plots(wd) == {}  # (they showed 10 steps; the summary shows 20)
    assert " ok |" in open(os.path.join(wd, "summary.md")).read()

    report(wd)
    drawn = _plots(wd)
    assert set(drawn) == {"loss.png", "final.png"}
    sweep(s, wd, members_per_device=1, devices=dev)  # finished: computes nothing, draws nothing
    assert _plots(wd) == drawn


# ---- 2. the last evaluation of a diverged run ---------------------------------------------------------------------
@pytest.mark.xdist_group("diverged_run")  # one worker builds the module fixture once
def test_diverged_run_summary_gives_the_step_of_its_last_evaluation(diverged_run):
    wd, div = diverged_run
    ev_step = _last_eval_step(wd)
    assert ev_step < div["step"]
    text = open(os.path.join(wd, "summary.md")).read()
    line = [x for x in text.splitlines() if "test_loss=" in x]
    assert line == [f"- last evaluation (step {ev_step}, before the divergence at step {div['step']}): "
                    + line[0].split("): ", 1)[1]], text
    assert "final" not in line[0]


@pytest.fixture(scope="module")
def diverged_sweep(tmp_path_factory):
    """A finished sweep whose member 1 diverged after its first evaluation: ``(directory, settings, result)``."""
    s = tiny_settings(40, **{"sweep.seed": (), "sweep.lr": (0.05, DIVERGING["optim.lr"])})
    wd = str(tmp_path_factory.mktemp("divsweep") / "sw")
    r = sweep(s, wd, members_per_device=1, devices=jax.devices()[:1])
    assert sorted(r.diverged) == [1] and r.diverged[1]["step"] > 10
    return wd, s, r


@pytest.mark.xdist_group("diverged_sweep")  # one worker builds the module fixture once
def test_diverged_sweep_member_row_gives_the_step_of_its_losses(diverged_sweep):
    """The table's losses of a member that diverged after an evaluation are that evaluation's; the row says
    its step (the "eval step" column)."""
    wd, s, r = diverged_sweep
    table = open(os.path.join(wd, "summary.md")).read()
    assert "| member | lr | eval step | train loss | test loss | test acc | status |" in table, table
    for i, status in ((0, "ok"), (1, f"diverged at step {r.diverged[1]['step']}")):
        d = os.path.join(wd, "members", f"{i:03d}")
        rows = [x for x in load_metric_rows(d) if "test_loss" in x]
        last = rows[-1]
        assert (f"| {i:03d} | {s.sweep.lr[i]} | {last['step']} | {last['train_loss']:.4g} | {last['test_loss']:.4g} "
                f"| - | {status} |") in table, table
    assert _last_eval_step(os.path.join(wd, "members", "001")) < r.diverged[1]["step"]
    member = open(os.path.join(wd, "members", "001", "summary.md")).read()
    assert f"before the divergence at step {r.diverged[1]['step']}" in member


# ---- 3. detect_run keeps the runner's divergence ----------------------------------------------------------------
@pytest.mark.xdist_group("diverged_run")  # one worker builds the module fixture once
def test_detect_run_on_a_diverged_run_rewrites_the_runs_own_events(diverged_run, tmp_path):
    """Re-detection gives the run's own events.json: the runner's divergence event with its reason (it was
    replaced by the detector's, without the reason, and the detectors read the non-finite step), once, however
    often it runs; without events.json the divergence comes from run.json."""
    src, div = diverged_run
    wd = str(tmp_path / "r")
    shutil.copytree(src, wd)
    own = _events(wd)
    ended = [e for e in own if e["kind"] == "divergence"]
    assert ended == [{"step": div["step"], "kind": "divergence", "strength": "inf", "observables": {},
                      "variant": "quotient", "invariant": True,
                      "details": {"reason": div["reason"], "ended_run": True}}]
    for _ in range(2):
        got = detect_run(wd)
        assert _events(wd) == own
        assert [e.to_dict() for e in got] == own
    os.remove(os.path.join(wd, "events.json"))
    detect_run(wd)
    assert _events(wd) == own


@pytest.mark.xdist_group("diverged_run")  # one worker builds the module fixture once
def test_detect_run_on_a_member_of_an_unfinished_sweep_keeps_its_divergence(diverged_run, tmp_path):
    """A member that diverged in a sweep not finished yet has its divergence in diverged.json only."""
    src, div = diverged_run
    wd = str(tmp_path / "m")
    shutil.copytree(src, wd)
    own = _events(wd)
    for name in ("run.json", "events.json", "summary.md"):
        os.remove(os.path.join(wd, name))
    with open(os.path.join(wd, "diverged.json"), "w") as f:
        json.dump(div, f)
    detect_run(wd)
    assert _events(wd) == own


# ---- 4. the trajectory of an unfinished or killed run -----------------------------------------------------------
def test_load_trajectory_of_a_killed_run_reads_its_parts(tmp_path):
    """What a kill during the chunk [20, 30) after its part and rows were written, but before checkpoint 30,
    leaves (and a temporary part of a write it interrupted): ``load_trajectory`` joins the parts in step order,
    bitwise the first 30 steps of the uninterrupted run, and says what it read; ``detect_run`` and ``report``
    read it too."""
    s = tiny_settings(40)
    ref, wd = str(tmp_path / "ref"), str(tmp_path / "r")
    full = run(s, ref)
    run(s, wd, max_chunks=3)
    shutil.rmtree(os.path.join(wd, "checkpoints", "30"))  # the checkpoint the kill prevented
    parts = os.path.join(wd, "trajectory_parts")
    with open(os.path.join(parts, "part_000000030.npz.tmp.npz"), "wb") as f:
        f.write(b"PK\x03\x04 torn")
    assert not os.path.exists(os.path.join(wd, "trajectory.npz"))

    traj = load_trajectory(wd)
    assert sorted(traj) == sorted(full.trajectory)
    for k, v in traj.items():
        np.testing.assert_array_equal(v, full.trajectory[k][:30], err_msg=k)
    assert traj.source.startswith("trajectory_parts/ (3 part(s), steps 0 to 29")
    assert "1 part(s) from step 20 on are after the newest checkpoint (step 20)" in traj.source
    assert load_trajectory(ref).source == "trajectory.npz"

    with pytest.warns(RuntimeWarning, match="no trajectory.npz; read trajectory_parts/"):
        events = detect_run(wd, write=False)
    opts = _options_from_config(s.to_dict())
    assert events == detect({k: v[:30] for k, v in full.trajectory.items()}, lr=s.optim.lr, **opts)
    text = report(wd)
    assert "- steps: 30 of 40" in text and "- trajectory read from trajectory_parts/ (3 part(s)" in text
    assert "diverged" not in text  # (its losses are finite)

    # a part a crash of the machine left unreadable ends the trajectory before it, with a warning
    with open(os.path.join(parts, "part_000000020.npz"), "wb") as f:
        f.write(b"PK\x03\x04 torn")
    with pytest.warns(RuntimeWarning, match="part_000000020.npz does not load"):
        assert len(load_trajectory(wd)["loss"]) == 20


def test_load_trajectory_of_a_finished_run_whose_trajectory_npz_does_not_load(tmp_path):
    """A ``trajectory.npz`` that a crash of the machine left incomplete (a file system that ignores fsync): the
    parts it was assembled from are read instead, with a warning (it was a ``BadZipFile`` traceback from
    ``report``)."""
    wd = str(tmp_path / "r")
    full = run(tiny_settings(20), wd)
    with open(os.path.join(wd, "trajectory.npz"), "wb") as f:
        f.write(b"PK\x03\x04 torn")
    with pytest.warns(RuntimeWarning, match="trajectory.npz does not load"):
        traj = load_trajectory(wd)
    assert sorted(traj) == sorted(full.trajectory)
    for k, v in traj.items():
        np.testing.assert_array_equal(v, full.trajectory[k], err_msg=k)
    assert traj.source.startswith("trajectory_parts/ (2 part(s), steps 0 to 19; trajectory.npz does not load")
    with pytest.warns(RuntimeWarning, match="trajectory.npz does not load"):
        assert "- steps: 20 of 20" in report(wd)
    for name in os.listdir(os.path.join(wd, "trajectory_parts")):
        with open(os.path.join(wd, "trajectory_parts", name), "wb") as f:
            f.write(b"PK\x03\x04 torn")
    with pytest.warns(RuntimeWarning) as got:
        assert load_trajectory(wd) == {}
    assert ["trajectory.npz does not load" in str(w.message) for w in got] == [True, False], [str(w.message) for w in got]
    assert "part_000000000.npz does not load" in str(got[1].message)


def test_load_trajectory_of_a_run_without_steps_and_of_what_is_no_run(tmp_path):
    s = tiny_settings(20)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(s.to_dict()))
    traj = load_trajectory(str(tmp_path / "r"))
    assert traj == {} and "before its first chunk" in traj.source
    with pytest.raises(FileNotFoundError, match="no trajectory yet"):
        detect_run(str(tmp_path / "r"))
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_trajectory(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trajectory(str(tmp_path / "nothing"))


def test_report_and_detect_run_on_a_sweep_root_say_what_to_pass(tmp_path, capsys):
    s = tiny_settings(10, **{"sweep.seed": (), "sweep.lr": (0.02, 0.05)})
    wd = str(tmp_path / "sw")
    sweep(s, wd, members_per_device=1, devices=jax.devices()[:1])
    for f in (load_trajectory, detect_run):
        with pytest.raises(FileNotFoundError, match=r"sweep directory.*members.*000"):
            f(wd)
    assert main(["quotient-sgd", "report", wd]) == 0
    assert "| 001 | 0.05 |" in capsys.readouterr().out
    assert len(detect_run(os.path.join(wd, "members", "001"), write=False)) >= 0  # a member is a run


# ---- 5. no locks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_directory_that_cannot_be_locked_is_used_with_one_warning(tmp_path, monkeypatch, code):
    import fcntl

    def refuse(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refuse)
    wd = str(tmp_path / f"nolock{code}")
    os.makedirs(wd)
    with pytest.warns(RuntimeWarning, match=f"{wd}.*cannot be locked .*{errno.errorcode[code]}"):
        assert lock_directory(wd) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per directory
        assert lock_directory(wd) is None
        unlock_directory(None)


def test_run_on_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch):
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    wd = str(tmp_path / "r")
    with pytest.warns(RuntimeWarning, match="used unlocked") as got:
        assert run(tiny_settings(10), wd).steps_done == 10
    assert sum("cannot be locked" in str(w.message) for w in got) == 1


# ---- a torn metrics.jsonl, a missing events.json ------------------------------------------------------------------
def test_torn_metrics_line_is_ignored_with_a_warning(tmp_path, capsys):
    """A run killed while appending its rows: ``report`` (API and CLI) still writes the summary of the complete
    rows and warns about the partial line."""
    s = tiny_settings(20)
    wd = str(tmp_path / "r")
    run(s, wd, max_chunks=1)
    rows = read_metrics(os.path.join(wd, "metrics.jsonl"))
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 10, "loss": 0.4')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl: line 4 is not a complete JSON row.*3 row\(s\) read"):
        assert read_metrics(os.path.join(wd, "metrics.jsonl")) == rows
    with pytest.warns(RuntimeWarning, match="line 4"):
        text = report(wd)
    assert "- steps: 10 of 20" in text
    # (the evaluation of an unfinished run is not its final one)
    assert f"- last evaluation (step 9; 10 of 20 steps recorded): train_loss={rows[-1]['train_loss']:.4g}," in text
    with pytest.warns(RuntimeWarning, match="line 4 is not a complete JSON row"):
        assert main(["quotient-sgd", "report", wd]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "steps: 10 of 20" in out


@pytest.mark.xdist_group("diverged_run")  # one worker builds the module fixture once
def test_report_without_events_json_detects_them_again(diverged_run, tmp_path):
    src, div = diverged_run
    wd = str(tmp_path / "r")
    shutil.copytree(src, wd)
    own = _events(wd)
    os.remove(os.path.join(wd, "events.json"))
    text = report(wd)
    assert _events(wd) == own and f"diverged at step {div['step']}" in text


def test_load_trajectory_of_a_killed_sweep_member_counts_the_sweeps_checkpoints(tmp_path):
    """A sweep member has no checkpoints of its own: a resume restarts from the sweep's
    (``<sweep>/checkpoints``) and drops the member's parts from there on.  ``source`` said every part lay after
    ``step 0 (no checkpoint)``; it names the sweep's newest checkpoint and the parts after it."""
    s = tiny_settings(30, **{"sweep.seed": (), "sweep.lr": (0.02, 0.05)})
    wd = str(tmp_path / "sw")
    sweep(s, wd, members_per_device=1, devices=jax.devices()[:1], max_chunks=2)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10", "20"]
    shutil.rmtree(os.path.join(wd, "checkpoints", "20"))  # a kill after the parts of [10, 20), before its checkpoint
    member = os.path.join(wd, "members", "001")
    assert not os.path.exists(os.path.join(member, "trajectory.npz"))
    traj = load_trajectory(member)
    assert traj.source.startswith("trajectory_parts/ (2 part(s), steps 0 to 19"), traj.source
    assert "1 part(s) from step 10 on are after the sweep's newest checkpoint (step 10)" in traj.source, traj.source
    assert np.array_equal(traj["step"], np.arange(20))


# ---- 6. durable writes ------------------------------------------------------------------------------------------
def test_every_file_renamed_into_a_run_directory_is_fsynced_before_and_its_directory_after(tmp_path, monkeypatch):
    """A crash of the machine after a rename must not leave a renamed but empty or partial file: every file the
    run renames into place (the trajectory parts and ``trajectory.npz`` were not fsynced at all) is fsynced,
    complete (its size then is its size when renamed), before ``os.replace``, and its directory after it."""
    calls = []  # ("fsync", path, size) and ("replace", src, dst, size), in the order they happened
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        st = os.fstat(fd)
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), st.st_size))
        return fsync(fd)

    def recording_replace(src, dst, *a, **k):
        calls.append(("replace", os.path.abspath(src), os.path.abspath(dst), os.stat(src).st_size))
        return replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    wd = os.path.realpath(str(tmp_path / "r"))
    run(tiny_settings(20), wd)
    ckpts = os.path.join(wd, "checkpoints")  # (orbax's own files, written on its threads)
    ours = [i for i, c in enumerate(calls) if c[0] == "replace" and not c[2].startswith(ckpts)]
    renamed = [os.path.relpath(calls[i][2], wd) for i in ours]
    assert sorted(renamed) == ["config.json", "events.json", "run.json", "summary.md", "trajectory.npz",
                               "trajectory_parts/part_000000000.npz", "trajectory_parts/part_000000010.npz"]
    for i, nxt in zip(ours, ours[1:] + [len(calls)]):
        _, src, dst, size = calls[i]
        synced = [c[2] for c in calls[:i] if c[0] == "fsync" and c[1] == src]
        assert synced and synced[-1] == size, (dst, synced, size)  # fsynced, after its last write, before the rename
        assert any(c[0] == "fsync" and c[1] == os.path.dirname(dst) for c in calls[i + 1: nxt]), dst


def test_a_directory_the_file_system_will_not_fsync_is_written_all_the_same(tmp_path, monkeypatch):
    """``fsync`` of a directory fails on some file systems (``EINVAL``), opening one on others: the write goes on."""
    from quotient_sgd._durable import durable_write

    fsync, opener = os.fsync, os.open

    def refuse_directories(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", refuse_directories)
    with durable_write(str(tmp_path / "a.json")) as f:
        f.write("1")
    assert (tmp_path / "a.json").read_text() == "1" and not (tmp_path / "a.json.tmp").exists()

    def no_directories(path, flags, *a, **k):
        if os.path.isdir(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return opener(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_directories)
    with durable_write(str(tmp_path / "a.json")) as f:
        f.write("2")
    assert (tmp_path / "a.json").read_text() == "2"


# ---- 7. a diverged run killed before it recorded its divergence -------------------------------------------------
#: What a diverged run or member records about its divergence (run.json; events.json; a member's diverged.json),
#: and what it writes after them (summary.md, plots/) or just before (trajectory.npz, assembled from the parts)
RECORDS = ("run.json", "events.json", "diverged.json", "summary.md", "plots")


def _kill_before_recording(src, wd, assembled):
    """A copy of the diverged run ``src`` as a kill after the part of the diverging chunk (and its rows), before
    the divergence is recorded, leaves it: without its records and (``assembled=False``) ``trajectory.npz``."""
    shutil.copytree(src, wd)
    for name in RECORDS + (() if assembled else ("trajectory.npz",)):
        p = os.path.join(wd, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _without_reason(events):
    return [{**e, "details": {k: v for k, v in e["details"].items() if k not in ("reason", "inferred")}}
            for e in events]


@pytest.mark.xdist_group("diverged_run")  # one worker builds the module fixture once
@pytest.mark.parametrize("assembled", [False, True])
def test_a_diverged_run_killed_before_recording_it_is_reported_as_diverged(diverged_run, tmp_path, assembled):
    """``report`` and ``detect_run`` read the divergence off the trajectory (first non-finite loss) when the run
    recorded none: the summary has the "diverged at step" line (it had none, and the detectors read the
    non-finite steps), the events are the run's own (same steps and values; the divergence's reason says it was
    inferred), and running the command again recomputes the chunk and records the divergence as the
    uninterrupted run did (the inferred line in summary.md is not taken for a recorded one)."""
    src, div = diverged_run
    own = _events(src)
    recorded_line = [x for x in open(os.path.join(src, "summary.md")).read().splitlines() if "diverged at" in x]
    eval_line = [x for x in open(os.path.join(src, "summary.md")).read().splitlines() if "evaluation" in x]
    wd = str(tmp_path / "r")
    _kill_before_recording(src, wd, assembled)
    inferred = dict(step=div["step"], reason=f"{div['reason']}; inferred from the trajectory: the run did not "
                                             f"record it (it did not finish)", inferred=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (no trajectory.npz: the parts are read)
        text = report(wd)
        got = detect_run(wd, write=False)
    line = [x for x in text.splitlines() if "diverged at" in x]
    assert line == [f"- **diverged at step {div['step']}: {inferred['reason']}** (running the command again "
                    f"records it)"], text
    assert recorded_line == [f"- **diverged at step {div['step']}: {div['reason']}** (run ended cleanly)"]
    assert [x for x in text.splitlines() if "evaluation" in x] == eval_line
    written = _events(wd)
    assert _without_reason(written) == _without_reason(own)
    assert [e["details"] for e in written if e["kind"] == "divergence"] == [
        {"reason": inferred["reason"], "ended_run": True, "inferred": True}]
    assert [e.to_dict() for e in got] == written
    assert inferred_divergence(load_trajectory(wd)) == inferred

    again = run(tiny_settings(40, **DIVERGING), wd)
    assert again.diverged == div and again.resumed_from == 10
    assert _events(wd) == own
    assert [x for x in open(os.path.join(wd, "summary.md")).read().splitlines() if "diverged at" in x] == \
        recorded_line


@pytest.mark.xdist_group("diverged_run")  # one worker builds the module fixture once
def test_a_run_whose_losses_are_finite_has_no_inferred_divergence(diverged_run):
    """Only a non-finite loss is a divergence: the steps of the diverged run before its divergence (whose gradient
    norm is already non-finite at the step before it) have none, nor a trajectory that goes on after a non-finite
    loss (the runner ends a run at its first one: it is not a run's divergence)."""
    src, div = diverged_run
    traj = load_trajectory(src)
    before = {k: v[: div["step"]] for k, v in traj.items()}
    assert not np.isfinite(before["grad_norm"]).all() and np.isfinite(before["loss"]).all()
    assert inferred_divergence(before) is None
    assert inferred_divergence({k: v[:10] for k, v in traj.items()}) is None
    assert inferred_divergence({}) is None
    assert inferred_divergence({k: v[5:] for k, v in traj.items()})["step"] == div["step"]  # (steps from 5)
    goes_on = {k: np.concatenate([v, v[:3]]) for k, v in traj.items()}
    goes_on["step"] = np.arange(len(goes_on["loss"]))
    assert inferred_divergence(goes_on) is None


@pytest.mark.xdist_group("diverged_sweep")  # one worker builds the module fixture once
def test_a_diverged_sweep_member_killed_before_recording_it_is_reported_as_diverged(diverged_sweep, tmp_path):
    """A member killed after its diverging part, before its diverged.json: the sweep table and the member's
    ``report`` / ``detect_run`` give its divergence (the table said "unfinished"), as inferred."""
    src, s, r = diverged_sweep
    div = r.diverged[1]
    wd = str(tmp_path / "sw")
    shutil.copytree(src, wd)
    member = os.path.join(wd, "members", "001")
    own = _events(member)
    shutil.rmtree(member)
    _kill_before_recording(os.path.join(src, "members", "001"), member, assembled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = report_sweep(wd, plots=False)
        got = [e.to_dict() for e in detect_run(member, write=False)]
        text = report(member)
    assert f"| diverged at step {div['step']} (inferred from its trajectory) |" in table, table
    assert " | ok |" in table
    assert f"- **diverged at step {div['step']}: {div['reason']}; inferred from the trajectory" in text
    assert _without_reason(got) == _without_reason(own) == _without_reason(_events(member))
