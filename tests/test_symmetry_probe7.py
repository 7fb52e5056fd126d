"""Probe of the symmetry groups beyond the shipped cases: elements far along orbits, opt-in solvers, compositions
and inverses, bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.symmetry import GL, Permutation, Product, Rescale, Scale, SymmetryError, Translation

from helpers import tree_rel_err
from symmetry_cases import mlp_group, mlp_params


def test_newton_canonicalize_with_a_logit_translation_reaches_the_canonical_point(x64):
    """``Product(newton=True)`` on an MLP classifier's rescale chain and logit translation, at points moved by
    elements of scale 3: jointly in (log-factors, shifts) the orbit norm is not convex, and Newton's steps crept
    along a flat valley and stopped at ``newton_iters`` 1e-6 to 2e-3 (relative) away from the canonical point
    (2-3 of 8 samples).  The shifts are now eliminated in closed form: the sweeps' point, to float64 rounding."""
    widths = (2, 3, 3, 2)
    p = mlp_params(jax.random.key(0), widths, dtype=jnp.float64)
    sweeps = mlp_group(widths, permutation=False)
    newton = jax.jit(Product(sweeps.components, newton=True).canonicalize)
    ref = jax.jit(sweeps.canonicalize)
    for seed in (0,):  # 4e-4 off before
        moved = sweeps.act(sweeps.sample(jax.random.key(seed), p, scale=3.0), p)
        assert tree_rel_err(newton(moved), ref(moved)) < 1e-10, seed
        assert tree_rel_err(newton(moved), ref(p)) < 1e-10, seed


def test_a_top_level_path_given_as_a_string_names_that_parameter():
    """A declaration naming a top-level parameter by its key alone (``("w_in", 0)``, the natural spelling for a
    flat dict of parameters) was split into characters (``tuple("w_in")``): refused with "no path ('w', '_', 'i',
    'n')", while one-letter names happened to work.  A string is one key."""
    p = {"w_in": jnp.arange(1.0, 7.0).reshape(3, 2), "b": jnp.ones((3,)), "w_out": jnp.arange(1.0, 7.0).reshape(2, 3)}
    key = {"w_in": ("w_in",), "b": ("b",), "w_out": ("w_out",)}
    same = [
        (Rescale(incoming=(("w_in", 0), ("b", 0)), outgoing=(("w_out", 1),)),
         Rescale(incoming=((key["w_in"], 0), (key["b"], 0)), outgoing=((key["w_out"], 1),))),
        (Scale(members=(("w_in", None),)), Scale(members=((key["w_in"], None),))),
        (Permutation(members=(("w_in", 0), ("b", 0))), Permutation(members=((key["w_in"], 0), (key["b"], 0)))),
        (Translation(kernel="w_in"), Translation(kernel=key["w_in"])),
        (GL(left=("w_in", None), right=("w_out", None)), GL(left=(key["w_in"], None), right=(key["w_out"], None))),
    ]
    for by_str, by_tuple in same:
        assert by_str.paths() == by_tuple.paths()
        assert float(tree_rel_err(by_str.canonicalize(p), by_tuple.canonicalize(p))) == 0.0


@pytest.mark.parametrize("make, needle", [
    (lambda: Rescale(incoming=((("w",), 1.5),), outgoing=((("v",), 0),)), r"\(path, integer axis\).*1\.5"),
    (lambda: Permutation(members=((("w",), "0"),)), r"\(path, integer axis\).*'0'"),
    (lambda: Scale(members=((("w",), True),)), r"\(path, integer axis or None\).*True"),
    (lambda: GL(left="w", right=(("v",), None)), r"left and right must be \(W_path, bias_path_or_None\)"),
    (lambda: GL(left=(("w",), None, None), right=(("v",), None)), r"left and right must be"),
    (lambda: Translation(kernel=None), r"kernel and bias must be parameter paths.*kernel=None"),
])
def test_declarations_refuse_an_axis_that_is_not_an_integer_and_malformed_paths(make, needle):
    """A unit axis of 1.5 was truncated to 1 (``int(1.5)``), ``"0"`` and ``True`` read as integers; a GL factor
    given as a bare string was read character by character; a missing translation kernel raised a bare TypeError."""
    with pytest.raises(SymmetryError, match=needle):
        make()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(sweeps=0), r"sweeps must be an integer >= 1, got 0"),
    (dict(sweeps=2.5), r"sweeps must be an integer >= 1, got 2\.5"),
    (dict(newton_iters=0), r"newton_iters must be an integer >= 1"),
    (dict(dense_max=-1), r"dense_max must be an integer >= 0"),
    (dict(newton="no"), r"newton must be True or False, got 'no'"),
])
def test_product_refuses_solver_settings_that_are_not_counts(kwargs, needle):
    """``sweeps=0`` returned the parameters unmoved as the canonical point, ``sweeps=2.5`` compared the loop
    counter with a float, and ``newton="no"`` (truthy) switched Newton's method on."""
    comps = mlp_group((2, 3, 3, 2), permutation=False).components
    with pytest.raises(SymmetryError, match=needle):
        Product(comps, **kwargs)


