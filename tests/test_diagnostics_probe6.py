"""Diagnostics: argument checks and trajectories of unusual shapes."""

import optax
import pytest

from quotient_sgd.diagnostics import shock_aware_lr


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
