"""Group elements that are not elements: a singular GL matrix and infinite log-factors / shifts are refused by act.

``act`` checked a concrete permutation's values (one that repeats a unit is refused) but not the other
components': a singular GL matrix (an exactly rank-deficient one, or zeros) was solved with and gave the right
factor (``W_K`` / ``W_O``) as inf / NaN, and an infinite log-factor or shift multiplied units by inf or 0 or
made logits infinite, silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quotient_sgd.symmetry import GL, Product, Rescale, Scale, Translation, Word
from tests.symmetry_cases import attention_group, attention_params, mlp_group, mlp_params, normed_group, \
    normed_params


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_act_refuses_a_singular_gl_element_naming_the_action_and_head():
    params = attention_params(jax.random.key(0))  # 2 heads, d_head = 3
    group = attention_group()
    i = [c.name for c in group.components].index("qk")
    good = group.components[i].identity(params)
    # exactly rank-deficient (the LU meets a zero pivot) in head 1; head 0 is the identity
    rank_one = jnp.ones((3, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"GL 'qk'.*singular.*head \(1,\)"):
        group.act(Word((i,), (good.at[1].set(rank_one),)), params)
    with pytest.raises(ValueError, match=r"GL 'qk'.*singular"):
        group.act(Word((i,), (jnp.zeros_like(good),)), params)
    # the stand-alone component refuses it too (no head axes: a deep-linear GL)
    gl = GL(left=(("a",), None), right=(("b",), None), kind="vo", name="chain")
    chain = {"a": jnp.ones((4, 2), jnp.float32), "b": jnp.ones((2, 5), jnp.float32)}
    with pytest.raises(ValueError, match=r"GL 'chain'.*singular"):
        gl.act(jnp.asarray([[1.0, 2.0], [2.0, 4.0]], jnp.float32), chain)
    # an invertible element, sampled or not, is applied as before, and the right factor is finite
    g = group.sample(jax.random.key(1), params, 1.0)
    moved = group.act(g, params)
    assert _all_finite(moved)
    perm = jnp.asarray([[0.0, 1.0], [1.0, 0.0]], jnp.float32)  # determinant -1: invertible, not refused
    assert _all_finite(gl.act(perm, chain))


def test_act_refuses_infinite_log_factors_and_shifts():
    widths = (3, 4, 2)
    params = mlp_params(jax.random.key(2), widths)
    group = mlp_group(widths, permutation=False)  # rescale/0, translation
    names = [c.name for c in group.components]
    r, t = names.index("rescale/0"), names.index("translation")
    log_a = group.components[r].identity(params)
    with pytest.raises(ValueError, match=r"'rescale/0' has infinite entries"):
        group.act(Word((r,), (log_a.at[2].set(jnp.inf),)), params)
    with pytest.raises(ValueError, match=r"'rescale/0' has infinite entries"):
        group.act(Word((r,), (log_a.at[0].set(-jnp.inf),)), params)
    shift = group.components[t].identity(params)
    with pytest.raises(ValueError, match=r"'translation' has infinite entries"):
        group.act(Word((t,), ({"a": shift["a"], "c": jnp.asarray(jnp.inf, jnp.float32)},)), params)
    nparams = normed_params(jax.random.key(3))
    ngroup = normed_group()
    s = [c.name for c in ngroup.components].index("scale")
    with pytest.raises(ValueError, match=r"'scale' has infinite entries"):
        ngroup.act(Word((s,), (jnp.asarray(jnp.inf, jnp.float32),)), nparams)
    # stand-alone components refuse them too; finite large log-factors are still applied
    resc = Rescale(incoming=((("w",), 1),), outgoing=((("v",), 0),), name="r")
    p = {"w": jnp.ones((2, 3), jnp.float32), "v": jnp.ones((3, 2), jnp.float32)}
    with pytest.raises(ValueError, match=r"'r' has infinite entries"):
        resc.act(jnp.asarray([0.0, jnp.inf, 0.0], jnp.float32), p)
    moved = resc.act(jnp.asarray([0.0, 3.0, -3.0], jnp.float32), p)
    np.testing.assert_allclose(np.asarray(moved["w"][0]), np.exp([0.0, 3.0, -3.0]), rtol=1e-6)
    sc = Scale(members=((("w",), None),), name="s")
    with pytest.raises(ValueError, match=r"'s' has infinite entries"):
        sc.act(jnp.asarray(-jnp.inf, jnp.float32), {"w": jnp.ones((2,), jnp.float32)})
    tr = Translation(kernel=("k",), bias=None, name="tr")
    with pytest.raises(ValueError, match=r"'tr' has infinite entries"):
        tr.act({"a": jnp.asarray([jnp.inf, 0.0], jnp.float32), "c": jnp.zeros((), jnp.float32)},
               {"k": jnp.ones((2, 3), jnp.float32)})
    # a NaN element (the canonical element of NaN parameters, a diverged run) still passes: its NaNs reach the output
    nan = Product([resc]).act(Word((0,), (jnp.full((3,), jnp.nan, jnp.float32),)), p)
    assert bool(jnp.all(jnp.isnan(nan["w"])))


def test_element_checks_accept_a_concrete_element_inside_jit_and_low_precision_elements():
    """The checks read a concrete element with NumPy: closed over by a jitted function (not a tracer, so checked)
    it is still applied, and refused when singular; bfloat16 elements are read too."""
    params = attention_params(jax.random.key(4))
    group = attention_group()
    g = group.sample(jax.random.key(5), params, 1.0)
    eager = group.act(g, params)
    inside = jax.jit(lambda p: group.act(g, p))(params)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(inside), jax.tree.leaves(eager))) \
        < 1e-5
    i = [c.name for c in group.components].index("vo")
    bad = Word((i,), (jnp.zeros((2, 3, 3), jnp.float32),))
    with pytest.raises(ValueError, match=r"GL 'vo'.*singular"):
        jax.jit(lambda p: group.act(bad, p))(params)
    resc = Rescale(incoming=((("w",), 1),), outgoing=((("v",), 0),), name="r16")
    p16 = {"w": jnp.ones((2, 3), jnp.bfloat16), "v": jnp.ones((3, 2), jnp.bfloat16)}
    with pytest.raises(ValueError, match=r"'r16' has infinite entries"):
        resc.act(jnp.asarray([0.0, jnp.inf, 0.0], jnp.bfloat16), p16)
    assert _all_finite(resc.act(jnp.asarray([0.0, 1.0, -1.0], jnp.bfloat16), p16))


def test_an_element_sampled_too_large_for_its_dtype_is_refused_with_a_remedy():
    """A float32 GL element sampled at scale 60 has singular values up to e^90, beyond float32's range: its
    entries are infinite, and act refuses it saying how to avoid it (verify reports this message)."""
    params = attention_params(jax.random.key(6))
    group = attention_group()
    g = group.sample(jax.random.key(7), params, 60.0)
    assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g.elements))
    with pytest.raises(ValueError, match=r"infinite entries.*smaller scale or float64"):
        group.act(g, params)
