"""Low-precision and mixed-precision parameters across the symmetry groups, the observables and the optimiser.

bfloat16 / float16 parameters are computed in float32 (README: the observables, projections and
canonicalisations); each test compares with the same computation done in float64 from the same (rounded) numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from quotient_sgd.models import MLP, Transformer
from quotient_sgd.observables import charges, frozen_horizontal, predict_charge_drift
from quotient_sgd.optim import SGDSpec, quotient_trajectory, train
from tests.helpers import horizontal_basis


def _mlp(dtype, classifier=False):
    model = MLP(3, (4,), 3, classifier=classifier, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    return model, graphdef, params


def _random_like(key, params, dtype):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, dtype) for k, x in zip(keys, leaves)])


def _ravel64(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _exact_horizontal(params, v):
    """The horizontal part of ``v`` in float64 (NumPy) for the 3-4-3 MLP's rescale group (its continuous part): unit
    ``j``'s orbit tangent is ``(W1[:, j], b1[j], -W2[j, :])``, zero elsewhere."""
    w1, b1, w2 = (np.asarray(params["layers"][0]["kernel"][...], np.float64),
                  np.asarray(params["layers"][0]["bias"][...], np.float64),
                  np.asarray(params["layers"][1]["kernel"][...], np.float64))
    rows = []
    for j in range(w1.shape[1]):
        t = {"layers": {0: {"bias": np.zeros_like(b1), "kernel": np.zeros_like(w1)},
                        1: {"bias": np.zeros(w2.shape[1]), "kernel": np.zeros_like(w2)}}}
        t["layers"][0]["kernel"][:, j] = w1[:, j]
        t["layers"][0]["bias"][j] = b1[j]
        t["layers"][1]["kernel"][j, :] = -w2[j, :]
        rows.append(_ravel64(t))
    basis, _ = horizontal_basis(np.stack(rows))
    return basis @ (basis.T @ _ravel64(v))


def test_horizontal_of_a_float32_vector_at_bfloat16_parameters_is_not_rounded_to_bfloat16():
    """group.vertical / horizontal cast v to the parameters' dtypes before the projection (computed in float32): a
    float32 vector at bfloat16 parameters was rounded to bfloat16 first, and its float32 projection came out 2.3e-3
    of |v| off the exact one (a 3-4-3 MLP; vertical likewise, the same code); now at float32's rounding.
    frozen_horizontal (the basis in straight-line Lanczos, lanczos_method="unrolled") failed on bfloat16 parameters
    with XLA:CPU's bare 'Unsupported dtype bfloat16' in eigh; it now builds its basis in float32 and returns v in its
    own dtypes, as group.horizontal."""
    model, _, params = _mlp(jnp.bfloat16)
    group = model.symmetries()
    v = _random_like(jax.random.key(5), params, jnp.float32)
    exact = _exact_horizontal(params, v)
    scale = np.linalg.norm(_ravel64(v))
    h = group.horizontal(params, v)
    assert {x.dtype for x in jax.tree.leaves(h)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(_ravel64(h), exact, atol=1e-6 * scale)
    # (one program for both vectors below)
    vb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), v)
    hf, hb = jax.jit(lambda p, a, b: (frozen_horizontal(group, p)(a), frozen_horizontal(group, p)(b)))(params, v, vb)
    assert {x.dtype for x in jax.tree.leaves(hf)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(_ravel64(hf), exact, atol=1e-6 * scale)
    # a vector in the parameters' own dtype comes back in it, the projection of its (exact) values
    assert {x.dtype for x in jax.tree.leaves(hb)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_allclose(_ravel64(hb), _exact_horizontal(params, vb), atol=1e-2 * scale)


def test_charge_drift_spec_on_a_float32_classifier_under_x64(x64):
    """quotient_trajectory(spec=SGDSpec(...)) checks each step against the spec with a bound that, for a linear
    (translation) charge, was scaled by NumPy's float64 sqrt(n): beside float32 parameters under x64 the bound was
    float64, and strict promotion failed with a bare TypePromotionError at the first step (any float32 or bfloat16
    classifier).  The identity charge_drift_predicted == charge_drift (SGD, exact) holds now."""
    model, graphdef, params = _mlp(jnp.float32, classifier=True)
    x = jax.random.normal(jax.random.key(1), (6, 3), jnp.float32)
    y = jnp.arange(6) % 3

    def loss(p, batch):
        logits = nnx.merge(graphdef, p)(x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    tx = quotient_trajectory(optax.sgd(0.1), model.symmetries(), spec=SGDSpec(0.1),
                             observables=["charge_drift", "charge_drift_predicted"])
    out = train(loss, params, tx, jnp.zeros((3, 1), jnp.float32), donate=False)
    traj = out[-1]
    # float32: the identity to its rounding (the translation charges' drift is rounding alone, ~1e-8); a step taken
    # for off-spec would read NaN
    for a, b in zip(jax.tree.leaves(traj["charge_drift"]), jax.tree.leaves(traj["charge_drift_predicted"])):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.all(np.isfinite(b))
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-3 * np.max(np.abs(a)) + 1e-6)


def test_a_bfloat16_transformer_at_float32_parameters():
    """quotient_trajectory evaluates the loss at the float32 widening of bfloat16 parameters (its Hessian and
    secant observables).  The Transformer's token lookup computed in the dtype its nnx.Embed was built with, so at
    float32 parameters it added bfloat16 token rows to float32 positional rows: strict promotion failed with a bare
    TypePromotionError (hessian_every= on any bfloat16 Transformer).  Now the function of the float32 parameters is
    the float32-built model's, exactly."""
    def structure(dtype):  # (the model's structure alone: nothing drawn)
        return nnx.split(nnx.eval_shape(lambda: Transformer(7, 4, 2, 1, 5, mlp_ratio=2, param_dtype=dtype,
                                                            rngs=nnx.Rngs(0))), nnx.Param)

    graphdef16, shapes = structure(jnp.bfloat16)
    graphdef32, _ = structure(jnp.float32)
    rng = np.random.default_rng(0)
    # float32 parameters holding bfloat16 numbers (the widening of a bfloat16 model's)
    wide = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.bfloat16).astype(jnp.float32), shapes)
    tokens = jnp.arange(10).reshape(2, 5) % 7
    out = nnx.merge(graphdef16, wide)(tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(nnx.merge(graphdef32, wide)(tokens)))


