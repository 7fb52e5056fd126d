"""HJ engine and diagnostics: arguments read as something else, and synthetic cases with known answers."""

import numpy as np
import pytest

from quotient_sgd.diagnostics import cusum, cusum_threshold


def _shifted_series(seed=0, n=100, shift=3.0):
    rng = np.random.default_rng(seed)
    return np.r_[rng.standard_normal(n // 2), shift + rng.standard_normal(n - n // 2)]


def test_cusum_horizon_and_threshold_are_checked_and_a_short_horizon_covers_the_series():
    # A horizon below min_ref (n_blocks=5, or a fraction such as 2.5 truncated to 2) gave an infinite threshold for
    # a series of 100 values: no alarm on a 3-sigma shift, without a word; a NaN threshold never alarmed and one
    # <= 0 alarmed on every value; cusum_threshold(10.5) simulated 10 blocks, none monitored, and returned 0.
    x = _shifted_series()
    default = cusum(x)
    assert default and default[0].direction == 1
    # a horizon shorter than the series is raised to its length: the bound is over the series monitored
    assert cusum(x, n_blocks=5) == cusum(x, n_blocks=len(x)) == default
    assert cusum(x, n_blocks=100.0) == default
    assert cusum(x, threshold=np.inf) == []
    for bad in (2.5, -5, 0, True, "100"):
        with pytest.raises(ValueError, match=f"cusum: n_blocks={bad!r} is not allowed"):
            cusum(x, n_blocks=bad)
    for bad in (np.nan, 0.0, -1.0, "3"):
        with pytest.raises(ValueError, match=f"cusum: threshold={bad!r} is not allowed"):
            cusum(x, threshold=bad)
    for args, name in (((10.5,), "n_blocks"), ((-3,), "n_blocks"), (("100",), "n_blocks"),
                       ((100, True), "alpha"), ((100, 0.05, 0.5, 10, 4.0, 0), "num_sims")):
        with pytest.raises(ValueError, match=f"cusum_threshold: {name}="):
            cusum_threshold(*args)
    assert cusum_threshold(5) == float("inf")  # fewer blocks than min_ref: nothing is monitored
