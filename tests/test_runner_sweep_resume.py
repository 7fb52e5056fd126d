"""Sweeps checkpoint every member's state after every chunk and resume like runs: a sweep interrupted at any
moment (a real SIGKILL in the slow test; an interruption between chunks, plus the rows and parts a kill during a
chunk leaves behind, in the fast one) and restarted with the same command ends with the trajectories of an
uninterrupted sweep (bitwise, CPU) and every metric row exactly once; a member that diverged before the
checkpoint stays diverged."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import assert_sweeps_bitwise, checkpoint_steps, kill_after_checkpoint, load_trajectory
from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import RunDirError, report, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _settings(**over):
    c = load_config(TINY)
    c.steps = 40
    c.logging.plots = False
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


@pytest.mark.parametrize("members_per_device", [4, 1])
def test_sweep_resumes_from_its_checkpoint(tmp_path, members_per_device):
    """Four members (seeds 0, 1 x lr 0.05, 500) on one device, batched (4 per device) or one at a time through
    the program of a single run.  Members 1 and 3 diverge (lr 500); member 1 before the checkpoint the sweep
    resumes from."""
    s = _settings(**{"sweep.lr": (0.05, 500.0), "sweep.seed": (0, 1)})
    dev = jax.devices()[:1]
    wd, ref = str(tmp_path / "sw"), str(tmp_path / "ref")
    part = sweep(s, wd, members_per_device=members_per_device, devices=dev, max_chunks=2)
    assert (part.steps_done, part.resumed_from) == (20, 0)
    assert not os.path.exists(os.path.join(wd, "summary.md"))
    assert sorted(int(x) for x in os.listdir(os.path.join(wd, "checkpoints")) if x.isdigit()) == [10, 20]
    assert 1 in part.diverged and part.diverged[1]["step"] < 20
    # its report (before the resume) tells the finished, diverged and unfinished members apart
    table = report(wd)
    assert f"| 001 | 0 | 500.0 | - | - | - | - | diverged at step {part.diverged[1]['step']} |" in table, table
    assert "| 000 | 0 | 0.05 |" in table and "| unfinished (20 of 40 steps) |" in table, table
    assert " ok |" not in table, table
    os.remove(os.path.join(wd, "summary.md"))

    # what a kill during the chunk [20, 30) leaves: that chunk's part files and metric rows, no checkpoint 30
    m0 = os.path.join(wd, "members", "000")
    np.savez(os.path.join(m0, "trajectory_parts", "part_000000020.npz"), loss=np.zeros(10))
    with open(os.path.join(m0, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 20, "loss": -1.0}) + "\n" + '{"step": 25, "lo')  # a torn last line too

    done = sweep(s, wd, members_per_device=members_per_device, devices=dev)
    assert (done.steps_done, done.resumed_from, done.members_per_device) == (40, 20, members_per_device)
    assert sorted(done.diverged) == [1, 3]
    full = sweep(s, ref, members_per_device=members_per_device, devices=dev)
    assert full.diverged == done.diverged
    assert_sweeps_bitwise(wd, ref, 4)
    table = open(os.path.join(wd, "summary.md")).read()
    assert f"diverged at step {done.diverged[1]['step']}" in table and "| 003 |" in table
    assert len(load_trajectory(os.path.join(wd, "members", "000"))["loss"]) == 40

    # the directory now holds this sweep: another config is refused, naming the differing key
    with pytest.raises(RunDirError, match="sweep.lr"):
        sweep(_settings(**{"sweep.lr": (0.05, 0.1), "sweep.seed": (0, 1)}), wd, members_per_device=4, devices=dev)


def test_resume_needs_the_same_devices(tmp_path):
    s = _settings()
    wd = str(tmp_path / "sw")
    sweep(s, wd, members_per_device=1, max_chunks=1)  # 8 members, one per device of 8
    with pytest.raises(RunDirError, match="8 device"):
        sweep(s, wd, devices=jax.devices()[:2])


def _sweep_cmd(workdir):
    env = dict(os.environ, QSGD_NO_MALLOC_TUNING="1")
    env.pop("XLA_FLAGS", None)
    args = [f"--config={TINY}", "--config.steps=300", "--config.checkpoint.every=10", "--config.logging.plots=False",
            "--config.sweep.members_per_device=8"]
    return [sys.executable, "-m", "quotient_sgd.cli", "sweep", *args, f"--workdir={workdir}"], env


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_sweep_resume_after_sigkill_is_bitwise_identical(tmp_path):
    """A real subprocess killed mid-sweep, restarted with the same command, against an uninterrupted sweep; the
    fast version of the same property is test_sweep_resumes_from_its_checkpoint."""
    killed, ref = str(tmp_path / "killed"), str(tmp_path / "ref")
    cmd, env = _sweep_cmd(killed)
    code = kill_after_checkpoint(cmd, env, killed, 30, timeout=240)
    assert code == -signal.SIGKILL, "the sweep finished before it could be killed"
    assert not os.path.exists(os.path.join(killed, "summary.md"))
    last = checkpoint_steps(killed)[-1]
    assert 30 <= last < 300

    _ok(subprocess.run(cmd, env=env, capture_output=True, text=True))
    cmd_ref, _ = _sweep_cmd(ref)
    _ok(subprocess.run(cmd_ref, env=env, capture_output=True, text=True))
    assert_sweeps_bitwise(killed, ref, 8)
    assert json.load(open(os.path.join(killed, "sweep.json")))["members_per_device"] == 8


def test_switch_to_batched_members_after_the_first_chunk(tmp_path, monkeypatch):
    """A sweep that decides to batch after its first chunk regroups the members (one per device -> four per
    device) and equals a sweep batched from the start; killed after the switch, it resumes in the new grouping
    and equals the uninterrupted one bitwise."""
    from quotient_sgd.runner import _sweep

    calls = []

    def choose(**kw):
        calls.append(kw)
        return 4, {"forced": True}

    monkeypatch.setattr(_sweep, "choose_members_per_device", choose)
    s = _settings(**{"sweep.lr": (0.05, 0.1), "sweep.seed": (0, 1)})
    dev = jax.devices()[:1]
    ad, ad2, fixed = str(tmp_path / "adaptive"), str(tmp_path / "adaptive2"), str(tmp_path / "fixed")
    part = sweep(s, ad, devices=dev, max_chunks=3)
    assert part.schedule == [{"from_step": 0, "members_per_device": 1}, {"from_step": 10, "members_per_device": 4}]
    assert len(calls) == 1 and calls[0]["remaining_chunks"] == 3 and calls[0]["groups"] == 4
    done = sweep(s, ad, devices=dev)
    assert (done.resumed_from, done.members_per_device, len(calls)) == (30, 4, 1)  # no second decision
    sweep(s, ad2, devices=dev)
    assert_sweeps_bitwise(ad, ad2, 4)
    sweep(s, fixed, members_per_device=4, devices=dev)
    for i in range(4):
        a, b = (load_trajectory(os.path.join(d, "members", f"{i:03d}")) for d in (ad, fixed))
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"member {i}: {k}")


def test_choose_members_per_device_from_measured_costs():
    from quotient_sgd.runner._sweep import choose_members_per_device as choose

    common = dict(steps_per_chunk=100, groups=16, flop_rate=1e11, max_per_device=16)
    # a step of ~300 us with ~1 us of arithmetic (overhead-bound): a long sweep batches all members ...
    m, info = choose(chunk_s=0.5, compile_s=10.0, remaining_chunks=100, flops=1e5, **common)
    assert m == 16 and info["unamortised_fraction"] < 0.01
    # ... a short one does not pay the compilation of a batched program back
    assert choose(chunk_s=0.5, compile_s=10.0, remaining_chunks=5, flops=1e5, **common)[0] == 1
    # a step that is mostly arithmetic gains nothing from batching, however long the sweep
    assert choose(chunk_s=1.6, compile_s=1.0, remaining_chunks=1000, flops=9e7, **common)[0] == 1
    # in between (60% arithmetic), a quarter of the members per device: more would crowd the caches
    assert choose(chunk_s=1.6, compile_s=1.0, remaining_chunks=1000, flops=6e7, **common)[0] == 4
    assert choose(chunk_s=1.6, compile_s=1.0, remaining_chunks=1000, flops=3e7, **common)[0] == 16


def test_new_sweep_killed_while_recording_starts_again(tmp_path):
    """A new sweep killed while writing ``sweep.json`` leaves only ``sweep.json.tmp``: the same command starts the
    sweep again there; any other entry still makes the directory foreign."""
    s = _settings(**{"steps": 10, "sweep.lr": (0.05, 0.1)})
    wd = tmp_path / "sw"
    wd.mkdir()
    (wd / "sweep.json.tmp").write_text('{"config": {"na')
    res = sweep(s, str(wd), members_per_device=2, devices=jax.devices()[:1])
    assert res.steps_done == 10 and not (wd / "sweep.json.tmp").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "sweep.json.tmp").write_text("{}")
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not empty"):
        sweep(s, str(other), members_per_device=2, devices=jax.devices()[:1])
    assert sorted(os.listdir(other)) == ["notes.txt", "sweep.json.tmp"]


def test_sweep_resume_with_other_checkpoint_keep(tmp_path):
    """A sweep resumed with another ``checkpoint.keep`` runs (it used to be refused as another config), records
    it in sweep.json and every member's config.json, and ends with the trajectories of an uninterrupted sweep."""
    from helpers import tiny_settings

    s = tiny_settings(30, **{"sweep.lr": (0.05, 0.02), "sweep.seed": ()})
    dev = jax.devices()[:1]
    wd, ref = str(tmp_path / "sw"), str(tmp_path / "ref")
    sweep(s, wd, members_per_device=1, devices=dev, max_chunks=2)
    assert checkpoint_steps(wd) == [10, 20]
    s1 = tiny_settings(30, **{"sweep.lr": (0.05, 0.02), "sweep.seed": (), "checkpoint.keep": 1})
    done = sweep(s1, wd, members_per_device=1, devices=dev)
    assert (done.resumed_from, done.steps_done) == (20, 30) and checkpoint_steps(wd) == [30]
    sweep(s, ref, members_per_device=1, devices=dev)
    assert_sweeps_bitwise(wd, ref, 2)
    assert json.load(open(os.path.join(wd, "sweep.json")))["config"]["checkpoint"]["keep"] == 1
    for i in range(2):
        assert json.load(open(os.path.join(wd, "members", f"{i:03d}", "config.json")))["checkpoint"]["keep"] == 1
