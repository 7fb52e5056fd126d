"""Probe 17: sweeps, runs and the CLI: a sweep member's lost chunk-end evaluation computed again, and defects of
the command line and of run directories."""

import json
import os
import warnings

import jax

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
