"""Probes of the phase-transition diagnostics: the Hessian fold number, live de-duplication of the Hessian events,
and detection on real training runs (THEORY sections 3-4)."""

import json

import numpy as np

from quotient_sgd.diagnostics import detect, LiveDetector


def _hessian_fold_trajectory(n=100, every=5):
    # fold_number_hessian = lr * lambda_max(horizontal) refreshed every 5 steps (hessian_step), persisting
    # between refreshes as quotient_trajectory records it; it rises through 1 at step 30 and 2 at step 60, while
    # the per-step fold number along the step stays below 1 (curvature along the step < lambda_max)
    steps = np.arange(n)
    refresh = (steps // every) * every
    f = np.interp(refresh, [0, 30, 60, 99], [0.5, 1.0, 2.0, 2.2])
    return {"loss": np.linspace(1.0, 0.5, n), "fold_number": np.full(n, 0.4), "fold_number_hessian": f,
            "hessian_step": refresh.astype(np.int32), "step": steps}


def test_detect_fold_reads_the_hessian_fold_number_at_its_refreshes():
    # detect_fold read only the per-step fold number: a Hessian fold number crossing 1 and 2 gave no event
    traj = _hessian_fold_trajectory()
    events = detect(traj, kinds=["fold"])
    got = sorted((e.step, e.details["level"], e.details["observable"]) for e in events)
    assert got == [(30, 1.0, "fold_number_hessian"), (60, 2.0, "fold_number_hessian")]
    for e in events:
        assert e.variant == "step" and set(e.observables) == {"fold_number_hessian"}
        np.testing.assert_allclose(e.strength, traj["fold_number_hessian"][e.step])
    # the per-step fold number still gives its own events, with no "observable" detail
    traj["fold_number"][80:] = 1.5
    steps = sorted((e.step, e.details.get("observable")) for e in detect(traj, kinds=["fold"]))
    assert (80, None) in steps and (30, "fold_number_hessian") in steps


def test_hessian_and_per_step_events_at_the_same_step_and_level_are_both_kept_live(tmp_path):
    # a fold (and a shock) from the per-step number and from the Hessian at the same step and level had the same
    # Event.key(): live detection kept one of them
    traj = _hessian_fold_trajectory()
    traj["fold_number"] = np.where(np.arange(100) >= 30, 1.2, 0.4)
    traj["shock_number"] = traj["fold_number"].copy()
    traj["shock_number_hessian"] = traj["fold_number_hessian"].copy()
    opts = dict(kinds=["fold", "shock"])
    whole = detect(traj, **opts)
    assert sum(e.step == 30 and e.kind == "fold" for e in whole) == 2
    assert sum(e.step == 30 and e.kind == "shock" for e in whole) == 2
    live = LiveDetector(path=tmp_path / "events.json", **opts)
    for a, b in ((0, 47), (47, 100)):
        live.update({k: v[a:b] for k, v in traj.items()})
    assert len({e.key() for e in whole}) == len(whole)
    key = lambda e: json.dumps(e.to_dict(), sort_keys=True)  # noqa: E731
    assert sorted(map(key, live.events)) == sorted(map(key, whole))