def test_predicted_charge_drift_of_low_precision_arguments():
    """predict_charge_drift computed in the arguments' dtype when called on bfloat16 / float16 parameters (the
    trajectory widens them first): the learning rate was rounded to it (0.01 -> 0.01001 in bfloat16) and so was
    -Delta / eta, 3.5e-3 of the drift off (bfloat16, lr = 0.01); a float16 step at lr = 1e-6 was predicted NaN.
    For SGD without momentum or decay, from zero cross terms, the prediction is Q(Delta) exactly (THEORY section 2:
    eta^2 Q(g)); now to float32's rounding of it.  Q(Delta) per rescaled unit: (|Delta w_in|^2 + Delta b^2 -
    |Delta w_out|^2) / 2, in float64."""
    for dtype, lr, size in ((jnp.float16, 1e-6, 1000.0),):
        model, _, params = _mlp(dtype)
        group = model.symmetries()
        grads = jax.tree.map(lambda x: x.astype(dtype), _random_like(jax.random.key(9), params, jnp.float32))
        grads = jax.tree.map(lambda x: (size * x.astype(jnp.float32)).astype(dtype), grads)
        updates = jax.tree.map(lambda x: (-lr * x.astype(jnp.float32)).astype(dtype), grads)
        cross = jax.tree.map(jnp.zeros_like, charges(group, params))
        pred, _ = jax.jit(lambda *a: predict_charge_drift(group, *a, lr=lr))(params, grads, updates, cross)
        d = jax.tree.map(lambda x: np.asarray(x, np.float64), updates)
        exact = 0.5 * (np.sum(d["layers"][0]["kernel"] ** 2, axis=0) + d["layers"][0]["bias"] ** 2
                       - np.sum(d["layers"][1]["kernel"] ** 2, axis=1))
        got = np.asarray(pred["rescale/layers.0"], np.float64)
        np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.max(np.abs(exact)), err_msg=str(dtype))


def test_hessian_observables_of_bfloat16_parameters_are_evaluated_in_float32():
    """sharpness_raw / _horizontal / _quotient / _preconditioned, hessian_extremes and dense_hessian evaluated the
    loss at bfloat16 parameters in bfloat16 (the forward pass and its Hessian-vector products), where
    quotient_trajectory evaluates it at their float32 widening: the dense Hessian of a 3-4-3 MLP came out 5.5e-3 of
    its largest entry off the float64 one from the same numbers, its top eigenvalue 2.4e-3 off.  Here the Hessian of
    sum(w^4) / 4 is diag(3 w^2), known exactly from the (bfloat16) numbers; in bfloat16 each entry was rounded."""
    from quotient_sgd.observables import dense_hessian, hessian_extremes

    w = jnp.asarray([0.3, -1.7, 0.9, 2.3, -0.45, 1.1], jnp.bfloat16)
    exact = 3 * np.asarray(w, np.float64) ** 2

    def loss(p):
        return jnp.sum(p["w"] ** 4) / 4

    dense = dense_hessian(loss, {"w": w})
    assert dense.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dense, np.float64), np.diag(exact), rtol=1e-6, atol=0)
    ex = jax.jit(lambda p: hessian_extremes(loss, p, key=jax.random.key(0), num_matvecs=6))({"w": w})
    np.testing.assert_allclose([float(ex.top[0]), float(ex.bottom[0])], [exact.max(), exact.min()], rtol=1e-5)


