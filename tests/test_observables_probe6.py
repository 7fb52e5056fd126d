"""shock_number / fold_number name a curvature that is no real number; an empty QSGD_EXPERIMENT_OUT is the default."""

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import experiment_script
from quotient_sgd.observables import fold_number, shock_number


@pytest.mark.parametrize("fn", [shock_number, fold_number])
def test_shock_and_fold_numbers_name_a_curvature_that_is_no_real_number(fn):
    """``shock_number(0.1, "x")`` failed in a bare "bad operand type for unary -: 'str'"; ``True`` was taken as 1."""
    for bad in ("x", None, True, jnp.asarray([1 + 1j])):
        with pytest.raises(TypeError, match=f"{fn.__name__}: curvature must be a real number"):
            fn(0.1, bad)
    kappa = np.asarray([-2.0, 0.0, 3.0], np.float32)
    sign = -1.0 if fn is shock_number else 1.0
    np.testing.assert_array_equal(np.asarray(fn(0.1, jnp.asarray(kappa))),
                                  np.float32(0.1) * np.maximum(sign * kappa, 0).astype(np.float32))
    assert float(fn(0.5, -4 if fn is shock_number else 4)) == 2.0  # a Python int curvature


def test_an_empty_experiment_output_variable_is_the_default_directory(monkeypatch, tmp_path):
    """``QSGD_EXPERIMENT_OUT=""`` wrote an experiment's results to ``./<name>/`` of the working directory."""
    C = experiment_script("_common")
    monkeypatch.setattr(C, "__file__", str(tmp_path / "experiments" / "_common.py"))  # the default: beside it
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", "")
    assert C.out_dir("probe_name") == str(tmp_path / "experiments" / "results" / "probe_name")
    assert not (tmp_path / "cwd" / "probe_name").exists()
    monkeypatch.setenv("QSGD_EXPERIMENT_OUT", str(tmp_path / "out"))
    assert C.out_dir("probe_name") == str(tmp_path / "out" / "probe_name")
