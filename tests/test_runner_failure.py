"""A run or sweep that fails with an exception before its first chunk is written leaves nothing that blocks the
corrected command (what the failed call created is removed); a directory that held a run before is never
touched."""

import json
import os

import jax
import pytest

from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import run, sweep
from quotient_sgd.runner import _run as run_module
from quotient_sgd.runner import _sweep as sweep_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _settings(**over):
    c = load_config(os.path.join(ROOT, "configs", "tiny.py"))
    c.steps = 20
    c.checkpoint.every = 10
    c.logging.plots = False
    c.observables.names = ("loss", "grad_norm", "charges")
    c.sweep.seed = ()
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


def _fail(*args, **kwargs):
    raise RuntimeError("injected failure")


def _snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


def test_run_failing_in_its_first_chunk_leaves_no_directory(tmp_path, monkeypatch):
    wd = str(tmp_path / "r")
    monkeypatch.setattr(run_module, "to_host", _fail)  # the first chunk's outputs never reach the host
    with pytest.raises(RuntimeError, match="injected failure"):
        run(_settings(**{"logging.tensorboard": True}), wd)
    assert not os.path.exists(wd)

    # a directory that existed (empty) is kept, and emptied of what the failed call wrote
    os.makedirs(wd)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(_settings(), wd)
    assert os.path.isdir(wd) and os.listdir(wd) == []

    # the corrected command (another config) runs into the same directory
    monkeypatch.undo()
    res = run(_settings(**{"optim.lr": 0.02}), wd, max_chunks=1)
    assert res.steps_done == 10


def test_failing_resume_leaves_the_run_untouched(tmp_path, monkeypatch):
    wd = str(tmp_path / "r")
    s = _settings()
    run(s, wd, max_chunks=1)
    before = _snapshot(wd)
    assert any(k.startswith("checkpoints") for k in before) and "config.json" in before
    monkeypatch.setattr(run_module, "to_host", _fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        run(s, wd)
    assert _snapshot(wd) == before


def test_sweep_failing_in_its_first_chunk_leaves_no_directory(tmp_path, monkeypatch):
    wd = str(tmp_path / "sw")
    s = _settings(**{"sweep.lr": (0.02, 0.05)})
    monkeypatch.setattr(sweep_module, "flatten_trajectory", _fail)  # writing the first chunk's rows fails
    with pytest.raises(RuntimeError, match="injected failure"):
        sweep(s, wd, devices=jax.devices()[:1])
    assert not os.path.exists(wd)

    monkeypatch.undo()
    res = sweep(s, wd, devices=jax.devices()[:1], max_chunks=1)
    assert res.steps_done == 10
    before = _snapshot(wd)
    monkeypatch.setattr(sweep_module, "flatten_trajectory", _fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        sweep(s, wd, devices=jax.devices()[:1])  # resuming: never removed
    assert _snapshot(wd) == before


def test_a_directory_in_use_is_refused_and_left_alone(tmp_path):
    """While one call writes into a directory (it holds the directory's lock), a second run or sweep of it is
    refused, naming the directory, and changes nothing (two calls used to both append every metric row); once
    the lock is released the same command resumes."""
    import fcntl

    from quotient_sgd.runner import RunDirError

    def lock_directory(d):  # what the call writing into ``d`` holds (another open file description conflicts
        fd = os.open(d, os.O_RDONLY)  # with it as another process's would)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd

    s = _settings()
    wd = str(tmp_path / "r")
    run(s, wd, max_chunks=1)
    before = _snapshot(wd)
    lock = lock_directory(wd)
    try:
        with pytest.raises(RunDirError, match="in use") as e:
            run(s, wd)
        assert wd in str(e.value)
        assert _snapshot(wd) == before
    finally:
        os.close(lock)
    assert run(s, wd).resumed_from == 10

    sw = tmp_path / "sw"
    sw.mkdir()  # a new sweep whose directory another call has just created and locked
    lock = lock_directory(str(sw))
    try:
        with pytest.raises(RunDirError, match="sweep directory .* is in use"):
            sweep(_settings(**{"sweep.lr": (0.02, 0.05)}), str(sw), devices=jax.devices()[:1])
        assert sw.is_dir() and os.listdir(sw) == []
    finally:
        os.close(lock)


def test_run_and_sweep_directories_are_told_apart(tmp_path):
    """``run`` on a sweep directory and ``sweep`` on a run directory are refused, saying what the directory holds
    (they used to call it not a quotient_sgd directory / a directory without sweep.json); nothing is written."""
    from quotient_sgd.runner import RunDirError

    rd, sd = tmp_path / "run", tmp_path / "sw"
    rd.mkdir()
    (rd / "config.json").write_text(json.dumps(_settings().to_dict()))
    sd.mkdir()
    (sd / "sweep.json").write_text("{}")
    (sd / "members").mkdir()
    before = _snapshot(str(tmp_path))
    with pytest.raises(RunDirError, match=r"holds a sweep \(sweep.json\), not a run.*quotient-sgd sweep"):
        run(_settings(), str(sd))
    with pytest.raises(RunDirError, match=r"holds a run \(config.json\), not a sweep.*quotient-sgd run"):
        sweep(_settings(**{"sweep.lr": (0.02, 0.05)}), str(rd), devices=jax.devices()[:1])
    assert _snapshot(str(tmp_path)) == before