def test_product_refuses_a_single_group_for_its_components():
    with pytest.raises(SymmetryError, match=r"components must be a sequence of groups.*got Rescale"):
        Product(Rescale(incoming=((("w",), 1),), outgoing=((("v",), 0),)))


def _fd_check(fn, p, direction, eps=1e-6):
    """``(grad of <fn(p), w> along direction, central difference of it)`` for a fixed random ``w``."""
    w = jax.tree.map(lambda x: jax.random.normal(jax.random.key(5), x.shape, x.dtype), jax.eval_shape(fn, p))

    def f(q):
        return sum(jnp.sum(a * b) for a, b in zip(jax.tree.leaves(fn(q)), jax.tree.leaves(w)))

    g = jax.jit(jax.grad(f))(p)
    assert all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(g))
    # (the shifted points and the inner product in NumPy: eager jnp compiles each operation)
    ends = [float(f(jax.tree.map(lambda x, d: jnp.asarray(np.asarray(x) + s * eps * np.asarray(d)), p, direction)))
            for s in (1, -1)]
    fd = (ends[0] - ends[1]) / (2 * eps)
    return float(sum(np.sum(np.asarray(a) * np.asarray(b))
                     for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(direction)))), float(fd)


def _direction(p, frozen):
    return {k: jax.tree.map(lambda x: jnp.zeros_like(x) if k in frozen else
                            jax.random.normal(jax.random.key(len(k)), x.shape, x.dtype), v) for k, v in p.items()}


def test_grad_through_canonicalize_of_a_zero_output_head_and_a_rank_deficient_chain_is_finite(x64):
    """A head with W_O = 0 (zero-initialised output projections) has no balanced point and keeps the identity, and
    so does a deep linear chain with a zero layer: the values were finite, but jax.grad of the canonicalisation
    was NaN for every parameter of the action (0 times the infinite derivative of the discarded balancing).  Now
    finite, and equal to the central difference along directions that keep the factor zero."""
    from symmetry_cases import attention_group, attention_params, deep_linear_group, deep_linear_params

    vo = attention_group().component("vo")
    p = attention_params(jax.random.key(0), d_model=4, heads=2, d_head=2, dtype=jnp.float64)
    p = {k: v for k, v in p.items() if k in ("v", "o")}
    p["o"]["kernel"] = jnp.zeros_like(p["o"]["kernel"])
    got, fd = _fd_check(vo.canonicalize, p, _direction(p, frozen=("o",)))
    assert abs(got - fd) < 1e-7 * (1 + abs(fd))

    chain = deep_linear_group((3, 2, 2, 3))
    q = deep_linear_params(jax.random.key(1), (3, 2, 2, 3), dtype=jnp.float64)
    q["layers"][2]["kernel"] = jnp.zeros_like(q["layers"][2]["kernel"])
    d = {"layers": {i: {"kernel": jnp.zeros_like(x["kernel"]) if i == 2 else
                        jax.random.normal(jax.random.key(i), x["kernel"].shape, x["kernel"].dtype)}
                    for i, x in q["layers"].items()}}
    got, fd = _fd_check(chain.canonicalize, q, d)
    assert abs(got - fd) < 1e-7 * (1 + abs(fd))