def test_shock_and_fold_numbers_of_low_precision_or_mixed_arguments(x64):
    """shock_number / fold_number multiplied lr by the curvature as they came: a float16 curvature of 6e4 at lr = 2
    gave inf (the product in float16; the other step observables widen to float32), and a NumPy float64 learning
    rate beside a float32 curvature (x64) failed under strict promotion with a bare TypePromotionError.  Now in the
    curvature's dtype, at least float32: eta max(0, -+kappa) from the same numbers."""
    from quotient_sgd.observables import fold_number, shock_number

    kappa = jnp.asarray([-6e4, 3.0, 6e4], jnp.float16)
    k64 = np.asarray(kappa, np.float64)
    fold = fold_number(2.0, kappa)
    assert fold.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(fold, np.float64), 2.0 * np.maximum(k64, 0), rtol=1e-7)
    kappa32 = jnp.asarray([-2.5, 0.75], jnp.float32)
    for lr in (np.float64(0.1), jnp.asarray(0.1, jnp.bfloat16)):
        shock = shock_number(lr, kappa32)
        assert shock.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(shock, np.float64),
                                   float(np.float32(lr)) * np.maximum(-np.asarray(kappa32, np.float64), 0), rtol=1e-7)


def test_sgd_spec_takes_a_bfloat16_number():
    """SGDSpec checked a concrete array's dtype with NumPy's issubdtype, which does not count bfloat16 as floating:
    SGDSpec(jnp.bfloat16(0.1)) was refused as "need a finite number >= 0".  Accepted now, and held to the number it
    holds as the other dtypes are (a negative bfloat16 rate is still refused)."""
    spec = SGDSpec(jnp.asarray(0.1, jnp.bfloat16), momentum=jnp.asarray(0.5, jnp.bfloat16))
    assert float(spec.learning_rate) == float(np.float32(jnp.asarray(0.1, jnp.bfloat16)))
    with pytest.raises(ValueError, match="SGDSpec: learning_rate=.* need a finite number >= 0"):
        SGDSpec(jnp.asarray(-0.1, jnp.bfloat16))


def test_particle_moments_of_low_precision_particles():
    """particle_moments summed and divided in the particles' dtype: in float16 the count of 70000 particles was
    infinite (and so was their sum), the moments NaN.  Computed in float32 now: the moments of 70000 copies of
    (1, -2) are (1, -2) and [[1, -2], [-2, 4]] exactly."""
    from quotient_sgd.models import particle_moments

    p = jnp.tile(jnp.asarray([[1.0, -2.0]], jnp.float16), (70000, 1))
    m = particle_moments(p)
    assert m["mean"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(m["mean"]), [1.0, -2.0])
    np.testing.assert_array_equal(np.asarray(m["second_moment"]), [[1.0, -2.0], [-2.0, 4.0]])


def test_balanced_particles_of_float16_parameters():
    """particles(balanced=True) balanced each particle from its squared norms in the parameters' dtype: in float16 a
    squared norm above 65504 was infinite, so the particle (w_in, b; w_out) = (300, 0, 0; 0.01), a point of the
    rescale orbit of (1.73, 0, 0; 1.73), came out (0, 0, 0; inf).  Now computed in float32 and rounded once: the
    balanced point sqrt(|in| |out|) (in / |in|, out / |out|), in float64 from the same numbers, to float16's
    rounding."""
    from quotient_sgd.models import particles

    params = {"w_in": jnp.asarray([[300.0, 0.0], [1.0, 2.0]], jnp.float16), "b": jnp.asarray([0.0, 0.5], jnp.float16),
              "w_out": jnp.asarray([[0.01], [3.0]], jnp.float16)}
    got = particles(params, balanced=True)
    assert got.dtype == jnp.float16
    pin = np.concatenate([np.asarray(params["w_in"], np.float64), np.asarray(params["b"], np.float64)[:, None]], 1)
    out = np.asarray(params["w_out"], np.float64)
    nin, nout = np.linalg.norm(pin, axis=1, keepdims=True), np.linalg.norm(out, axis=1, keepdims=True)
    size = np.sqrt(nin * nout)
    np.testing.assert_allclose(np.asarray(got, np.float64), np.concatenate([pin / nin * size, out / nout * size], 1),
                               rtol=2e-3, atol=1e-3)


def test_inverse_of_a_bfloat16_gl_element():
    """group.inverse of a GL element held in bfloat16 / float16 (cast to the parameters' dtype; act and compose take
    it) raised XLA:CPU's bare 'NotImplementedError: Unsupported dtype bfloat16' (no low-precision LU kernel).  It is
    inverted in float32 and returned in the element's dtype: A A^-1 = I to that dtype's rounding."""
    from quotient_sgd.symmetry import GL

    group = GL(left=(("a",), None), right=(("b",), None), kind="vo", name="gl")
    a = jnp.asarray([[2.0, 0.5, 0.0], [-1.0, 1.5, 0.25], [0.0, 0.75, -3.0]], jnp.bfloat16)
    inv = group.inverse(a)
    assert inv.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(a, np.float64) @ np.asarray(inv, np.float64), np.eye(3),
                               atol=8 * float(jnp.finfo(jnp.bfloat16).eps))
