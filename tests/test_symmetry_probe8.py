"""Probe of the symmetry groups and models: the quotient distance where an orbit's nearest point lies in its
closure only, and the group laws and projections of model families beyond the shipped cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.models import MLP, MeanField, particles
from quotient_sgd.symmetry import Scale, SymmetryError, Word, align, quotient_distance, verify

from helpers import tree_rel_err
from symmetry_cases import mlp_group, mlp_params


@pytest.mark.parametrize("dtype, tilt", [("float64", 0.0085), ("float64", 0.009), ("float32", 0.006)])
def test_quotient_distance_gradient_where_the_nearest_point_is_in_the_orbit_closure(x64, dtype, tilt):
    """A per-channel scale whose channel points slightly away from the other network's (cosine ``-tilt``) is nearest
    it as its factor goes to 0, a point of the orbit's closure only.  The Gauss-Newton fit of the gauge shrank the
    channel by ``e`` a step until the log-factor jumped (-176, then -2e21): ``exp`` flushed the channel to exactly 0
    while the derivative of the step's coefficient ``<w, t> / |w|^2`` overflowed, and ``jax.grad`` of
    ``quotient_distance`` and of ``align`` was NaN (0 times infinity) for these tilts (the first layer of a
    BatchNorm CNN classifier, measured the same way).  The value was right; now the gradient is finite, and in
    float64 equals a central finite difference."""
    dt = jnp.dtype(dtype)
    group = Scale(members=(("w", 1),))
    a = {"w": jnp.asarray([[-tilt, 1.0], [1.0, 0.5]], dt)}
    b = {"w": jnp.asarray([[1.0, 2.0], [0.0, 0.3]], dt)}
    grads = [jax.grad(lambda p: quotient_distance(group, p, b))(a)["w"],
             jax.grad(lambda p: quotient_distance(group, a, p))(b)["w"],
             jax.grad(lambda p: jnp.sum(align(group, a, p)["w"]))(b)["w"]]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads), grads
    if dt == jnp.float64:
        u = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2)), dt)
        h = 1e-6
        for fn, at, g in ((lambda p: quotient_distance(group, {"w": p}, b), a["w"], grads[0]),
                          (lambda p: quotient_distance(group, a, {"w": p}), b["w"], grads[1])):
            fd = (fn(at + h * u) - fn(at - h * u)) / (2 * h)
            assert abs(float(jnp.sum(g * u)) - float(fd)) <= 1e-6 * abs(float(fd))


def _mlp_case(**parts):
    widths = (2, 3, 3, 2)
    return mlp_group(widths, **parts), mlp_params(jax.random.key(0), widths)


def test_continuous_canonical_element_starts_from_the_identity_word_and_names_a_bad_init():
    """``init`` naming no component (the identity ``Word((), ())``, the natural "no warm start") failed with a bare
    ``KeyError: 0`` from inside the compiled sweeps, a Word of other widths with a while_loop's carry mismatch, and
    a non-Word with an AttributeError of a tracer (``unordered_invariants``' ``element`` too).  Components the word
    does not name now start at the identity (the same canonical element), and a bad ``init`` / ``element`` is named
    with the element's shapes."""
    group, p = _mlp_case(permutation=False, translation=False)  # a rescale chain: block-coordinate sweeps
    moved = group.act(group.sample(jax.random.key(1), p), p)
    ref = group.act(group.continuous_canonical_element(moved), moved)
    got = group.act(group.continuous_canonical_element(moved, init=Word((), ())), moved)
    assert tree_rel_err(got, ref) < 1e-5
    narrow = mlp_params(jax.random.key(0), (2, 2, 2, 2))
    other = group.continuous_canonical_element(narrow)
    for call, needle in (
            (lambda: group.continuous_canonical_element(p, init=other), r"continuous_canonical_element: init .*\(2,\)"),
            (lambda: group.continuous_canonical_element(p, init=5), r"continuous_canonical_element: init .*Word"),
            (lambda: group.unordered_invariants(p, element=5), r"unordered_invariants: element .*Word")):
        with pytest.raises((TypeError, ValueError), match=needle):
            call()


def test_bad_elements_scales_and_verify_arguments_are_named():
    """A float index array for a permutation passed the element checks and failed inside ``jnp.take`` ("indices
    must have an integer type"); ``scale="1"`` read as 1.0 by the check and failed in the compiled program's
    argument conversion; ``verify`` of something that is not a group or not a model failed with an AttributeError
    / "'State' object is not callable".  Each is named now."""
    group, p = _mlp_case()
    perm = [i for i, c in enumerate(group.components) if not c.continuous][0]
    floats = Word((perm,), (jnp.arange(3.0),))
    with pytest.raises(ValueError, match=r"permutation 'perm/0' has dtype float32, not an integer"):
        group.act(floats, p)
    with pytest.raises(ValueError, match=r"scale='1' is not allowed"):
        group.sample(jax.random.key(0), p, "1")
    model = MLP(3, (4,), 2, rngs=nnx.Rngs(0))
    x, key = jnp.ones((2, 3)), jax.random.key(0)
    with pytest.raises(TypeError, match=r"verify: group must be a symmetry group.*str"):
        verify(model, "rescale", x, key)
    with pytest.raises(TypeError, match=r"verify: model must be the Flax NNX model.*State"):
        verify(nnx.split(model, nnx.Param, ...)[1], model.symmetries(), x, key)


def test_grad_of_balanced_particles_with_a_zero_half_is_finite(x64):
    """``particles(params, balanced=True)`` keeps a particle with a zero half as it is, but computed the balancing
    factor from the norms, whose derivative at 0 is infinite: ``jax.grad`` of the balanced particles was NaN in
    every entry of that particle (a zero-initialised or dead output weight).  Now finite, and equal to a central
    difference along the other particles."""
    model = MeanField(3, 5, 2, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    p = nnx.split(model, nnx.Param, ...)[1].to_pure_dict()
    p["w_out"] = p["w_out"].at[0].set(0.0)
    w = jax.random.normal(jax.random.key(1), (5, 3 + 1 + 2), jnp.float64)

    @jax.jit
    def f(q):
        return jnp.sum(w * particles(q, balanced=True))

    grad = jax.grad(f)(p)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad))
    u = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape, x.dtype).at[0].set(0.0), p)
    h = 1e-6
    fd = (f(jax.tree.map(lambda x, y: x + h * y, p, u)) - f(jax.tree.map(lambda x, y: x - h * y, p, u))) / (2 * h)
    dot = sum(jnp.sum(g * y) for g, y in zip(jax.tree.leaves(grad), jax.tree.leaves(u)))
    assert abs(float(dot) - float(fd)) <= 1e-7 * abs(float(fd))


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-7), ("float64", 0.0)])
def test_verify_puts_a_permutations_reordered_sums_down_to_rounding_at_any_rtol(x64, dtype, rtol):
    """A permutation's round trip is exact, so the rounding excuse of ``verify`` (the round trip's own change) was 0,
    and the last-bit change of the reordered sums (1.5e-7 of the outputs of a float32 MLP, 1.2 eps) was reported as
    "declared action 'permutation/layers.0' ... is not a symmetry" for ``rtol`` below it (1e-7 in float32, 0 in
    float64).  Changes within a few epsilons of the dtype are rounding; a false action still fails at that rtol."""
    model = MLP(6, (64,), 10, param_dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (32, 6), jnp.dtype(dtype))
    group = model.symmetries()
    assert verify(model, group, x, jax.random.key(0), rtol=rtol) <= 16 * float(jnp.finfo(jnp.dtype(dtype)).eps)
    false = Scale(members=((("layers", 0, "kernel"), None),), name="scale/not-normalised")
    with pytest.raises(SymmetryError, match="scale/not-normalised"):
        verify(model, false, x, jax.random.key(0), rtol=rtol)
