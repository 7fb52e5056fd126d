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


_SLOW = pytest.mark.slow  # a model's first call compiles its layers: several seconds each


@pytest.mark.parametrize("module", [
    "quotient_sgd.hj._grid", "quotient_sgd.hj._cole_hopf", "quotient_sgd.data._dataset",
    "quotient_sgd.diagnostics._detect", "quotient_sgd.diagnostics._shock_lr", "quotient_sgd.diagnostics._live",
    pytest.param("quotient_sgd.models._mlp", marks=_SLOW), pytest.param("quotient_sgd.models._cnn", marks=_SLOW),
    pytest.param("quotient_sgd.models._transformer", marks=_SLOW),
])
def test_docstring_examples_run_as_written(module):
    # the examples of the public docstrings print what they claim, without a warning
    import doctest
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 0 and result.failed == 0, result


@pytest.mark.parametrize("fn", ["stability_edge", "fold_edge", "fold_levels_for"])
@pytest.mark.parametrize("bad", [dict(momentum=1.0), dict(momentum=1.5), dict(momentum=-0.1),
                                 dict(momentum="0.9"), dict(momentum=0.9, nesterov="yes")])
def test_momentum_edges_refuse_a_momentum_outside_its_range(fn, bad):
    # as adam_edge refuses b1 outside [0, 1) and detect refuses momentum=1.0: beta = 1 is never stable, so the
    # 2 (1 + beta) = 4 that stability_edge(1.0) returned was no edge at all
    from quotient_sgd import diagnostics

    f = getattr(diagnostics, fn)
    args = ((1.0, 2.0),) if fn == "fold_levels_for" else ()
    name = "nesterov" if "nesterov" in bad else "momentum"
    with pytest.raises(ValueError, match=f"{name}="):
        f(*args, **bad)


def test_momentum_edges_keep_their_values_in_range():
    from quotient_sgd import diagnostics

    for b in (0.0, 0.5, 0.9):
        assert diagnostics.stability_edge(b) == pytest.approx(2 * (1 + b))
        assert diagnostics.stability_edge(b, True) == pytest.approx(2 * (1 + b) / (1 + 2 * b))
        assert diagnostics.fold_edge(b) == pytest.approx(1 + b) and diagnostics.fold_edge(b, True) == 1.0
        assert diagnostics.fold_levels_for((1.0, 2.0), b) == pytest.approx([1 + b, 2 * (1 + b)])


def test_divergence_needs_the_loss_high_for_twenty_consecutive_steps():
    # README's detector table: non-finite loss, or loss > 100 x initial for 20 consecutive steps
    import numpy as np

    from quotient_sgd.diagnostics import detect

    def events(n_high):
        loss = np.r_[np.ones(30), np.full(n_high, 500.0), np.ones(30)]
        return [(e.step, e.kind) for e in detect({"loss": loss}, kinds=["divergence"])]

    assert events(19) == []
    assert events(20) == [(30, "divergence")]
    assert [e.step for e in detect({"loss": np.r_[np.ones(5), np.nan]}, kinds=["divergence"])] == [5]
