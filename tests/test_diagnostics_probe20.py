"""Diagnostics: inputs the earlier tests do not reach (learning rates given to the per-kind detectors, ...)."""

import numpy as np
import pytest

from quotient_sgd import diagnostics as D


@pytest.mark.parametrize("bad", [-0.1, np.inf, np.nan])
def test_public_detectors_check_a_float64_learning_rate_per_row_as_detect_does(bad):
    """A float64 array of one learning rate per row went to the per-kind detector unchecked (the form in which
    ``detect`` hands over what it has checked): ``detect_edge_of_stability(lr=np.full(n, -0.1))`` on a sharpness
    of -30 gave four events of strength 3.0 = (-0.1) * (-30), where ``detect`` and the same values in float32 are
    refused.  Every public detector that reads ``lr`` now refuses it by its own name, and a valid float64 array
    gives the events of the number it repeats."""
    n = 12
    traj = {"loss": np.linspace(1.0, 0.5, n), "sharpness_quotient": np.full(n, -30.0),
            "sharpness_horizontal": np.full(n, -30.0), "fold_number": np.linspace(0.0, 2.5, n)}
    steps = np.arange(n)
    lr64 = np.full(n, bad, np.float64)
    with pytest.raises(ValueError, match="lr"):
        D.detect(traj, lr=lr64)
    for fn, kw in ((D.detect_edge_of_stability, {}), (D.detect_fold, {"weight_decay": 0.1}),
                   (D.detect_shock, {"slice_shocks": [{"step": 3, "shock_time": 0.5}]}), (D.detect_catapult, {})):
        for lr in (lr64, lr64.astype(np.float32)):
            with pytest.raises(ValueError, match=f"{fn.__name__}: lr"):
                fn(traj, steps=steps, lr=lr, **kw)
    # a valid float64 array is taken as it is: the events of the number it repeats, the sharpness read positive
    pos = {**traj, "sharpness_quotient": np.full(n, 30.0), "sharpness_horizontal": np.full(n, 30.0)}
    got = D.detect_edge_of_stability(pos, steps=steps, lr=np.full(n, 0.1))
    assert got and [e.to_dict() for e in got] == [e.to_dict() for e in D.detect_edge_of_stability(pos, steps=steps,
                                                                                                   lr=0.1)]
    assert all(e.strength == pytest.approx(3.0) for e in got)


def test_save_events_refuses_what_is_not_events_and_leaves_no_file(tmp_path):
    """``save_events(path, [e.to_dict()])`` (the dicts an events.json holds) and ``save_events(path, e)`` (one
    event) failed in a bare ``'dict' object has no attribute 'to_dict'`` / ``'Event' object is not iterable``
    after opening ``path + ".tmp"``, which stayed beside it.  Both are refused naming ``events`` before anything
    is written; an existing file is left as it was, and a generator of events is written whole."""
    e = D.Event(3, "fold", 1.5, {"fold_number": 1.5}, "step", False, {"level": 1.0})
    path = tmp_path / "events.json"
    D.save_events(path, [e])
    before = path.read_bytes()
    for bad, what in (([e.to_dict()], r"events\[0\] is a dict"), (e, "got a Event"), ([e, None], r"events\[1\]")):
        with pytest.raises(TypeError, match="save_events: .*" + what):
            D.save_events(path, bad)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["events.json"]
        assert path.read_bytes() == before
    D.save_events(path, (x for x in [e, e]))
    assert D.load_events(path) == [e, e]


def test_load_events_refuses_fields_not_as_to_dict_writes_them(tmp_path):
    """``Event.from_dict`` read ``"invariant": "false"`` as ``True`` (the truth of a non-empty string), and
    ``"details": null`` or a list of observables failed in a bare ``TypeError`` that ``load_events`` did not name
    (neither the file nor the entry).  Each field not of the type ``to_dict`` writes is now a ValueError naming the
    file, the entry and the field; what ``to_dict`` writes still reads back to the same event."""
    import json

    base = {"step": 4, "kind": "fold", "strength": "inf"}
    path = tmp_path / "events.json"
    for field, value in (("invariant", "false"), ("details", None), ("observables", [1, 2]), ("kind", 3),
                         ("variant", 1)):
        path.write_text(json.dumps([base, {**base, field: value}]))
        with pytest.raises(ValueError, match=f"entry 1: Event.from_dict: {field}="):
            D.load_events(path)
    e = D.Event(4, "fold", float("inf"), {"fold_number": 2.5}, "step", False, {"level": 2.0, "observable": "x"})
    path.write_text(json.dumps([e.to_dict()]))
    assert D.load_events(path) == [e] and D.load_events(path)[0].invariant is False
