"""Sweeps across devices: a finished sweep run again computes nothing, whatever checkpoints its directory holds."""

import json
import os

import jax
import numpy as np
import pytest
from helpers import load_trajectory

from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")


def _settings(**over):
    c = load_config(TINY)
    c.steps = 30
    c.logging.plots = False
    c.checkpoint.keep = 5
    for k, v in over.items():
        c.update_from_flattened_dict({k: v})
    return validate(c)


def _wall(wd):
    with open(os.path.join(wd, "sweep.json")) as f:
        return json.load(f)["wall_s"]


def _files(d):
    """Every file under ``d`` with its bytes, but for the checkpoints and the configs (which record the new
    ``checkpoint.enabled``)."""
    out = {}
    for root, _, names in os.walk(d):
        if os.path.join(d, "checkpoints") in root:
            continue
        for f in names:
            if f in ("config.json", "sweep.json"):
                continue
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), d)] = fh.read()
    return out


def test_finished_sweep_with_an_older_checkpoint_computes_nothing(tmp_path):
    """A sweep interrupted after its checkpoint of step 10, then finished with ``checkpoint.enabled=False`` (which
    restarts it from step 0 and leaves the old checkpoint), then run again with checkpoints on: it resumed from
    the stale checkpoint of step 10 and computed steps 10-30 again, rewriting the members' directories and the
    recorded wall time of a sweep that had finished.  Now it computes nothing and changes no file, as it does
    for a finished sweep with its last checkpoint or none (and as ``run`` does)."""
    s = _settings(**{"sweep.lr": (0.05, 500.0), "sweep.seed": (0,)})
    on = s
    off = _settings(**{"sweep.lr": (0.05, 500.0), "sweep.seed": (0,), "checkpoint.enabled": False})
    wd = str(tmp_path / "sw")
    dev = jax.devices()[:2]
    sweep(on, wd, devices=dev, max_chunks=1)  # "interrupted" after the checkpoint of step 10
    done = sweep(off, wd, devices=dev)  # finishes, from step 0 (checkpoints off)
    assert (done.resumed_from, done.steps_done) == (0, 30)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["10"]
    wall = _wall(wd)
    before = _files(wd)
    again = sweep(on, wd, devices=dev)
    assert again.resumed_from == 30, "a finished sweep resumed from an older checkpoint"
    assert again.diverged.keys() == done.diverged.keys() == {1}
    assert _wall(wd) == wall
    assert _files(wd) == before
    # and what it holds is the uninterrupted sweep
    ref = sweep(on, str(tmp_path / "ref"), devices=dev)
    for a, b in zip(again.member_dirs, ref.member_dirs):
        ta, tb = load_trajectory(a), load_trajectory(b)
        assert sorted(ta) == sorted(tb)
        for k in ta:
            np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


@pytest.mark.parametrize("layout", ["run", "sweep"])
def test_interrupt_message_with_checkpoints_off_says_step_0(tmp_path, layout):
    """A command with ``checkpoint.enabled=False`` interrupted in a directory holding an earlier command's
    checkpoint of step 40 said "run the same command to resume from step 40"; the same command starts again from
    step 0 (it reads no checkpoint).  Now the message says so, naming the checkpoint a command with checkpoints
    on resumes from; with checkpoints on it still names that step."""
    from quotient_sgd.cli import _interrupted

    wd = str(tmp_path / layout)
    os.makedirs(os.path.join(wd, "checkpoints", "40"))
    log = os.path.join(wd, "metrics.jsonl") if layout == "run" else os.path.join(wd, "members", "000", "metrics.jsonl")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in range(0, 240, 5))
    off = _interrupted(wd, checkpoints=False)
    assert f"starts {wd} again from step 0" in off and "resume from step 40" not in off, off
    assert "checkpoint.enabled=True resumes from its checkpoint of step 40" in off, off
    on = _interrupted(wd, "terminated (SIGTERM)")
    assert on.startswith("terminated (SIGTERM); ") and on.endswith("resume from step 40"), on
    # without any checkpoint: step 0 either way
    os.rmdir(os.path.join(wd, "checkpoints", "40"))
    assert "again from step 0" in _interrupted(wd, checkpoints=False)
    assert "again from step 0" in _interrupted(wd)
