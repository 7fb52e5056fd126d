"""quotient_sgd.optim / observables on further inputs: the kind of every key a trajectory holds, Lanczos on
parameters of several or narrow dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import rescale_net as _rescale_net

from quotient_sgd import observables as qobs
from quotient_sgd.optim import flatten_trajectory, quotient_trajectory, train


# ----- every key of a trajectory has a kind ------------------------------------------------------------------------
def test_every_key_of_a_trajectory_has_a_kind():
    """train(..., has_aux=True) puts the loss_fn's aux into the trajectory under "aux", and a run directory's
    trajectory.npz holds "step"; kind_of raised KeyError on both ("no observable emits the trajectory key 'aux'"),
    so code that sorts a trajectory's keys by kind failed on them.  Both are raw now (never trusted as invariant),
    for every flattened key as well."""
    group, params, data, loss = _rescale_net()

    def loss_aux(p, batch):
        value = loss(p, batch)
        return value, {"twice": 2 * value, "pair": (value, -value)}

    tx = quotient_trajectory(optax.sgd(0.05), group)
    traj = train(loss_aux, params, tx, data, has_aux=True, donate=False)[2]
    flat = flatten_trajectory(traj)
    flat["step"] = np.arange(4)
    assert any(k.startswith("aux/") for k in flat)
    kinds = {k: qobs.kind_of(k) for k in flat}
    assert set(kinds.values()) <= {qobs.ORBIT_INVARIANT, qobs.REDUCED_DYNAMICS, qobs.RAW}
    assert {k: v for k, v in kinds.items() if k.startswith("aux") or k == "step"} == {
        "aux/twice": qobs.RAW, "aux/pair/0": qobs.RAW, "aux/pair/1": qobs.RAW, "step": qobs.RAW}
    assert qobs.kind_of("aux") == qobs.RAW and qobs.kind_of("loss") == qobs.ORBIT_INVARIANT
    with pytest.raises(KeyError, match="no observable emits the trajectory key 'auxiliary'"):
        qobs.kind_of("auxiliary")


# ----- Lanczos on parameters of several or narrow dtypes -----------------------------------------------------------
def _quadratic(dtypes, seed=0):
    """``0.5 x^T A x`` on a pytree of two leaves (2 and 4 entries) of the given dtypes, computed in float32, and
    the dense eigenvalues of ``A`` (float64, ascending)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(6, 6))
    a = (m + m.T) / 2
    a32 = jnp.asarray(a, jnp.float32)

    def loss(p):
        x = jnp.concatenate([p["a"].astype(jnp.float32), p["b"].astype(jnp.float32)])
        return 0.5 * x @ a32 @ x

    params = {"a": jnp.ones(2, dtypes[0]), "b": jnp.ones(4, dtypes[1])}
    return loss, params, np.linalg.eigvalsh(a)


@pytest.mark.parametrize("dtypes, tol, methods", [((jnp.bfloat16, jnp.float32), 2e-2, ("loop", "matfree")),
                                                  ((jnp.float16, jnp.float16), 2e-3, ("loop",))])
def test_hessian_extremes_of_narrow_or_mixed_dtype_parameters(dtypes, tol, methods):
    """Parameters of two dtypes (a bfloat16 block beside float32 ones) failed under strict dtype promotion with a bare
    TypePromotionError (the iteration's common dtype, the start vector's norm), and bfloat16 / float16 parameters
    alone with "Unsupported dtype bfloat16" (eigh of the tridiagonal matrix, which XLA:CPU has no such kernel for).
    The iteration runs in at least float32 now, the operator on the leaves' own dtypes, and the Ritz vectors come
    back in them; the values match the dense ones to the parameters' precision, for every method."""
    loss, params, dense = _quadratic(dtypes)
    for method in methods:
        steps, k = (6, 1) if method == "matfree" else (9, 2)
        ex = jax.jit(lambda p, s=steps, k=k, m=method: qobs.sharpness_raw(loss, p, key=jax.random.key(1), num_matvecs=s,
                                                                          k=k, method=m))(params)
        assert ex.top.dtype == jnp.float32, method
        np.testing.assert_allclose(ex.top, dense[::-1][:k], atol=tol * dense[-1], err_msg=method)
        np.testing.assert_allclose(ex.bottom, dense[:k], atol=tol * dense[-1], err_msg=method)
        assert {n: v.dtype for n, v in ex.top_vectors.items()} == {"a": dtypes[0], "b": dtypes[1]}
        norms = np.sqrt(sum(np.sum(np.square(np.asarray(v, np.float32)), axis=1) for v in ex.top_vectors.values()))
        np.testing.assert_allclose(norms, 1.0, atol=tol)


def test_lanczos_extremes_of_float64_and_float32_leaves(x64):
    """Under x64, a float64 leaf beside a float32 one (strict promotion) failed with TypePromotionError; the
    iteration runs in float64 now and the extremes are the dense ones to the float32 leaf's rounding."""
    rng = np.random.default_rng(3)
    m = rng.normal(size=(5, 5))
    a = jnp.asarray((m + m.T) / 2)

    def matvec(v):
        y = a @ jnp.concatenate([v["a"].astype(jnp.float64), v["b"]])
        return {"a": y[:2].astype(jnp.float32), "b": y[2:]}

    v0 = {"a": jnp.ones(2, jnp.float32), "b": jnp.arange(1.0, 4.0, dtype=jnp.float64)}
    dense = np.linalg.eigvalsh(np.asarray(a))
    for method in ("loop", "matfree"):
        ex = jax.jit(lambda v, m=method: qobs.lanczos_extremes(matvec, v, num_matvecs=5, k=1, method=m))(v0)
        assert ex.top.dtype == jnp.float64, method
        np.testing.assert_allclose([ex.top[0], ex.bottom[0]], [dense[-1], dense[0]], atol=1e-5, err_msg=method)
        assert ex.top_vectors["a"].dtype == jnp.float32 and ex.top_vectors["b"].dtype == jnp.float64


def test_hessian_extremes_of_parameters_with_python_numbers_and_empty_leaves():
    """A Python float among the parameters (jax.grad takes it) failed in the start vector's draw with
    "'float' object has no attribute 'dtype'"; it is a 0-d parameter now, beside an empty leaf, and the extremes
    keep their multiplicities (3 twice)."""
    def loss(p):
        return 1.5 * p["a"] ** 2 + 0.5 * jnp.sum(jnp.arange(1.0, 4.0).at[1].set(3.0) * p["b"] ** 2) + jnp.sum(p["e"])

    params = {"a": 1.0, "b": jnp.ones(3), "e": jnp.ones((0,))}
    ex = qobs.sharpness_raw(loss, params, key=jax.random.key(0), num_matvecs=6, k=2)
    np.testing.assert_allclose(ex.top, [3.0, 3.0], rtol=1e-5)
    np.testing.assert_allclose(ex.bottom, [1.0, 3.0], rtol=1e-5)
    assert {n: v.shape for n, v in ex.top_vectors.items()} == {"a": (2,), "b": (2, 3), "e": (2, 0)}
    pre = qobs.sharpness_preconditioned(loss, params, jax.tree.map(lambda x: jnp.full(jnp.shape(x), 2.0), params),
                                        key=jax.random.key(0), num_matvecs=4)
    np.testing.assert_allclose([pre.top[0], pre.bottom[0]], [1.5, 0.5], rtol=1e-5)
