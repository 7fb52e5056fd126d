"""Diagnostics: argument checks and trajectories of unusual shapes."""

import numpy as np
import optax
import pytest

from quotient_sgd.diagnostics import cusum_threshold, shock_aware_lr
from quotient_sgd.diagnostics._cusum import _max_statistic


@pytest.mark.parametrize("name", ["init_scale", "min_scale", "max_scale"])
def test_a_schedule_given_as_a_scale_is_refused_by_name(name):
    # The targets take schedules, the scales do not: a schedule as min_scale / max_scale failed in a bare "'>' not
    # supported between instances of 'function' and 'float'", as init_scale in "float() argument must be ...".
    with pytest.raises(ValueError, match=rf"shock_aware_lr: {name}=<function .* is not allowed; need a finite "
                                         r"number > 0 \(a number: the scales take no schedule\)"):
        shock_aware_lr(optax.sgd(0.1), **{name: lambda count: 0.5})
    with pytest.raises(ValueError, match=rf"shock_aware_lr: {name}=True is not allowed; need a finite number > 0 "
                                         r"\(a number"):
        shock_aware_lr(optax.sgd(0.1), **{name: True})
    # the targets still take schedules
    shock_aware_lr(optax.sgd(0.1), fold_target=lambda count: 1.5, shock_target=lambda count: 1.0)


def test_cusum_threshold_holds_an_alpha_below_one_over_the_simulation_count():
    # The threshold was the 1 - alpha quantile of num_sims simulated series whatever alpha: below 1 / num_sims that
    # is the largest simulated value or near it, and the achieved false-alarm rate was near 1 / num_sims on average
    # over seeds (1e-4 measured at alpha = 1e-5 with the default 4000; here 4.1e-3 at alpha = 1e-3 with 200).  At
    # least 20 / alpha series are simulated now (measured 1.05e-3).  The rate is measured on 200000 fresh
    # stationary series, independent of the thresholds' seeds.
    n, alpha = 20, 1e-3
    stats = _max_statistic(np.random.default_rng(12345).standard_normal((200000, n)), 0.5, 10, 4.0)
    rates = [float(np.mean(stats > cusum_threshold(n, alpha, num_sims=200, seed=seed))) for seed in range(10)]
    assert np.mean(rates) < 1.5 * alpha, rates
    # the first num_sims series are those of one draw: a threshold that needs no more keeps its value
    first = _max_statistic(np.random.default_rng(0).standard_normal((4000, n)), 0.5, 10, 4.0)
    assert cusum_threshold(n, 0.05) == float(np.quantile(first, 0.95))
