"""The reduced rescale-chain path (quotient_sgd.symmetry._reduced) under differentiation and at hand-built
clusters: its results are the generic path's, and derivatives match central finite differences in float64."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quotient_sgd import models
from quotient_sgd.symmetry import Product, _reduced


def _f64(tree):
    """The tree cast to float64 on the host (eager, each leaf shape compiled a conversion)."""
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), tree)


def _randlike(tree, offset):
    return jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size + offset), x.shape, x.dtype), tree)


def _dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_reduced_vertical_is_differentiable_and_matches_finite_differences():
    """Above dense_max generators the projection runs CG on the reduced Gram matrix; its Jacobi preconditioner
    depended on the parameters, and lineax refuses a tangent in a solver option, so ``jax.grad`` through
    ``vertical`` raised.  The preconditioner (and the right-hand side's scale) only steer the iterations, the
    solution does not depend on them: the gradient equals central finite differences."""
    with jax.enable_x64(True):
        model = models.MLP(3, (8, 6), 3, classifier=True, rngs=nnx.Rngs(0))
        _, params = nnx.split(model, nnx.Param)
        params = _f64(params)
        group = Product(model.symmetries().components, dense_max=0)  # the CG path for the rescale chain
        comps = tuple(group.components[i] for i in max(group.continuous_clusters(), key=len))
        assert _reduced.split_cluster(comps, group._flat(params)[0]) is not None
        params = group.act(group.sample(jax.random.key(1), params, scale=1.0), params)
        v, w, d = _randlike(params, 0), _randlike(params, 1), _randlike(params, 2)

        def f(q):
            return _dot(group.vertical(q, v), w)

        value_and_grad = jax.jit(jax.value_and_grad(f))  # one program for the gradient and f (eager: op by op)
        grad = value_and_grad(params)[1]
        h = 1e-6
        # the shifted points and the directional derivative in numpy (eager jnp compiled each operation per shape)
        shifted = [jax.tree.map(lambda x, y: jnp.asarray(np.asarray(x) + s * h * np.asarray(y)), params, d)
                   for s in (1, -1)]
        fd = (float(value_and_grad(shifted[0])[0]) - float(value_and_grad(shifted[1])[0])) / (2 * h)
        an = float(sum(np.sum(np.asarray(x) * np.asarray(y))
                       for x, y in zip(jax.tree.leaves(grad), jax.tree.leaves(d))))
        assert abs(an - fd) < 1e-6 * max(1.0, abs(fd))


def _reduced_vs_dense_projection(model, scale, seeds):
    """Per seed, ``|P_reduced v - P_dense v|_max / |v|`` for the model's rescale cluster (with its logit
    translation) at ``g . params``, ``g`` sampled at ``scale``: the reduced CG projection against the dense
    pseudo-inverse one."""
    from quotient_sgd.symmetry._base import _sum_tmaps, generic_vcoeffs

    _, params = nnx.split(model, nnx.Param)
    group = model.symmetries()
    flat0 = group._flat(_f64(params))[0]
    comps = tuple(group.components[i] for i in max(group.continuous_clusters(), key=len))

    @jax.jit
    def err(key):
        flat = group._act(group._sample(key, flat0, scale), flat0)
        v = {p: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
             for i, (p, x) in enumerate(flat.items())}
        split = _reduced.split_cluster(comps, flat)
        assert split is not None
        a = _sum_tmaps(comps, flat, _reduced.vcoeffs(comps, flat, v, split))
        b = _sum_tmaps(comps, flat, generic_vcoeffs(comps, flat, v))
        vnorm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in v.values()))
        return jnp.max(jnp.stack([jnp.max(jnp.abs(a[p] - b[p])) for p in a])) / vnorm

    return [float(err(jax.random.key(s))) for s in seeds]


def test_reduced_gram_operator_keeps_the_tangent_maps_accuracy_far_from_balance():
    """The reduced ``J^T J xi`` summed each member's contraction with ``S`` separately (the diagonal term plus one
    product per other member), which cancels catastrophically along the small-eigenvalue directions of the Gram
    matrix far from balance; CG on it returned projections 3e-7 and 8e-7 of ``|v|`` off (float64, log-factors
    +-6) where the tangent maps give 3e-12 and 6e-10.  Forming ``sum_l s_l xi_l`` per entry first keeps the
    tangent maps' accuracy."""
    with jax.enable_x64(True):
        model = models.MLP(5, (3, 1, 4), 3, classifier=True, rngs=nnx.Rngs(1))
        errs = _reduced_vs_dense_projection(model, 3.0, (11, 13, 15))
        assert max(errs) < 1e-8, errs
