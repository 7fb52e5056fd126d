"""Probe of the symmetry groups and models: verify on low-precision models, and further cases of the group
laws, canonical points and projections on model families beyond the shipped cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import CNN, MLP, DeepLinear, MeanField
from quotient_sgd.symmetry import Product, Rescale, SymmetryError, verify


def test_verify_reports_a_false_rescale_of_a_bfloat16_model():
    """The rounding allowance of ``verify`` was 16 epsilons of the outputs' dtype, 12.5% in bfloat16: a rescale
    forced onto a bfloat16 tanh MLP changed the outputs by 5-12% at ``scale=0.1`` (the element's exact round trip by
    0.4%) and passed.  Reordered sums are accumulated in float32 and rounded once, so the allowance is now at most
    two epsilons of bfloat16; the same model's true symmetries still pass at ``rtol=0``."""
    x = jax.random.normal(jax.random.key(0), (16, 3))
    model = MLP(3, (8, 8), 4, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    relu_group = model.symmetries()
    model.activation = "tanh"
    with pytest.raises(SymmetryError, match="'rescale/layers"):
        verify(model, relu_group, x, jax.random.key(1), scale=0.1)
    # the tanh model's own group (permutations only) is a symmetry, to rounding, at any rtol
    assert verify(model, model.symmetries(), x, jax.random.key(1), rtol=0.0) <= 2 * float(jnp.finfo(jnp.bfloat16).eps)


def test_verify_of_a_bfloat16_layernorm_cnn_names_the_scale_that_its_epsilon_breaks():
    """With ``norm_eps=1e-3`` the LayerNorm's scale invariance is broken (not negligible against the variance at
    factors e^-2); in bfloat16 every scale component passed alone within the 12.5% allowance and the whole group's
    element then failed with "each component of 'CNN' is a symmetry but their product is not ... check the
    overlaps", blaming the wrong thing.  The component is named now; a true bfloat16 CNN passes at rtol=0."""
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 2))
    broken = CNN(2, (4, 4), 3, norm="layer", norm_eps=1e-3, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    with pytest.raises(SymmetryError, match="declared action 'scale/convs"):
        verify(broken, broken.symmetries(), x, jax.random.key(1))
    exact = CNN(2, (4, 4), 3, norm="layer", param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert verify(exact, exact.symmetries(), x, jax.random.key(1), rtol=0.0) < 0.05


@pytest.mark.parametrize("make, shape", [
    (lambda: MLP(3, (4,), 2, rngs=nnx.Rngs(0)), (2, 3)),
    (lambda: DeepLinear(3, (4,), 2, rngs=nnx.Rngs(0)), (2, 3)),
    (lambda: MeanField(3, 4, 2, rngs=nnx.Rngs(0)), (2, 3)),
    (lambda: CNN(1, (2,), 2, rngs=nnx.Rngs(0)), (1, 4, 4, 1)),
])
def test_models_refuse_complex_inputs_instead_of_dropping_the_imaginary_part(make, shape):
    """A complex ``x`` was cast to the parameters' dtype with its imaginary part dropped (a ComplexWarning at
    most): ``MeanField(3, 4, 2)(1j * ones)`` returned zeros, ``MLP(...)((1 + 1j) * ones)`` the outputs of
    ``ones``.  A string failed in NumPy's conversion naming neither the model nor ``x``.  Both are named now; real
    inputs (float, integer, bool, nested lists) are cast as before."""
    model = make()
    name = type(model).__name__
    with pytest.raises(ValueError, match=f"{name}: x must hold real numbers.*complex64.*x.imag"):
        model(1j * jnp.ones(shape, jnp.complex64))
    with pytest.raises(ValueError, match=f"{name}: x must hold real numbers"):
        model(np.full(shape, "a"))
    ones = model(jnp.ones(shape, jnp.float32))
    assert bool(jnp.all(model(jnp.ones(shape, jnp.int32)) == ones))
    assert bool(jnp.all(model(jnp.ones(shape, bool).tolist()) == ones))


class _WithAux(nnx.Module):
    """An MLP returning ``(outputs, {"norm": |outputs|})`` or its argmax predictions: a tuple / an int output."""

    def __init__(self, activation, argmax=False):
        self.mlp = MLP(3, (6,), 4, activation=activation, rngs=nnx.Rngs(0))
        self.argmax = argmax

    def __call__(self, x):
        y = self.mlp(x)
        return jnp.argmax(y, axis=-1) if self.argmax else (y, {"norm": jnp.sum(jnp.square(y))})

    def symmetries(self):
        group = MLP(3, (6,), 4, rngs=nnx.Rngs(0)).symmetries()  # relu's: rescale and permutation of the units
        return Product([Rescale(incoming=tuple((("mlp",) + p, a) for p, a in c.incoming),
                                outgoing=tuple((("mlp",) + p, a) for p, a in c.outgoing), name=c.name)
                        for c in group.components if isinstance(c, Rescale)])


def test_verify_compares_a_pytree_of_outputs_and_names_integer_outputs():
    """A model returning a tuple (outputs and an auxiliary dict) failed in ``jnp.abs`` with "absolute requires
    ndarray or scalar arguments, got <class 'tuple'>", and one returning integer predictions with "data type int32
    not inexact".  Every output array is compared now (each relative to its own largest entry): the relu model's
    rescale passes, the tanh model's fails naming it; integer outputs are refused naming the dtype."""
    x = jax.random.normal(jax.random.key(0), (8, 3))
    relu = _WithAux("relu")
    assert verify(relu, relu.symmetries(), x, jax.random.key(1)) < 1e-5
    tanh = _WithAux("tanh")
    with pytest.raises(SymmetryError, match="'rescale/layers.0'"):
        verify(tanh, tanh.symmetries(), x, jax.random.key(1))
    predictions = _WithAux("relu", argmax=True)
    with pytest.raises(ValueError, match="floating-point.*int32"):
        verify(predictions, predictions.symmetries(), x, jax.random.key(1))


def test_verify_names_outputs_that_are_not_finite_before_any_element_is_applied():
    """A NaN in ``x`` or in a parameter made every comparison NaN, and verify answered "inconclusive ... rounding or
    overflow of elements this large swamps the comparison. Use a smaller scale or float64 parameters", advice that
    cannot help.  It now says the outputs at the model's own parameters are not finite, and where."""
    model = MLP(3, (4,), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not finite at its own parameters .x holds NaN"):
        verify(model, model.symmetries(), jnp.ones((4, 3)).at[0, 0].set(jnp.nan), jax.random.key(0))
    model.layers[0].kernel[...] = model.layers[0].kernel[...].at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"not finite .*\('layers', 0, 'kernel'\)"):
        verify(model, model.symmetries(), jnp.ones((4, 3)), jax.random.key(0))


def test_verify_reads_rtol_as_scale_is_read_and_names_itself_for_a_bad_scale():
    """``rtol=jnp.asarray(1e-4)`` (a 0-d array, as ``scale`` takes it) was refused as "rtol must be a number", and a
    negative ``scale`` was refused by the sampler as "sample: scale=-1.0 ..."; the two now behave as documented for
    ``verify``: the array is the number it holds, the bad scale is named by ``verify``."""
    x = jax.random.normal(jax.random.key(0), (8, 3))
    model = MLP(3, (5,), 2, rngs=nnx.Rngs(0))
    group = model.symmetries()
    for rtol in (jnp.asarray(1e-4), np.float32(1e-4), np.asarray(1e-4)):
        assert verify(model, group, x, jax.random.key(1), rtol=rtol) >= 0.0
    for bad in (jnp.asarray([1e-4, 1e-3]), jnp.asarray(True), "1e-4", -1.0):
        with pytest.raises(ValueError, match="verify: rtol must be a number >= 0"):
            verify(model, group, x, jax.random.key(1), rtol=bad)
    with pytest.raises(ValueError, match=r"verify: scale=-1\.0 is not allowed"):
        verify(model, group, x, jax.random.key(1), scale=-1.0)
