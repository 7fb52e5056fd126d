"""runner.init_params: a seed outside int32 is refused (jax.random.key keeps its low 32 bits: seed 2^32 was seed 0)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.config import load_config, validate
from quotient_sgd.runner import build, init_params

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def _flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(params)])


def test_init_params_refuses_a_seed_beyond_int32_instead_of_aliasing_it():
    """``init_params(b, 2**32, 0.0)`` returned the parameters of seed 0 bit for bit (and ``2**31`` those of
    ``-2**31``): without x64 ``jax.random.key`` keeps a seed's low 32 bits, so distinct seeds of a seed list gave
    identical models, silently.  A seed outside ``[-2^31, 2^31 - 1]`` (the range of ``config.seed``), or one that
    is no integer, is refused naming it; the int32 extremes still give distinct parameters, a traced seed is
    still accepted."""
    b = build(validate(load_config(TINY)))
    for seed in (2**32, 2**31, -(2**31) - 1, np.int64(2**33), 0.5, True):
        with pytest.raises(ValueError, match=r"init_params: seed=.* is not allowed; need an integer in "
                                             r"\[-2\^31, 2\^31 - 1\]"):
            init_params(b, seed, 0.0)
    p = {seed: _flat(init_params(b, seed, 0.0)) for seed in (0, -(2**31), 2**31 - 1)}
    assert not np.array_equal(p[0], p[-(2**31)]) and not np.array_equal(p[0], p[2**31 - 1])
    assert not np.array_equal(p[-(2**31)], p[2**31 - 1])
    traced = jax.jit(lambda s: init_params(b, s, 0.0))(jnp.int32(2**31 - 1))
    np.testing.assert_array_equal(_flat(traced), p[2**31 - 1])


def test_init_params_of_a_negative_seed_under_x64_are_the_runs(x64):
    """With x64 on, ``init_params(b, -1, 0.0)`` keyed ``jax.random.key`` with the int64 ``-1`` (key data
    ``[2^32 - 1, 2^32 - 1]``), while a run of ``seed = -1`` starts from the int32 seed its programs take (``[0,
    2^32 - 1]``): other initial parameters than the run's (differences of ~0.1).  The seed is now taken as that
    int32."""
    from quotient_sgd.runner._chunk import hyper_of, init_program

    s = validate(load_config(TINY))
    b = build(s)
    for seed in (-1, -(2**31), 7):
        ran = init_program(b, False)(jnp.int32(seed), jnp.float32(0), *hyper_of(s))[0]
        # (eager against jitted: equal to float32 rounding; another key gives other draws, differences of ~0.1)
        np.testing.assert_allclose(_flat(init_params(b, seed, 0.0)), _flat(ran), rtol=1e-5, atol=1e-6)
