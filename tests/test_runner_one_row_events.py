"""A run of one recorded step: the events the runner writes are those ``detect_run`` re-detects (the runner skipped
detection below two rows, so a step-0 edge of stability was missing from its events.json and ``detect_run`` then
rewrote the file with it)."""

import json

import numpy as np

from quotient_sgd.diagnostics import detect_run
from quotient_sgd.runner._report import detect_events

from helpers import tiny_settings


def _one_row(lr):
    # eta * lambda = 2.5 at step 0: past both levels of gradient descent's edge (1 and 2)
    return {"step": np.array([0]), "loss": np.array([1.0]), "sharpness_horizontal": np.array([2.5 / lr]),
            "hessian_step": np.array([0], np.int32)}


def test_one_row_run_events_are_detected_and_equal_detect_run(tmp_path):
    s = tiny_settings(1, **{"optim.name": "sgd", "optim.lr": 0.1})
    traj = _one_row(0.1)
    events, err = detect_events(s, traj, None)
    assert err is None
    assert [(e["step"], e["kind"]) for e in events if e["kind"] == "edge_of_stability"], events
    np.savez(tmp_path / "trajectory.npz", **traj)
    (tmp_path / "config.json").write_text(json.dumps(s.to_dict()))
    again = [e.to_dict() for e in detect_run(tmp_path, write=False)]
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(events))
