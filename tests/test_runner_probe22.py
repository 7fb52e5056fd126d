"""Cases beyond the other tests of configs, data, the command line and run directories (round 22)."""

from __future__ import annotations

import pytest

import quotient_sgd.config._validate as v
from quotient_sgd import data
from quotient_sgd.config import ConfigError, default_config, validate
from quotient_sgd.data import _tasks


# ---- defect 1: absurd data sizes failed in a bare MemoryError (or NumPy's "Maximum allowed size exceeded") ------
@pytest.mark.parametrize("make, arg", [
    (lambda: data.teacher_student(n_train=10**12), "n_train"),
    (lambda: data.teacher_student(teacher_hidden=10**13), "teacher_hidden"),
    (lambda: data.modular_arithmetic(p=10**6), "p"),
    (lambda: data.modular_arithmetic(p=10**30, encoding="tokens"), "p"),
    (lambda: data.sparse_parity(n_bits=10**12), "n_bits"),
    (lambda: data.sparse_parity(n_bits=5, n_train=20, n_test=10**12), "n_test"),
])
def test_absurd_data_sizes_are_refused_naming_the_argument(make, arg):
    """``teacher_student(n_train=10**12)`` raised ``MemoryError: Unable to allocate 58.2 TiB``,
    ``modular_arithmetic(p=10**30)`` NumPy's bare ``ValueError: Maximum allowed size exceeded``: nothing named the
    argument or what is allowed.  Each is now a ``ValueError`` naming the argument and its largest allowed value."""
    with pytest.raises(ValueError, match=rf"{arg}=\d+ is not allowed; .*need an integer <= \d+"):
        make()


def test_the_largest_allowed_size_is_the_boundary(monkeypatch):
    """The value the refusal offers builds (on a machine of 1 MiB, monkeypatched), one more is refused."""
    monkeypatch.setattr(_tasks, "_physical_memory", lambda: 2**20)
    import re

    with pytest.raises(ValueError, match=r"teacher_student: n_train=100000 is not allowed; .*GiB of memory") as e:
        data.teacher_student(n_train=10**5, n_test=4, din=2)
    n = int(re.search(r"need an integer <= (\d+)", str(e.value)).group(1))
    assert _tasks.peak_bytes("teacher_student", n_train=n, n_test=4, din=2, dout=1, teacher_hidden=16) <= 2**20
    assert data.teacher_student(n_train=n, n_test=4, din=2).num_train == n
    with pytest.raises(ValueError, match=rf"n_train={n + 1} is not allowed"):
        data.teacher_student(n_train=n + 1, n_test=4, din=2)


def test_config_counts_the_teacher_weights(monkeypatch):
    """``data.din = data.teacher_hidden = 10^5`` with 2 examples validated (the estimate counted the examples, not
    the teacher's din x teacher_hidden weights, 75 GiB); on a 16 GiB machine it is refused naming data.din."""
    monkeypatch.setattr(v, "physical_memory", lambda: 16 * 2**30)
    c = default_config()
    c.data.name, c.data.din, c.data.teacher_hidden = "teacher_student", 10**5, 10**5
    c.data.n_train, c.data.n_test, c.data.batch_size = 1, 1, 1
    c.model.name, c.model.hidden = "mlp", (4,)
    with pytest.raises(ConfigError, match=r"config\.data\.din = 100000: .*74\.5 GiB to build"):
        validate(c)
    c.data.din = 10   # (2 MiB of teacher weights: accepted)
    validate(c)
