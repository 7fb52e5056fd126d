"""Lanczos extremes of the projected Hessian against a dense eigendecomposition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from helpers import horizontal_basis

from quotient_sgd import observables as qobs
from quotient_sgd.symmetry import Product, Rescale, Translation


def _init(key, sizes=(3, 5, 4, 3)):
    ks = jax.random.split(key, len(sizes))
    return {
        f"l{i}": {"kernel": jax.random.normal(ks[i], (a, b), jnp.float64) / np.sqrt(a),
                  "bias": 0.1 * jax.random.normal(jax.random.fold_in(ks[i], 1), (b,), jnp.float64)}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    }


def _loss(p, x, y):
    n = len(p)
    for i in range(n):
        x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"][None, :]
        if i < n - 1:
            x = jax.nn.relu(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, y))


def _group():
    comps = [Rescale(incoming=(((f"l{i}", "kernel"), 1), ((f"l{i}", "bias"), 0)),
                     outgoing=(((f"l{i + 1}", "kernel"), 0),), name=f"r{i}") for i in range(2)]
    return Product(comps + [Translation(kernel=("l2", "kernel"), bias=("l2", "bias"), name="t")])


# (the unrolled method, not the default, in the slow suite: its compilation is 8x the loop's)
@pytest.mark.parametrize("method", ["loop", pytest.param("unrolled", marks=pytest.mark.slow), "matfree"])
def test_lanczos_extremes_dense_matrix(x64, method):
    # as many steps as dimensions: the extremes are exact (12, not 40: the unrolled iteration compiles one copy of
    # its step per matvec, 10 s at 40, 6 s at 24; the reference is numpy's, compiling nothing)
    n = 12
    m = jax.random.normal(jax.random.key(0), (n, n), jnp.float64)
    a = m + m.T
    ex = jax.jit(lambda v: qobs.lanczos_extremes(lambda u: a @ u, v, num_matvecs=n, k=3, method=method))(
        jnp.ones(n, jnp.float64))
    ev = np.linalg.eigvalsh(np.asarray(a))
    np.testing.assert_allclose(ex.top, ev[::-1][:3], rtol=1e-8)
    np.testing.assert_allclose(ex.bottom, ev[:3], rtol=1e-8)
    v = ex.top_vectors[0]
    np.testing.assert_allclose(a @ v, ex.top[0] * v, atol=1e-6)


def test_projected_hessian_lanczos_vs_dense(x64):
    """Top-2 / bottom-2 eigenvalues of P H P on the horizontal space, at the current and the canonical point,
    from 30 Lanczos steps, agree with the dense eigendecomposition to 1e-3 relative; Ritz vectors are
    horizontal eigenvectors."""
    group = _group()
    p0 = _init(jax.random.key(0))
    params = jax.jit(lambda p: group.act(group.sample(jax.random.key(3), p, scale=0.5), p))(p0)
    x = jax.random.normal(jax.random.key(1), (64, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (64,), 0, 3)
    loss = lambda p: _loss(p, x, y)  # noqa: E731
    @jax.jit
    def everything(p):
        pc = group.canonicalize(p)
        out = {}
        for where, point, fn in (("horizontal", p, qobs.sharpness_horizontal),
                                 ("quotient", pc, qobs.sharpness_quotient)):
            tang = jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(point))
            ex = fn(loss, group, p, key=jax.random.key(7), num_matvecs=30, k=2)
            out[where] = (qobs.dense_hessian(loss, point), tang, ex)
        out["raw"] = qobs.sharpness_raw(loss, p, key=jax.random.key(7), num_matvecs=40, k=1)
        return out

    res = everything(params)
    # the dense reference in numpy (float64; eager jnp compiled each of its linear-algebra ops)
    for where in ("horizontal", "quotient"):
        h, tang, ex = res[where]
        h, tang = np.asarray(h), np.asarray(tang)
        hor, _ = horizontal_basis(tang)  # orthonormal basis of the horizontal space
        ev = np.linalg.eigvalsh(hor.T @ h @ hor)
        scale = float(np.max(np.abs(ev)))
        np.testing.assert_allclose(ex.top, ev[::-1][:2], rtol=1e-3, atol=1e-3 * scale, err_msg=where)
        np.testing.assert_allclose(ex.bottom, ev[:2], rtol=1e-3, atol=1e-3 * scale, err_msg=where)
        v = np.concatenate([np.ravel(t[0]) for t in jax.tree.leaves(ex.top_vectors)])  # ravel_pytree's order
        assert float(np.linalg.norm(tang @ v)) < 1e-6 * float(np.linalg.norm(tang))  # horizontal
        np.testing.assert_allclose(hor @ (hor.T @ (h @ v)), ex.top[0] * v, atol=1e-3 * scale)  # P H P v = lam v
    h_raw = np.asarray(res["horizontal"][0])
    np.testing.assert_allclose(res["raw"].top[0], np.linalg.eigvalsh(h_raw)[-1], rtol=1e-3)


def test_gradient_noise_temperature(x64):
    group = _group()
    params = _init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (16, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
    ex_loss = lambda p: jax.vmap(lambda xi, yi: _loss(p, xi[None], yi[None]))(x, y)  # noqa: E731
    n = jax.jit(lambda p: qobs.gradient_noise(ex_loss, group, p, lr=0.1))(params)
    g = jax.jit(jax.vmap(lambda xi, yi: ravel_pytree(jax.grad(_loss)(params, xi[None], yi[None]))[0]))(x, y)
    n_h = g.shape[1] - jax.eval_shape(group.tangents, params)["l0"]["kernel"].shape[0]
    sigma2 = float(jnp.sum(jnp.var(g, axis=0, ddof=1)) / n_h)  # per-example grads are already horizontal
    np.testing.assert_allclose(n.sigma2, sigma2, rtol=1e-8)
    np.testing.assert_allclose(n.temperature, 0.1 * sigma2 / 32, rtol=1e-8)


# each method and each dtype in the fast suite; the other two pairings are slow
@pytest.mark.parametrize("dtype, method", [
    (jnp.float32, "unrolled"),
    (jnp.float64, "loop"),
    pytest.param(jnp.float32, "loop", marks=pytest.mark.slow),
    pytest.param(jnp.float64, "unrolled", marks=pytest.mark.slow),
])
def test_lanczos_past_breakdown(x64, method, dtype):
    """More Lanczos steps than the Krylov space has dimensions (a rank-3 operator; an eigenvector as start): the
    extremes are those of the operator, with unit Ritz vectors, not zeros or values from rounding noise."""
    n = 30
    # the operator and the checks in numpy (eager jnp compiled each op)
    u = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (n, n), jnp.float64)))[0]
    d = np.zeros(n)
    d[:3] = [2.0, -1.0, 0.5]
    a = ((u * d[None, :]) @ u.T).astype(dtype)
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    # 10 steps: the 4-dimensional Krylov space of a generic start, then a breakdown and a restart at each further
    # step (every fresh direction is in the null space); the unrolled iteration compiles one copy of its step per step
    run = jax.jit(lambda v: qobs.lanczos_extremes(lambda w: a @ w, v, num_matvecs=10, k=2, method=method))
    ex = run(jax.random.normal(jax.random.key(1), (n,), dtype))
    # the Krylov space of a generic start: the three eigenvectors and one null direction
    np.testing.assert_allclose(ex.top, [2.0, 0.5], atol=tol)
    np.testing.assert_allclose(ex.bottom, [-1.0, 0.0], atol=tol)
    for vecs, vals in ((ex.top_vectors, ex.top), (ex.bottom_vectors, ex.bottom)):
        vecs, vals = np.asarray(vecs), np.asarray(vals)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=tol)
        np.testing.assert_allclose(vecs @ a.T, vals[:, None] * vecs, atol=tol)
    ex = run(u[:, 0].astype(dtype))  # breakdown after the first step: restarted, the operator's extremes
    np.testing.assert_allclose([ex.top[0], ex.bottom[0]], [2.0, -1.0], atol=tol)
    np.testing.assert_allclose(np.abs(np.asarray(ex.top_vectors[0]) @ u[:, 0].astype(dtype)), 1.0, atol=tol)
    stop = jax.jit(lambda v: qobs.lanczos_extremes(lambda w: a @ w, v, num_matvecs=10, k=2, method=method,
                                                   restart=False))
    ex = stop(u[:, 0].astype(dtype))  # restart=False: the extremes of the Krylov space built
    np.testing.assert_allclose([ex.top[0], ex.bottom[0]], [2.0, 2.0], atol=tol)


def test_trajectory_hessian_past_horizontal_dimension(x64):
    """``hessian_every`` with more Lanczos steps (20) than the horizontal space of a 2-3-2 MLP has dimensions
    (17 parameters, 3 rescale generators: 14): P H P and raw extremes equal the dense ones."""
    from quotient_sgd.optim import observables_of, quotient_trajectory

    group = Product([Rescale(incoming=((("l0", "kernel"), 1), (("l0", "bias"), 0)), outgoing=((("l1", "kernel"), 0),),
                             name="r0")])
    params = _init(jax.random.key(4), sizes=(2, 3, 2))
    x = jax.random.normal(jax.random.key(1), (64, 2), jnp.float64)

    def f(p):
        h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"][None, :])
        return h @ p["l1"]["kernel"] + p["l1"]["bias"][None, :]

    y = f(params) + 0.01 * jax.random.normal(jax.random.key(2), (64, 2), jnp.float64)
    loss = lambda p: 0.5 * jnp.mean(jnp.sum((f(p) - y) ** 2, -1))  # noqa: E731
    tx = quotient_trajectory(optax.sgd(0.1), group, hessian_every=1, lanczos_steps=20,
                             hessian_at=("horizontal", "raw"), observables=("loss",))
    _, st = jax.jit(lambda p: tx.update(jax.grad(loss)(p), tx.init(p), p, value=loss(p), loss_fn=loss))(params)
    o = observables_of(st)
    # the tangents and the dense Hessian in one program (eager: the vmapped HVPs op by op), the rest in numpy
    tang, h = jax.jit(lambda p: (jax.vmap(lambda t: ravel_pytree(t)[0])(group.tangents(p)),
                                 qobs.dense_hessian(loss, p)))(params)
    hor, h = horizontal_basis(tang)[0], np.asarray(h)
    assert hor.shape[1] == 14
    ev_h, ev_r = np.linalg.eigvalsh(hor.T @ h @ hor), np.linalg.eigvalsh(h)
    scale = float(ev_r[-1])
    np.testing.assert_allclose([o["sharpness_horizontal"], o["lambda_min_horizontal"]], [ev_h[-1], ev_h[0]],
                               atol=1e-6 * scale)
    np.testing.assert_allclose([o["sharpness_raw"], o["lambda_min_raw"]], [ev_r[-1], ev_r[0]], atol=1e-6 * scale)


# (the unrolled method, not the default, in the slow suite)
@pytest.mark.parametrize("method", ["loop", pytest.param("unrolled", marks=pytest.mark.slow)])
def test_lanczos_basis_stays_orthogonal_in_float32(method):
    """Recurrence + one Gram-Schmidt pass per step keeps the Krylov basis orthogonal to working precision in
    float32 on a spectrum spread over four decades (60 steps on n = 300, where converged Ritz values make plain
    Lanczos lose orthogonality and repeat them as ghosts); the extremes match a dense eigendecomposition."""
    from quotient_sgd.observables._hessian import _lanczos_loop, _lanczos_unrolled

    n, steps = 300, 60
    # the operator and the checks in numpy, in float32 as the iteration (eager jnp compiled each op)
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(jax.random.key(0), (n, n), jnp.float32)))
    ev = np.concatenate([-np.geomspace(1e-2, 1e2, n // 3), np.geomspace(1e-2, 1e2, n - n // 3)]).astype(np.float32)
    a = (q * ev[None, :]) @ q.T
    assert a.dtype == np.float32
    lanczos = _lanczos_loop if method == "loop" else _lanczos_unrolled
    t, basis, active = jax.jit(lambda v: lanczos(lambda u: a @ u, v, steps))(jnp.ones(n, jnp.float32))
    assert bool(jnp.all(active))
    t, basis = np.asarray(t), np.asarray(basis)
    gram = basis @ basis.T
    assert float(np.max(np.abs(gram - np.eye(steps)))) < 1e-4
    ritz = np.linalg.eigvalsh(t)
    dense = np.linalg.eigvalsh(a.astype(np.float64))
    np.testing.assert_allclose(ritz[-2:], np.sort(dense)[-2:], rtol=1e-4)
    np.testing.assert_allclose(ritz[:2], np.sort(dense)[:2], rtol=1e-4)
    # no ghost copies of the converged top value
    assert float(ritz[-2]) < float(ritz[-1]) * (1 - 1e-3)


# (the fallback budget on the MLP and attention in the slow suite; every model with the default, and the deep linear
# chain with the fallback, here)
@pytest.mark.parametrize("name, budget", [("mlp", "default"), ("deep_linear", "default"), ("attention", "default"),
                                          ("deep_linear", "fallback"),
                                          pytest.param("mlp", "fallback", marks=pytest.mark.slow),
                                          pytest.param("attention", "fallback", marks=pytest.mark.slow)])
def test_frozen_projection_float32_at_unbalanced_point(name, budget):
    """The frozen horizontal projection of the Lanczos operators, built in float32 at a point moved by a sampled
    element (rescale factors up to e^4, GL condition numbers up to e^6), agrees with the float64 projection:
    its basis comes from row-scaled tangents, orthonormalised twice (abelian) or by an SVD (GL); one unscaled
    Gram pass was 32% / 8% / 15% of |v| off.  Over its build budget (``max_build_flops=0``), the projection is
    ``group.horizontal`` applied afresh, equally accurate, without the dense tangent matrix."""
    from symmetry_cases import (attention_group, attention_params, deep_linear_group, deep_linear_params,
                                mlp_group, mlp_params)

    from helpers import tree_norm

    make, group, scale = {
        "mlp": (lambda k, dt: mlp_params(k, (5, 7, 6, 3), dt), mlp_group((5, 7, 6, 3)), 2.0),
        "deep_linear": (lambda k, dt: deep_linear_params(k, (4, 5, 5, 3), dt), deep_linear_group((4, 5, 5, 3)), 1.0),
        "attention": (lambda k, dt: attention_params(k, dtype=dt), attention_group(), 2.0),
    }[name]
    p = make(jax.random.key(3), jnp.float32)
    gp = group.act(group.sample(jax.random.key(101), p, scale), p)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(5), a.shape, a.dtype), gp)
    kw = {} if budget == "default" else {"max_build_flops": 0.0}
    project = jax.jit(lambda q, u: qobs.frozen_horizontal(group, q, **kw)(u))
    h32 = project(gp, v)
    k = jax.tree.leaves(jax.eval_shape(group.tangents, gp))[0].shape[0]
    tangent_matrix = f"f32[{k},{sum(a.size for a in jax.tree.leaves(gp))}]"
    if name != "deep_linear":  # (a deep linear chain's own horizontal solves least squares on that matrix)
        assert (budget == "default") == (tangent_matrix in str(project.trace(gp, v).jaxpr))
    with jax.enable_x64(True):
        up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float64), t)  # noqa: E731
        h64 = jax.jit(group.horizontal)(up(gp), up(v))
        err = float(tree_norm(jax.tree.map(jnp.subtract, up(h32), h64)) / tree_norm(up(v)))
    assert err < 1e-4, err


def test_projection_for_the_lanczos_method():
    """A Lanczos operator traced once ("loop") projects with ``group.horizontal`` afresh (no dense tangent
    matrix); straight-line code ("unrolled") with the frozen basis; both are the same projection."""
    from symmetry_cases import mlp_group, mlp_params

    sizes = (5, 7, 6, 3)
    group = mlp_group(sizes)
    p = mlp_params(jax.random.key(0), sizes, jnp.float32)
    v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape, a.dtype), p)
    k = jax.tree.leaves(jax.eval_shape(group.tangents, p))[0].shape[0]
    tangent_matrix = f"f32[{k},{sum(a.size for a in jax.tree.leaves(p))}]"
    out = {}
    for method in ("loop", "unrolled"):
        project = jax.jit(lambda q, u, m=method: qobs.projection_for(group, q, m)(u))
        out[method] = project(p, v)
        assert (tangent_matrix in str(project.trace(p, v).jaxpr)) == (method == "unrolled")
    direct = jax.jit(group.horizontal)(p, v)
    for a, b, c in zip(jax.tree.leaves(out["loop"]), jax.tree.leaves(direct), jax.tree.leaves(out["unrolled"])):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(c, b, rtol=1e-4, atol=1e-5)


def test_standalone_hessian_functions_default_to_the_training_loops_lanczos():
    """The standalone Hessian observables use the Lanczos method the training loop uses (``"loop"``: traced once;
    the unrolled one compiled 2-2.5x longer for no faster run), so a value computed alone is the one a trajectory
    records."""
    import inspect

    from quotient_sgd.optim import quotient_trajectory

    want = inspect.signature(quotient_trajectory).parameters["lanczos_method"].default
    assert want == "loop"
    for fn in (qobs.lanczos_extremes, qobs.hessian_extremes, qobs.sharpness_quotient, qobs.sharpness_horizontal,
               qobs.sharpness_raw, qobs.sharpness_preconditioned):
        assert inspect.signature(fn).parameters["method"].default == want, fn.__name__
