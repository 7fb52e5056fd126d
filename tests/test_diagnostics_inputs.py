"""Detectors on malformed or unusual trajectories: the ``step`` key, series of another length, non-finite
observables, subsampled trajectories with Hessian refreshes between records, live chunks of single steps."""

import numpy as np
import pytest

from quotient_sgd.diagnostics import LiveDetector, detect, load_events


def _spiky(n=61):
    return np.r_[np.ones(n // 2), [3.0], np.ones(n - n // 2 - 1)]


@pytest.mark.parametrize("step, match", [
    (np.r_[np.arange(31), np.arange(30)], r"step\[30\] = 30 is followed by step\[31\] = 0"),  # a chunk twice
    (np.r_[np.arange(30, 61), np.arange(30)], "strictly increasing"),                        # chunks swapped
    (np.r_[np.arange(30), [29], np.arange(31, 61)], r"step\[29\] = 29 is followed by step\[30\] = 29"),
    (np.arange(61) + 0.5, "integer"),
    (np.r_[np.arange(60.0), np.nan], r"step\[60\] = nan"),
])
def test_steps_that_are_not_strictly_increasing_integers_are_refused(step, match):
    """Repeated or unsorted steps were read as consecutive rows: the spike of the second copy was reported at a
    step of the first, ``2.5`` was truncated to 2 and a NaN step cast to a huge negative number."""
    loss = _spiky()
    assert [e.step for e in detect({"loss": loss, "step": np.arange(61)}, kinds=["loss_spike"])] == [30]
    with pytest.raises(ValueError, match="'step'") as err:
        detect({"loss": loss, "step": step}, kinds=["loss_spike"])
    assert err.match(match)
    with pytest.raises(ValueError, match="start_step=1.5"):
        detect({"loss": loss}, start_step=1.5)


def test_live_chunks_that_repeat_steps_are_refused():
    """A live chunk sent twice (or overlapping the previous one) made a spike out of the repeated rows."""
    live = LiveDetector(kinds=["loss_spike"])
    assert live.update({"loss": np.ones(3), "step": np.arange(3)}) == []
    with pytest.raises(ValueError, match=r"step\[2\] = 2 is followed by step\[3\] = 2"):
        live.update({"loss": np.array([1.0, 5.0, 1.0]), "step": np.arange(2, 5)})


@pytest.mark.parametrize("key, values", [
    ("sharpness_quotient", np.r_[np.full(5, 5.0), np.full(5, 30.0)]),   # a Hessian every 100 steps, 10 rows
    ("fold_number", np.r_[np.full(50, 0.1), np.full(50, 3.0)]),         # every 10 steps, 100 rows
    ("grad_norm_canonical", np.ones(2000)),                             # longer than the loss
    ("sharpness_quotient", np.full((3, 1000), 30.0)),                   # a sweep's members: ignored, no events
])
def test_a_series_with_another_number_of_rows_is_refused_by_name(key, values):
    """A series recorded every K steps as its own short array was read against the loss's first rows: the fold
    crossing at step 500 was reported at step 50, and a short sharpness raised a bare broadcast error."""
    with pytest.raises(ValueError, match=f"'{key}'"):
        detect({"loss": np.linspace(1.0, 0.1, 1000), key: values}, lr=0.1)


def test_an_infinite_sharpness_or_fold_number_crosses_every_level_and_nan_is_still_no_record():
    """``+inf`` (a Hessian or curvature estimate that overflowed) was skipped like a missing record: a sharpness
    jumping to ``inf`` gave no edge-of-stability event and a fold number of ``inf`` no fold event."""
    n = 60
    sharp = np.r_[np.full(30, 1.0), np.full(30, np.inf)]
    sharp[1::2] = np.nan  # refreshed every other step
    traj = {"loss": np.ones(n), "sharpness_quotient": sharp, "fold_number": np.r_[np.full(30, 0.1),
                                                                                   np.full(30, np.inf)]}
    ev = detect(traj, lr=0.1, kinds=["edge_of_stability", "fold"])
    assert [(e.step, e.kind, e.details["level"]) for e in ev] == [
        (30, "edge_of_stability", 1.0), (30, "edge_of_stability", 2.0), (30, "fold", 1.0), (30, "fold", 2.0)]
    assert all(e.strength == np.inf for e in ev)
    traj["sharpness_quotient"] = np.where(np.arange(n) % 2, np.nan, 30.0)  # NaN rows are not below the level
    assert [e.step for e in detect(traj, lr=0.1, kinds=["edge_of_stability"])] == [0, 0]


def test_hessian_refreshes_between_kept_rows_are_read_at_the_next_row():
    """A trajectory kept every 10 steps with a Hessian every 15: a refresh counted only where ``hessian_step``
    equalled a kept step (every 30 steps), so the crossing refreshed at step 495 was reported at 510, from the
    refresh at 510.  It is seen at the next kept row, 500, and the decomposition names the refresh (495)."""
    t = np.arange(1000)
    hs = t // 15 * 15
    sharp = np.where(hs >= 495, 30.0, 5.0)
    full = {"loss": np.ones(1000), "step": t, "sharpness_horizontal": sharp, "sharpness_quotient": sharp / 2,
            "hessian_step": hs}
    kept = {k: v[::10] for k, v in full.items()}
    for traj, step in ((full, 495), (kept, 500)):
        ev = [e for e in detect(traj, lr=0.1, kinds=["edge_of_stability"]) if e.variant == "step"]
        assert [(e.step, e.details["level"], e.details["at_step"]) for e in ev] == [(step, 1.0, 495),
                                                                                   (step, 2.0, 495)]
        assert ev[0].details["gauge_factor"] == 2.0


def test_live_detector_fed_one_step_at_a_time_as_scalars_or_rows_gives_the_whole_runs_events():
    """A training loop handing over each step's numbers as scalars (``{"loss": 0.3}``) failed with "zero-dimensional
    arrays cannot be concatenated"; one-row chunks and scalar chunks now give the events of one ``detect`` call."""
    n = 120
    t = np.arange(n)
    traj = {"loss": np.r_[np.linspace(1.0, 0.5, 60), [3.0], np.linspace(0.5, 0.2, 59)],
            "sharpness_quotient": np.where(t % 10 == 0, np.where(t < 50, 5.0, 30.0), np.nan),
            "fold_number": np.linspace(0.0, 2.5, n), "hessian_top_quotient": np.ones((n, 3)), "step": t + 7}
    full = detect(traj, lr=0.1, horizon=n)
    assert {e.kind for e in full} >= {"loss_spike", "edge_of_stability", "fold"}
    for one in (lambda i: {k: v[i] for k, v in traj.items()}, lambda i: {k: v[i:i + 1] for k, v in traj.items()}):
        live = LiveDetector(lr=0.1, horizon=n)
        got = [e for i in range(n) for e in live.update(one(i))]
        assert sorted(e.key() for e in got) == sorted(e.key() for e in full)
    with pytest.raises(ValueError, match="start_step"):
        LiveDetector(start_step=0.5)


def _spikes_reference(loss, factor, window):
    """The spike rule step by step: base = min of the finite losses among the previous ``window``."""
    from quotient_sgd.diagnostics._series import above

    out, i, n = [], 1, len(loss)
    while i < n:
        prev = loss[max(0, i - window):i]
        prev = prev[np.isfinite(prev)]
        if prev.size and (not np.isfinite(loss[i]) or above(loss[i], prev.min(), factor)):
            base, j, peak = float(prev.min()), i, i
            while j < n and (not np.isfinite(loss[j]) or above(loss[j], base, factor)) and j - peak <= window:
                if not np.isfinite(loss[j]) or (np.isfinite(loss[peak]) and loss[j] > loss[peak]):
                    peak = j
                j += 1
            out.append((i, min(j, n - 1), peak, base))
            i = j + 1
        else:
            i += 1
    return out


def test_loss_spikes_and_divergence_are_linear_time_and_equal_the_step_by_step_rule():
    """Both detectors took a Python step per record (30 ms per ``detect`` at 2000 steps, so a live detector fed one
    step at a time took 40 s over 2000 steps); they visit only candidate onsets now, with the same events."""
    import time

    from quotient_sgd.diagnostics._series import spikes

    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(0, 150))
        loss = np.exp(rng.uniform(0, 2) * rng.standard_normal(n))
        if rng.random() < 0.5:
            loss = rng.uniform(-1, 3) - loss  # signed losses
        loss[rng.integers(0, max(n, 1), int(rng.integers(0, 4)))[:n]] = rng.choice([np.nan, np.inf, -np.inf, 1e3])
        factor, window = float(rng.uniform(1.05, 4.0)), int(rng.integers(1, 80))
        assert spikes(loss, factor, window) == _spikes_reference(loss, factor, window)
        patience = int(rng.integers(1, 30))
        high = np.r_[np.zeros(5), np.ones(patience), np.zeros(3), 1e3 * np.ones(patience + 1)] + 1.0
        (ev,) = detect({"loss": high}, kinds=["divergence"], divergence_patience=patience)
        assert ev.step == 5 + patience + 3  # the first run of ``patience`` steps above 100 x the initial loss
    n = 300_000
    loss = np.exp(-np.arange(n) / 1e5 + 0.05 * rng.standard_normal(n))
    t0 = time.perf_counter()
    assert detect({"loss": loss}, kinds=["loss_spike", "divergence"]) == []
    assert time.perf_counter() - t0 < 1.0  # 0.03 s; 1.4 s step by step


def test_detect_run_on_a_sweep_or_unfinished_directory_says_what_it_is(tmp_path):
    """A sweep's root (``sweep.json``, members under ``members/``) or a run without ``trajectory.npz`` gave numpy's
    bare "No such file or directory"."""
    from quotient_sgd.diagnostics import detect_run

    (tmp_path / "sweep.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="sweep directory.*members"):
        detect_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="run_dir=.*does not exist"):
        detect_run(tmp_path / "members")


def test_hessian_keys_first_recorded_in_a_later_live_chunk_are_read_without_a_cast_warning():
    """``hessian_step`` missing from the first chunk was filled with NaN and cast to int64 (RuntimeWarning, and
    the row number of a NaN is arbitrary); it is ``-1`` there, the value before the first refresh."""
    import warnings

    live = LiveDetector(lr=0.1, kinds=["edge_of_stability"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert live.update({"loss": np.ones(20), "step": np.arange(20)}) == []
        new = live.update({"loss": np.ones(20), "step": np.arange(20, 40),
                           "sharpness_horizontal": np.r_[np.full(10, 15.0), np.full(10, 25.0)],
                           "hessian_step": np.r_[np.full(10, 20), np.full(10, 30)]})
        assert [(e.step, e.details["level"], e.details["at_step"]) for e in new] == [(20, 1.0, 20), (30, 2.0, 30)]
        traj = {"loss": np.ones(4), "sharpness_quotient": np.full(4, 30.0), "hessian_step": [np.nan, 1, 1, 3]}
        assert [e.step for e in detect(traj, lr=0.1, kinds=["edge_of_stability"])] == [1, 1]


def test_live_detector_writes_its_events_into_a_directory_not_made_yet(tmp_path):
    """``LiveDetector(path="runs/my_run/events.json")`` (the README's example) raised FileNotFoundError at the
    first chunk when ``runs/my_run`` did not exist; the directory is now made with the detector."""
    path = tmp_path / "runs" / "my_run" / "events.json"
    live = LiveDetector(kinds=["loss_spike"], path=path)
    new = live.update({"loss": _spiky()})
    assert [e.step for e in new] == [30]
    assert [e.to_dict() for e in load_events(path)] == [e.to_dict() for e in new]
