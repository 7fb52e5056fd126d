"""Diagnostics on long runs and real transitions beyond the tested ones: the cost of a run with many events, and
the detectors' input contract on diverged, constant, short, integer and irregularly recorded series."""

import numpy as np

from quotient_sgd.diagnostics import _detect, detect


def _hovering(n: int, oscillating: int) -> dict:
    """``n`` steps at ``lr = 0.1``; the step sharpness alternates 21 / 17 (``lr * lambda`` 2.1 / 1.7: across the
    edge and below its re-arming level 1.8) for the first ``oscillating`` steps, then stays at 10; every step a
    refresh."""
    t = np.arange(n)
    sharp = np.where(t < oscillating, np.where(t % 2 == 0, 21.0, 17.0), 10.0)
    return {"loss": np.exp(-t / n), "sharpness_horizontal": sharp, "sharpness_quotient": sharp,
            "hessian_step": t}


def test_events_of_a_run_hovering_at_the_edge_cost_one_pass_over_the_refreshes(monkeypatch):
    """A long run at the edge of stability crosses its level once every oscillation: each ``step`` event looked up
    the refresh of its decomposition by a pass over the whole run (``fresh_mask``), time quadratic in the run's
    length (100000 steps hovering at the edge: 8.5 s, 200000: 56 s).  The passes no longer grow with the number
    of events, and each event's decomposition is that of its own step's refresh."""
    calls = []
    real = _detect.fresh_mask

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_detect, "fresh_mask", counting)
    passes = {}
    for oscillating in (20, 400):
        calls.clear()
        events = detect(_hovering(600, oscillating), lr=0.1, kinds=["edge_of_stability"])
        step = [e for e in events if e.variant == "step" and e.details["level"] == 2.0]
        assert [e.step for e in step] == list(range(0, oscillating, 2))  # one crossing per oscillation
        for e in step:
            assert e.details["at_step"] == e.step
            assert e.details["lambda_step"] == 21.0 and e.details["lambda_canonical"] == 21.0
        passes[oscillating] = len(calls)
    assert passes[400] == passes[20], passes
