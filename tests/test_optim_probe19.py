"""flatten_trajectory: names that two entries share are refused, not overwritten."""

import numpy as np
import pytest

from quotient_sgd.optim import flatten_trajectory


def test_two_entries_flattening_to_one_name_are_refused_naming_both_paths():
    """A key ``"a/b"`` beside ``{"a": {"b": ...}}`` both flatten to ``"a/b"``: the first entry was dropped silently
    (one array where the trajectory held two); now refused naming both paths, and another ``sep`` keeps both."""
    one, two = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match=r"\['a/b'\] and \['a', 'b'\].*sep='/'"):
        flatten_trajectory({"a/b": one, "a": {"b": two}})
    with pytest.raises(ValueError, match="both flatten"):
        flatten_trajectory({"aux": {"0": one}, "aux/0": two})
    flat = flatten_trajectory({"a/b": one, "a": {"b": two}}, sep=".")
    assert set(flat) == {"a/b", "a.b"} and flat["a/b"] is one and flat["a.b"] is two
    # the usual shapes are unchanged: nested dicts, tuples (aux), None left out, order kept
    flat = flatten_trajectory({"loss": one, "charges": {"rescale/norms.0": two}, "aux": (one, None, two)})
    assert list(flat) == ["loss", "charges/rescale/norms.0", "aux/0", "aux/2"]
