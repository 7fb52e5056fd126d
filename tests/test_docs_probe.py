"""Probes of what README.md and the docstrings promise, each against the code that keeps the promise."""

import pytest

from quotient_sgd import observables


def test_kind_of_reads_the_flattened_keys_of_a_run_directory():
    # trajectory.npz holds "/"-joined keys (README: ``charges/<component>``); each has its observable's kind
    assert observables.kind_of("charges/rescale/layers.0") == observables.kind_of("charges") == "reduced_dynamics"
    assert observables.kind_of("invariant_norms/rescale/layers.0") == "orbit_invariant"
    assert observables.kind_of("sharpness_raw") == "raw"
    with pytest.raises(KeyError, match="no_such_observable"):
        observables.kind_of("no_such_observable/x")
