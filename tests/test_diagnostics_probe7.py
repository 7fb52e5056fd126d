"""Diagnostics: live detection against offline detection, synthetic series with known answers."""

import numpy as np

from quotient_sgd.diagnostics import detect, LiveDetector


def _events(evs):
    return [(e.step, e.kind, e.variant, round(e.strength, 12)) for e in evs]


def test_live_chunks_with_a_learning_rate_given_once_give_the_offline_events():
    # detect takes a run's constant learning rate stored once (a 0-d 'lr' key); a live chunk holding one failed in
    # NumPy's bare "zero-dimensional arrays cannot be concatenated" (and was dropped). It now holds for each row of
    # its chunk, and the events are those of detect on the whole trajectory.
    n = 200
    sharp = 5.0 + 20.0 * np.linspace(0.0, 1.0, n)  # eta * lambda crosses 1 at row 50 and 2 at row 150
    loss = np.exp(-0.01 * np.arange(n))
    offline = detect({"loss": loss, "lr": np.float64(0.1), "sharpness_raw": sharp}, horizon=n)
    assert [(e.step, e.kind) for e in offline] == [(50, "edge_of_stability"), (150, "edge_of_stability")]
    for key in ("lr", "learning_rate"):
        live = LiveDetector(horizon=n)
        got = []
        for a, b in ((0, 70), (70, 130), (130, n)):
            got += live.update({"loss": loss[a:b], key: 0.1, "sharpness_raw": sharp[a:b]})
        assert _events(got) == _events(offline) == _events(live.events)
    # a schedule given per chunk as a number (a step decay): each chunk's rows take its own value
    live = LiveDetector(horizon=n)
    for a, b, lr in ((0, 100, 0.1), (100, n, 0.05)):
        live.update({"loss": loss[a:b], "lr": lr, "sharpness_raw": sharp[a:b]})
    lrs = np.r_[np.full(100, 0.1), np.full(n - 100, 0.05)]
    assert _events(live.events) == _events(detect({"loss": loss, "lr": lrs, "sharpness_raw": sharp}, horizon=n))
