"""Sweeps: members per device asked above what a device gets are lowered, and now say so (stderr, sweep.json,
summary.md); a finished sweep run again on another number of devices computes and writes nothing and says it is
finished (it was refused, as an unfinished one still is, whose checkpoints hold the members in the layout of the
devices that wrote them)."""

import json
import os

import jax
import pytest

from helpers import tiny_settings
from quotient_sgd.runner import RunDirError, sweep

TWO = {"sweep.seed": (), "sweep.lr": (0.02, 0.05)}  # two members


def _meta(wd):
    with open(os.path.join(wd, "sweep.json")) as f:
        return json.load(f)


def _summary(wd):
    with open(os.path.join(wd, "summary.md")) as f:
        return f.read()


@pytest.mark.parametrize("how", ["argument", "config"])
def test_members_per_device_above_what_a_device_gets_is_lowered_and_said(tmp_path, capsys, how):
    """Two members on one device with 8 asked for: 2 are used (8 would pad the group with six copies)."""
    over = dict(TWO, **({"sweep.members_per_device": 8} if how == "config" else {}))
    s = tiny_settings(4, **over)
    wd = str(tmp_path / "sw")
    r = sweep(s, wd, members_per_device=8 if how == "argument" else None, devices=jax.devices()[:1], plots=False)
    assert r.members_per_device == 2 and r.steps_done == 4
    source = "the members_per_device argument" if how == "argument" else "sweep.members_per_device"
    said = f"{source} = 8 asks for more members per device than a device gets: 2 member(s) over 1 device(s)"
    err = capsys.readouterr().err
    assert f"quotient-sgd: {said}" in err and "so 2 per device is used" in err, err
    meta = _meta(wd)
    assert meta["members_per_device"] == 2
    assert meta["members_per_device_lowered"] == {"requested": 8, "used": 2, "members": 2, "devices": 1,
                                                  "source": source}
    assert f"- members per device lowered: {said}" in _summary(wd)


def test_members_per_device_lowered_over_several_devices_stays_recorded_on_resume(tmp_path, capsys):
    """Over two devices a device gets one of the two members; the record outlives the resume."""
    s = tiny_settings(20, **TWO)
    wd = str(tmp_path / "sw")
    dev = jax.devices()[:2]
    sweep(s, wd, members_per_device=3, devices=dev, max_chunks=1)
    assert "so 1 per device is used" in capsys.readouterr().err
    done = sweep(s, wd, members_per_device=3, devices=dev)
    assert (done.members_per_device, done.resumed_from, done.steps_done) == (1, 10, 20)
    assert _meta(wd)["members_per_device_lowered"]["requested"] == 3
    assert "members_per_device argument = 3 asks for more" in _summary(wd)


def test_members_per_device_that_fits_says_nothing(tmp_path, capsys):
    s = tiny_settings(4, **TWO)
    wd = str(tmp_path / "sw")
    assert sweep(s, wd, members_per_device=2, devices=jax.devices()[:1], plots=False).members_per_device == 2
    assert "members per device" not in capsys.readouterr().err
    assert "members_per_device_lowered" not in _meta(wd) and "lowered" not in _summary(wd)


def _snapshot(wd):
    """Every file under ``wd``: its bytes and modification time; and every directory."""
    files, dirs = {}, set()
    for root, ds, fs in os.walk(wd):
        dirs.update(os.path.relpath(os.path.join(root, d), wd) for d in ds)
        for name in fs:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                files[os.path.relpath(p, wd)] = (f.read(), os.stat(p).st_mtime_ns)
    return files, dirs


@pytest.mark.parametrize("checkpoints", [True, False])
def test_finished_sweep_run_again_on_other_devices_keeps_its_results(tmp_path, capsys, checkpoints):
    """Computed on two devices, run again on one and on all eight: no error, the same result, every file of the
    sweep and of its members' run directories unchanged (bytes and modification times), and a notice that it is
    finished.  (With checkpoints it was refused; without, it rewrote sweep.json with the new device count.)"""
    s = tiny_settings(4, **TWO, **{"checkpoint.enabled": checkpoints})
    wd = str(tmp_path / "sw")
    first = sweep(s, wd, devices=jax.devices()[:2], plots=False)
    assert first.steps_done == 4 and first.num_devices == 2
    before = _snapshot(wd)
    assert "members/000/trajectory.npz" in before[0] and "summary.md" in before[0]
    capsys.readouterr()
    for dev in (jax.devices()[:1], jax.devices()):
        again = sweep(s, wd, devices=dev, plots=False)
        assert _snapshot(wd) == before
        assert (again.num_members, again.steps_done, again.resumed_from) == (2, 4, 4)
        assert (again.num_devices, again.members_per_device, again.diverged) == (2, 1, {})
        assert again.member_dirs == first.member_dirs and again.schedule == first.schedule
        assert first.wrote and not again.wrote  # (the command then says "kept as it was", not "wrote")
        err = capsys.readouterr().err
        assert f"sweep directory {wd!r} holds a finished sweep, computed with 2 device(s) in 1 process(es)" in err
        assert f"with the {len(dev)} device(s) in 1 process(es) of this call" in err and "nothing was written" in err
    assert _meta(wd)["num_devices"] == 2


def test_finished_sweep_whose_members_all_diverged_on_other_devices(tmp_path):
    """It ended at the checkpoint after the divergences; run again elsewhere it ends there too."""
    s = tiny_settings(20, **{"sweep.seed": (), "sweep.lr": (500.0, 800.0), "checkpoint.every": 5})
    wd = str(tmp_path / "sw")
    first = sweep(s, wd, devices=jax.devices()[:2], plots=False)
    assert sorted(first.diverged) == [0, 1] and first.steps_done < 20
    before = _snapshot(wd)
    again = sweep(s, wd, devices=jax.devices()[:1], plots=False)
    assert _snapshot(wd) == before
    assert again.steps_done == first.steps_done and again.diverged == first.diverged


def test_unfinished_sweep_on_other_devices_is_still_refused(tmp_path):
    """Its checkpoints hold the members in the layout of two devices: resuming on one is refused, naming both."""
    s = tiny_settings(20, **TWO)
    wd = str(tmp_path / "sw")
    sweep(s, wd, devices=jax.devices()[:2], max_chunks=1)
    before = _snapshot(wd)
    with pytest.raises(RunDirError, match=r"was checkpointed with 2 device\(s\) in 1 process\(es\), now 1 in 1"):
        sweep(s, wd, devices=jax.devices()[:1])
    assert _snapshot(wd) == before
