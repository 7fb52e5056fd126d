"""Loss slices of a model as the HJ engine's bridge to training (THEORY section 3): the coarse-grained slice is the
Gaussian smoothing of the Cole-Hopf formula, the slice is a quotient object, and slice_flow / loss_slice name what
they cannot take."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quotient_sgd.hj import cole_hopf, cole_hopf_gradient, Grid, loss_slice, slice_flow, solve_hj
from quotient_sgd.models import MLP

# NumPy constants: read in float64 inside the x64 tests
_D1 = {"w": np.array([0.6, 0.8, 0.0]), "b": np.zeros(())}
_D2 = {"w": np.array([0.0, 0.0, 1.0]), "b": np.zeros(())}
_C = {"w": np.array([0.1, -0.2, 0.05]), "b": np.asarray(0.3)}
_EDGE = {"w": np.array([0.6, 0.7, 0.0]), "b": np.asarray(0.3)}  # |w| near 1: the loss is NaN on part of the slice


def _bowl(p):
    # finite where |w| < 1 only: a centre near the unit sphere puts NaN on the slice
    a = jnp.dot(p["w"], jnp.asarray(_D1["w"], p["w"].dtype))
    return jnp.cos(jnp.pi * a) / jnp.pi + p["b"] ** 2 + 0.1 * jnp.sqrt(1.0 - jnp.dot(p["w"], p["w"]))


# one compiled program for every traced call below (eta, k, nu, the centre and the directions are inputs)
_traced = jax.jit(lambda c, a, b, eta, k: slice_flow(_bowl, c, (a, b), extent=0.3, n=5, eta=eta, k=k, nu=0.05,
                                                     margin=0.0, orthonormalize=True))


def _runtime_message(err) -> str:
    found = re.findall(r"EquinoxRuntimeError: ([^\n]*)", str(err))
    return found[0] if found else str(err)


def test_traced_slice_inputs_out_of_contract_are_refused_by_name(x64):
    eta, k = jnp.asarray(0.05), jnp.asarray(2)
    ok = _traced(_C, _D1, _D2, eta, k)
    assert np.all(np.isfinite(np.asarray(ok.u)))
    # at t = 0 nothing travels from the boundary: the slice is the loss itself, inside any margin (even 0)
    still = _traced(_C, _D1, _D2, eta, jnp.asarray(0))
    np.testing.assert_allclose(np.asarray(still.u), np.asarray(still.loss), rtol=0, atol=1e-12)
    assert float(still.reach) == 0.0 and bool(still.boundary_ok)
    # a direction dependent on the one before it: orthonormalised, it was rounding noise (Gram off-diagonal -0.45)
    third = jax.tree.map(lambda v: v / 3, _D1)
    with pytest.raises(Exception) as err:
        jax.block_until_ready(_traced(_C, _D1, third, eta, k))
    assert "direction 1 is zero or linearly dependent" in _runtime_message(err.value)
    zero = jax.tree.map(jnp.zeros_like, _D1)
    with pytest.raises(Exception) as err:
        jax.block_until_ready(_traced(_C, zero, _D2, eta, k))
    assert "direction 0 is zero or linearly dependent" in _runtime_message(err.value)
    # a negative eta and k make a positive t = eta * k: it flowed without a word
    with pytest.raises(Exception) as err:
        jax.block_until_ready(_traced(_C, _D1, _D2, -eta, -k))
    assert "traced eta, k or nu is out of range" in _runtime_message(err.value)
    # the loss is NaN at the slice's corner (|w| > 1): named as loss_fn, not as solve_hj's initial field
    with pytest.raises(Exception) as err:
        jax.block_until_ready(_traced(_EDGE, _D1, _D2, eta, k))
    assert "loss_fn is not finite" in _runtime_message(err.value)


class _Unhashable:
    """A loss slice_flow cannot key a compiled program on: it runs op by op."""

    __hash__ = None

    def __call__(self, p):
        return _bowl(p)


def test_known_slice_inputs_out_of_contract_are_refused_by_name(x64):
    g = Grid(5, -0.5, 0.5, periodic=False)
    with pytest.raises(ValueError, match="loss_slice: grid="):
        loss_slice(_bowl, _C, _D1, 5)
    with pytest.raises(ValueError, match=r"loss_slice: loss_fn returns shape \(1,\)"):
        loss_slice(lambda p: _bowl(p)[None], _C, _D1, g)
    # an integer leaf cast the direction to integers: the coefficients a were truncated and the slice came out flat
    counts = {"w": np.array([0, 1, 0]), "b": np.asarray(0.3)}
    with pytest.raises(ValueError, match="loss_slice: params has a leaf of dtype int"):
        loss_slice(lambda p: jnp.sum(p["w"].astype(p["b"].dtype) ** 2) + p["b"], counts, _D1, g)
    kw = dict(extent=0.5, n=5, eta=0.1, k=1, nu=0.1)
    with pytest.raises(ValueError, match="slice_flow: loss_fn returns shape"):
        slice_flow(lambda p: _bowl(p).astype(jnp.complex128), _C, _D1, **kw)
    with pytest.raises(ValueError, match="slice_flow: eta must be a scalar"):
        slice_flow(_bowl, _C, _D1, **{**kw, "eta": jnp.array([0.1, 0.2])})
    with pytest.raises(ValueError, match="slice_flow: k must be a scalar"):
        slice_flow(_bowl, _C, _D1, **{**kw, "k": np.array([1, 2])})
    # known values (the op-by-op path): the first node where the loss is not finite is named (|w| > 1 from a = 0.079)
    with pytest.raises(ValueError, match=r"slice_flow: loss_fn is nan at a = 0.25 "):
        slice_flow(_Unhashable(), _EDGE, _D1, **kw)
    # loss_slice itself samples the loss along the direction as given
    a = np.asarray(g.x)
    direct = [float(_bowl(jax.tree.map(lambda p, v: p + s * v, _C, _D1))) for s in a]
    np.testing.assert_allclose(np.asarray(loss_slice(_bowl, _C, _D1, g)), direct, rtol=1e-12)


@functools.lru_cache(maxsize=1)
def _mlp():
    # a deep linear network: a smooth (quartic) loss, and a group of general linear maps of the hidden units, which
    # are not isometries of the parameters
    def build():
        return MLP(2, (3,), 1, activation="identity", rngs=nnx.Rngs(0))

    abstract = nnx.eval_shape(build)
    graphdef = nnx.split(abstract, nnx.Param)[0]

    @jax.jit
    def init():  # (one compiled program: op by op the initialisation cost seconds)
        params = jax.tree.map(lambda v: v.astype(jnp.float64), nnx.split(build(), nnx.Param)[1])
        x = jax.random.normal(jax.random.key(1), (8, 2), jnp.float64)
        d = jax.tree.map(lambda v: jax.random.normal(jax.random.key(2), v.shape, v.dtype), params)
        norm = jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree.leaves(d)))
        return params, x, jax.tree.map(lambda v: v / norm, d)

    params, x, d = init()
    y = jnp.sin(x[:, :1])

    def loss(p):
        return 0.5 * jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    return abstract, loss, params, d


def test_coarse_grained_model_slice_is_the_cole_hopf_gaussian_smoothing(x64):
    _, loss, params, d = _mlp()
    eta, k, nu = 0.05, 4, 0.01
    res = slice_flow(loss, params, d, extent=0.8, n=17, eta=eta, k=k, nu=nu, margin=1.0, dt=0.05)
    assert bool(res.boundary_ok)

    def along(s):
        return loss(jax.tree.map(lambda p, v: p + s * v, params, d))

    # THEORY section 3: u(a, t) = -2 nu log E[exp(-L(a + z) / (2 nu))], z ~ N(0, 2 nu t), at t = eta k (the
    # Gibbs weight exp(-L / T) at the temperature T = 2 nu); its slope p = E_w[(x - y) / t] = -E_w[z] / t with the
    # same weights.  Float64 quadrature on +-12 standard deviations
    sd = np.sqrt(2 * nu * eta * k)
    z = np.linspace(-12 * sd, 12 * sd, 2401)
    gauss = np.exp(-0.5 * (z / sd) ** 2)
    pts = jnp.asarray(np.asarray(res.grid.x)[:, None] + z[None, :])
    vals = np.asarray(jax.vmap(jax.vmap(along))(pts))
    low = vals.min(axis=1, keepdims=True)
    w = gauss * np.exp(-(vals - low) / (2 * nu))
    u_ref = low[:, 0] - 2 * nu * np.log(np.sum(w, axis=1) / np.sum(gauss))
    p_ref = -np.sum(w * z, axis=1) / np.sum(w, axis=1) / (eta * k)
    # the finite-volume flow on 17 points: measured 1.1e-4 of the range of u; a factor 2 in the variance 2 nu t or
    # in the Gibbs temperature 2 nu moves u by 1.5e-2 to 2.9e-2 of it
    assert float(np.max(np.abs(np.asarray(res.u) - u_ref))) < 5e-4 * float(np.ptp(u_ref))
    assert float(np.max(np.abs(np.asarray(res.p) - p_ref))) < 5e-3 * float(np.max(np.abs(p_ref)))
    np.testing.assert_allclose(np.asarray(res.loss), vals[:, z.size // 2], rtol=1e-12)


def test_model_slice_is_a_quotient_object(x64):
    # the slice at g . params along the pushed-forward direction d(g . params)[d] is the same function of a, for a
    # random element of the model's group
    model, loss, params, d = _mlp()
    group = model.symmetries()
    grid = Grid(9, -0.8, 0.8, periodic=False)
    here = np.asarray(loss_slice(loss, params, d, grid))
    for seed in range(3):
        g = group.sample(jax.random.key(seed), params)
        moved, pushed = jax.jvp(lambda p: group.act(g, p), (params,), (d,))
        assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(params))) \
            > 0.1
        np.testing.assert_allclose(np.asarray(loss_slice(loss, moved, pushed, grid)), here, rtol=1e-12, atol=1e-14)


def test_cole_hopf_refuses_complex_points_by_name():
    # a complex point was cast to its real part: cole_hopf at 0.3 + 0.5j returned u(0.3) with only a casting warning
    for f in (cole_hopf, cole_hopf_gradient):
        with pytest.raises(TypeError, match=f"{f.__name__}: x has dtype complex"):
            f(lambda y: jnp.cos(jnp.pi * y) / jnp.pi, jnp.array([0.3 + 0.5j]), 0.1, 0.1)


def test_value_form_refuses_data_that_is_not_periodic_on_a_periodic_grid(x64):
    # the loss u0 = x sampled on a periodic grid: finite volumes flowed the sawtooth, 1.08 away from x - t / 2
    g = Grid(16, -1.0, 1.0)
    for scheme in ("fv", "spectral"):
        with pytest.raises(ValueError, match=r"solve_hj: u0 is not periodic on this periodic grid: .* = 1.875, is 15 "):
            solve_hj(g.x, g, nu=0.1, t1=0.05, scheme=scheme)
    g2 = Grid(8, -1.0, 1.0) * Grid(6, -1.0, 1.0, periodic=False)  # along the periodic axis only
    with pytest.raises(ValueError, match="u0 is not periodic on this periodic grid along axis 0"):
        solve_hj(g2.x[0] + g2.x[1], g2, nu=0.1, t1=0.05, scheme="fv")
    # periodic data passes (to the next check, the step budget's, which it is given out of range so that nothing
    # compiles): a sampled periodic loss, one whose steepest step straddles the seam, a constant
    x = g.x
    for u0 in (jnp.cos(jnp.pi * x), jnp.tanh(8 * jnp.sin(jnp.pi * (x + 1 / 32))), jnp.full(16, 3.0)):
        with pytest.raises(ValueError, match="solve_hj: max_steps=0 is not allowed"):
            solve_hj(u0, g, nu=0.5, t1=0.01, scheme="fv", max_steps=0)