def test_grad_of_rescale_invariants_at_a_unit_with_a_zero_side_is_finite(x64):
    """``m_j = |in_j| |out_j|`` through ``sqrt(|in|^2 |out|^2)``: a zero output layer made jax.grad of the
    invariants NaN.  Along the incoming side the invariant is constant there (derivative 0, exact)."""
    p = {"w_in": jax.random.normal(jax.random.key(0), (3, 4), jnp.float64), "w_out": jnp.zeros((4, 2), jnp.float64)}
    p["w_out"] = p["w_out"].at[0].set(1.0)  # unit 0 alive, units 1-3 with a zero outgoing side
    group = Rescale(incoming=(("w_in", 1),), outgoing=(("w_out", 0),))
    got, fd = _fd_check(group.invariants, p, _direction(p, frozen=("w_out",)))
    assert abs(got - fd) < 1e-7 * (1 + abs(fd))



def test_act_refuses_a_permutation_element_that_repeats_a_unit():
    """An element whose permutation repeats a unit (``[0, 0, 1, 2]``: two copies of unit 0, unit 3 dropped) was
    applied without a word, changing the network's function; a concrete one is refused naming the action, and a
    valid element (and any element under jit, whose values are unknown) acts as before."""
    from flax import nnx

    from quotient_sgd import models

    model = models.MLP(3, (4,), 2, rngs=nnx.Rngs(0))
    _, p = nnx.split(model, nnx.Param)
    G = model.symmetries()
    g = G.sample(jax.random.key(0), p)
    i = g.indices.index([type(c).__name__ for c in G.components].index("Permutation"))
    elements = list(g.elements)
    elements[i] = jnp.array([0, 0, 1, 2], jnp.int32)
    bad = type(g)(indices=g.indices, elements=tuple(elements))
    with pytest.raises(ValueError, match=r"is not a permutation of 0\.\.3"):
        G.act(bad, p)
    G.act(g, p)  # valid: no error
    jax.jit(G.act)(bad, p)  # traced: values not checked


@pytest.mark.parametrize("kernel, bias", [("float32", "float64"), ("float64", "float32")])
def test_canonicalize_and_invariants_of_parameters_of_mixed_widths(kernel, bias):
    """float32 kernels with float64 biases (or the reverse) failed in the canonicalisation's sweeps with
    "while_loop body function carry input and carry output must have equal types": a step computed from both
    widths promoted the carried element.  The element keeps its width; the canonical point and the invariants agree
    with those of the same parameters in float64 to float32 rounding, and the function is unchanged."""
    from flax import nnx

    from quotient_sgd import models

    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        model = models.MLP(4, (6, 5), 3, classifier=True, rngs=nnx.Rngs(0))
        graph, p = nnx.split(model, nnx.Param)
        G = model.symmetries()
        p = G.act(G.sample(jax.random.key(1), p, 1.0), p)  # off balance
        # (casts and errors in NumPy, the two forward passes one compiled program: eager jnp compiles each operation)
        q = jax.tree_util.tree_map_with_path(
            lambda path, a: jnp.asarray(np.asarray(a).astype(kernel if "kernel" in str(path) else bias)), p)
        q64 = _float64(q)
        c, c64 = G.canonicalize(q), G.canonicalize(q64)
        assert _rel_err(c, c64) < 1e-4
        inv, inv64 = G.invariants(q), G.invariants(q64)
        assert _rel_err(inv, inv64) < 1e-4
        x = jax.random.normal(jax.random.key(2), (7, 4), jnp.float64)
        forward = jax.jit(lambda params: nnx.merge(graph, params)(x))
        out = forward(_float64(c))
        np.testing.assert_allclose(out, forward(q64), rtol=1e-4, atol=1e-5)


def _float64(tree):
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)


def _rel_err(a, b) -> float:
    """``tree_rel_err(a, b)`` with ``a`` read in float64, in NumPy."""
    la, lb = (np.asarray(x, np.float64) for x in jax.tree.leaves(a)), jax.tree.leaves(b)
    diff = np.sqrt(sum(np.sum(np.square(x - np.asarray(y))) for x, y in zip(la, lb)))
    return float(diff / max(np.sqrt(sum(np.sum(np.square(np.asarray(y))) for y in lb)), 1e-30))
