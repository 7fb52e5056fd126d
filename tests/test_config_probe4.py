"""Config validation and data-set estimates: cases beyond the earlier config tests."""

from __future__ import annotations

import tracemalloc

import pytest

from quotient_sgd import data
from quotient_sgd.config import DataSettings
from quotient_sgd.config import _validate as v
from quotient_sgd.data import _tasks


def _measured_peak(make) -> int:
    """The peak of the host memory that ``make()`` allocates, as ``tracemalloc`` traces it (NumPy's buffers
    included), above what was allocated when it started."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = make()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        if started:
            tracemalloc.stop()
    del out
    return peak


@pytest.mark.parametrize("task, sizes", [
    # the hidden layer dominates: x @ W1 and its tanh are held at once (the estimate counted one of them)
    ("teacher_student", dict(n_train=800, n_test=200, din=2, dout=1, teacher_hidden=1000)),
    # the targets dominate: the draws of the teacher's outputs and of the noise, their float32 copy
    ("teacher_student", dict(n_train=1000, n_test=0, din=1, dout=1000, teacher_hidden=1)),
    ("modular_arithmetic", dict(p=300, encoding="tokens")),
])
def test_data_set_memory_estimate_bounds_the_measured_peak(task, sizes):
    """``peak_bytes`` (and validation's ``data_bytes``, the same arithmetic) is what the memory checks compare with
    the machine's memory before a data set is built, so it must not be below what building it takes: a
    teacher-student set of teacher_hidden = 2000 peaked at 2.0 times the estimate (the hidden layer is held twice),
    one of dout = 1500 targets at 1.4 times, the tokens of modular arithmetic at 1.1 times; a config of such a data
    set between the estimate and the machine's memory validated and then ran out of memory building it."""
    gen = _tasks.GENERATORS[task]
    noise = dict(noise=0.1) if task == "teacher_student" else {}
    peak = _measured_peak(lambda: gen(seed=0, **sizes, **noise))
    est = _tasks.peak_bytes(task, **sizes)
    assert peak <= est, (task, sizes, peak, est, peak / est)
    assert est <= 1.6 * peak, (task, sizes, peak, est)  # (an upper bound, not a refusal of what fits)
    # validation counts the same bytes
    if task == "teacher_student":
        d = DataSettings(name=task, **sizes)
        assert v.data_bytes(d, "mlp")[0] == est
    else:
        assert v.data_bytes(DataSettings(name=task, p=sizes["p"]), "transformer")[0] == est


def _offered_fractions(message: str) -> tuple[float, float]:
    import re

    m = re.search(r"use a fraction in \[([^,\]]+), ([^\]]+)\]", message)
    assert m, message
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("p, bad", [(55, 1e-5), (2, 0.1)])
def test_train_fraction_refusal_offers_fractions_that_validate(p, bad):
    """A ``data.train_fraction`` leaving a side of the split empty is refused with the range to use; both ends of
    that range, as written, must split ``p^2`` pairs with one at least on each side (checked by the generator
    itself).  At ``data.p = 113`` the message offered ``[0.000117, 1]`` (an upper end of ``1`` from ``data.p = 55``
    on): 1 is refused."""
    from quotient_sgd.config import ConfigError, default_config, validate

    c = default_config()
    c.model.name, c.model.hidden = "mlp", (4,)
    c.data.name, c.data.p, c.data.batch_size = "modular_arithmetic", p, 0
    c.data.train_fraction = bad
    with pytest.raises(ConfigError, match=r"config\.data\.train_fraction = ") as e:
        validate(c)
    for f in _offered_fractions(str(e.value)):
        ds = data.modular_arithmetic(p=p, train_fraction=f)
        assert ds.num_train >= 1 and ds.num_test >= 1, (p, f)
        c.data.train_fraction = f
        validate(c)

