"""Probe of the models beyond the shipped cases: the mean-field particle measure's helpers given bad arguments."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from quotient_sgd.models import MeanField, mmd, particles


def _sets():
    return (jax.random.normal(jax.random.key(0), (4, 3)), jax.random.normal(jax.random.key(1), (5, 3)))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "wide", True])
def test_mmd_refuses_a_bandwidth_that_is_not_a_positive_number(bad):
    """``bandwidth=0`` returned NaN (``0 / 0`` on the kernel's diagonal) and a negative one was read as its
    absolute value: both are refused, naming the argument."""
    p, q = _sets()
    with pytest.raises(ValueError, match=r"mmd: bandwidth must be a finite number > 0.*got"):
        mmd(p, q, bandwidth=bad)


def test_mmd_checks_the_particle_sets_and_the_flag_but_still_traces():
    p, q = _sets()
    with pytest.raises(ValueError, match=r"mmd: p and q must be particle sets \(n, k\) and \(m, k\).*\(5, 2\)"):
        mmd(p, q[:, :2])
    with pytest.raises(ValueError, match=r"mmd: p and q must be particle sets.*\(3,\)"):
        mmd(p[0], q)
    with pytest.raises(ValueError, match="mmd: squared must be True or False, got 'no'"):
        mmd(p, q, squared="no")  # a truthy string returned MMD^2 where MMD was meant
    with pytest.raises(ValueError, match="particles: balanced must be True or False"):
        particles(MeanField(3, 4, 1, rngs=nnx.Rngs(0)), balanced="no")
    # a traced bandwidth cannot be checked and is not refused: jit and grad over it still work
    traced = jax.jit(lambda b: mmd(p, q, bandwidth=b))(0.5)
    assert float(jnp.abs(traced - mmd(p, q, bandwidth=0.5))) < 1e-6
    assert bool(jnp.isfinite(jax.grad(lambda b: mmd(p, q, bandwidth=b, squared=True))(1.0)))


def test_verify_of_an_evaluation_mode_batchnorm_cnn_says_why_it_fails():
    """A batch-norm CNN in evaluation mode normalises with running statistics, which no parameter action moves:
    verify failed its (training-mode) scale symmetry telling the user to remove it from the model's symmetries.
    It now says that the model is in evaluation mode and what to do; in training mode it passes."""
    from quotient_sgd.models import CNN
    from quotient_sgd.symmetry import SymmetryError, verify

    model = CNN(1, (2,), 2, norm="batch", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    model(x)  # running statistics away from their initial values
    assert verify(model, model.symmetries(), x, jax.random.key(1), num_samples=1) < 1e-4
    model.eval()
    with pytest.raises(SymmetryError, match=r"norms\.0 normalises with running statistics \(evaluation mode\).*"
                                             r"model\.train\(\).*act_on_batch_stats"):
        verify(model, model.symmetries(), x, jax.random.key(1), num_samples=1)
