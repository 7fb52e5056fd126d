"""Test configuration: 8 CPU devices, strict dtype/rank promotion, float64 on request."""

import os

# the CLI's persistent compilation cache stays off in tests (each test compiles what it checks; concurrent
# workers would share one directory); tests/test_cli_run.py turns it on in its own directory
os.environ["QSGD_COMPILATION_CACHE"] = "off"

import quotient_sgd  # noqa: E402,F401  (sets XLA_FLAGS before the backend starts; see quotient_sgd/__init__.py)
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test body with float64 enabled (``jax.enable_x64``)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def getkey():
    """A fresh PRNG key per call: ``k = getkey()``."""
    counter = iter(range(10**9))

    def _get():
        return jax.random.key(next(counter))

    return _get
