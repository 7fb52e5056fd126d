"""Products of group actions, with overlaps handled explicitly."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.scipy.linalg
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .. import _tree
from ._base import (Flat, Group, SymmetryError, _check_key, _check_scale, _compiled, cg_vcoeffs,
                    generic_vcoeffs, reading_invariants, sample_scale, as_count, as_flag)
from . import _reduced
from ._gl import GL, gauged_powers, sylvester_vcoeffs
from ._permutation import Permutation, unit_key, unit_order


class Word(eqx.Module):
    """An element of a :class:`Product`: component elements applied left to right.

    ``Word(indices=(i, j), elements=(g_i, g_j)) . theta = g_j . (g_i . theta)``.  Products of overlapping
    actions need not commute (a permutation and a rescale of one layer), so composition concatenates words
    rather than combining component by component.
    """

    indices: tuple[int, ...] = eqx.field(static=True)
    elements: tuple[Any, ...]


def _clusters(comps, pred) -> tuple[tuple[int, ...], ...]:
    """Connected components of the overlap graph (shared parameter paths) of the comps selected by ``pred``."""
    idx = [i for i, c in enumerate(comps) if pred(c)]
    parent = {i: i for i in idx}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a in idx:
        for b in idx:
            if a < b and set(comps[a].paths()) & set(comps[b].paths()):
                parent[find(a)] = find(b)
    groups: dict[int, list[int]] = {}
    for i in idx:
        groups.setdefault(find(i), []).append(i)
    return tuple(tuple(g) for g in sorted(groups.values()))


def _gl_chain_order(comps):
    """For a chain of head-free GL 'vo' actions (a deep linear stack ``W_1 W_2 ... W_L``): the matrix paths in
    order and the components in order (component ``l`` acts between ``W_l`` and ``W_{l+1}``); ``None`` for any
    other cluster."""
    from ._gl import GL

    if not all(isinstance(c, GL) and c.kind == "vo" and c.left[1] is None for c in comps):
        return None
    lefts = {c.left[0]: c for c in comps}
    rights = {c.right[0] for c in comps}
    starts = [c for c in comps if c.left[0] not in rights]
    if len(starts) != 1:
        return None
    order, chain, c = [starts[0].left[0]], [starts[0]], starts[0]
    while True:
        order.append(c.right[0])
        if c.right[0] not in lefts:
            break
        c = lefts[c.right[0]]
        chain.append(c)
    if len(order) != len(comps) + 1:
        return None
    return order, chain


def _gl_chain(comps):
    """For a GL chain (see :func:`_gl_chain_order`), a function returning the end-to-end product (the orbit
    invariant of the chain); ``None`` for any other cluster."""
    found = _gl_chain_order(comps)
    if found is None:
        return None
    order = found[0]

    def product(flat):
        m = flat[order[0]]
        for p in order[1:]:
            m = m @ flat[p]
        return m

    return product


#: Largest cluster of overlapping non-abelian actions (a deep linear GL chain) whose vertical projection is a
#: dense solve (its Gram matrix from ``k`` tangent products, then a pseudo-inverse); larger ones use CG, which on
#: such clusters can stall at its step cap far from the solution (their Gram matrices are not diagonally dominant).
NONABELIAN_DENSE_MAX = 1024


#: The solver settings of :class:`Product` and their defaults (the merge rule for nested products reads them).
_DEFAULT_SETTINGS = {"newton": False, "newton_iters": 40, "sweeps": 500, "dense_max": 64}


def _merge_settings(name: str, settings: dict, source: dict, inner: "Product") -> None:
    """Merge the solver settings of the nested product ``inner`` into ``settings`` (see :class:`Product`, nested
    products): a setting at its default takes the other's value; two values that both differ from the default and
    from each other raise ``SymmetryError`` naming the setting, both values and where each came from."""
    for key, default in _DEFAULT_SETTINGS.items():
        value = getattr(inner, key)
        if value == default:
            continue
        if settings[key] == default:
            settings[key], source[key] = value, f"the nested product {inner.name!r}"
        elif settings[key] != value:
            raise SymmetryError(
                f"Product {name!r}: {key}={value!r} in the nested product {inner.name!r} conflicts with "
                f"{key}={settings[key]!r} in {source[key]}; a product has one set of solver settings (newton, "
                f"newton_iters, sweeps, dense_max) for all its components, nested products' included: give the "
                f"value once, to the outer Product, or the same value to both")


class Product(Group):
    """The product of component actions (a model's full symmetry group).

    Components may overlap (share parameter arrays): the rescale of layer ``l`` and of layer ``l+1`` both act on
    ``W_{l+1}``; a permutation and a rescale act on the same units.  Overlaps are handled explicitly:

    - elements are :class:`Word` s, so non-commuting components compose correctly;
    - ``vertical`` / ``horizontal``: components are grouped into clusters of overlapping continuous actions.
      A cluster of one uses its closed form; a larger cluster (a chain of rescales) solves the joint normal
      equations ``J^T J c = J^T v`` (a dense solve up to ``dense_max`` generators, preconditioned CG above, on
      the squared weights for a rescale chain), because the tangents of overlapping components are not
      orthogonal.  A chain of rescales (with a logit translation; scales, per channel as a BatchNorm CNN's or of a
      whole block as a LayerNorm CNN's, read as rescales without outgoing members) up to ``dense_max`` units
      factorises its Gram matrix as a diagonally dominant M-matrix, without cancellation
      (``_reduced.direct_vcoeffs``), so float32 stays accurate far from balance;
    - ``canonicalize``: per cluster, continuous components first -- a single component by its closed form;
      with ``newton=True``, several abelian minimum-norm components (rescale chains, with the logit translation
      eliminated in closed form) jointly, by Newton's method on the orbit norm ``f(xi) = |exp(xi) . theta|^2`` in
      Lie-algebra coordinates (convex for rescale: a sum of exponentials of linear functions; the Hessian is
      ``k x k`` with ``k`` the number of generators, pseudo-inverted, with a backtracking line search);
      otherwise by repeated sweeps of the
      components' own canonicalisations (a logit translation swept, and applied, after the rescales and scales
      of its cluster, whatever the listing order); a minimal deep linear GL chain by the SVD of its end-to-end product
      (balanced, diagonal inner factors).  Permutations in a cluster then sort units by keys evaluated at that
      continuous-canonical point (so the keys are orbit invariants), the sort is applied to the original
      parameters (entries move without arithmetic, so permutations canonicalise bit for bit), and the
      continuous canonicalisation is applied again;
    - ``invariants``: a component alone in its cluster reports its own invariants.  A cluster of
      non-overlapping continuous actions and the permutations that reorder their units (attention QK / VO with
      the head permutation; a rescale with its unit permutation) reports each continuous action's own
      invariants with the units sorted by keys built from them (no canonicalisation).  Any other cluster
      reports its components' invariants at the cluster's canonical point.  Either way they are invariant
      under the whole group.
    - lone GL actions share one batched SVD for their Sylvester solves.

    Solver settings: ``newton`` (Newton's method for abelian minimum-norm clusters), ``newton_iters`` (its
    iteration cap), ``sweeps`` (the block-coordinate sweeps' cap) and ``dense_max`` (the largest abelian cluster
    solved densely in ``vertical`` / ``horizontal``) hold for every cluster of the product.

    Nested products: a :class:`Product` among the components is flattened into its components (clusters are formed
    over all of them, so one cluster may join components of several nested products).  Its solver settings are
    merged into this product's, setting by setting: a value equal to the default (``newton=False``,
    ``newton_iters=40``, ``sweeps=500``, ``dense_max=64``) takes the other's value, so
    ``Product([inner], newton=True)`` and ``Product([Product(comps, newton=True)])`` both use Newton's method, and
    nesting a product alone changes none of its results; two values that differ from the default and from each
    other (``sweeps=5`` inside, ``sweeps=50`` outside, or in two nested products) raise ``SymmetryError`` naming
    the setting.  The merged values are this product's attributes.  (They were the outer product's alone: a nested
    product's settings were silently dropped.)
    """

    components: tuple[Group, ...]
    newton_iters: int = eqx.field(static=True, default=40)
    sweeps: int = eqx.field(static=True, default=500)
    newton: bool = eqx.field(static=True, default=False)
    dense_max: int = eqx.field(static=True, default=64)

    def __init__(self, components, name: str = "product", *, newton_iters: int = 40, sweeps: int = 500,
                 newton: bool = False, dense_max: int = 64):
        if isinstance(components, Group) or not hasattr(components, "__iter__"):
            raise SymmetryError(f"Product {name!r}: components must be a sequence of groups, e.g. [Rescale(...), "
                                f"Permutation(...)], got {components!r}")
        settings = {"newton": as_flag(newton)}  # (NumPy and concrete 0-d JAX bools / integers taken as Python's)
        if settings["newton"] is None:
            raise SymmetryError(f"Product {name!r}: newton must be True or False, got {newton!r}")
        for arg, value, least in (("newton_iters", newton_iters, 1), ("sweeps", sweeps, 1),
                                  ("dense_max", dense_max, 0)):
            settings[arg] = as_count(value)
            if settings[arg] is None or settings[arg] < least:
                # sweeps=0 returned the parameters unmoved as the "canonical" point
                raise SymmetryError(f"Product {name!r}: {arg} must be an integer >= {least}, got {value!r}")
        source = {k: "this product" for k, v in settings.items() if v != _DEFAULT_SETTINGS[k]}
        comps = []
        for c in components:
            if not isinstance(c, Group):
                raise SymmetryError(f"Product {name!r}: components must be groups (Rescale, Scale, GL, ...), got "
                                    f"{c!r}")
            if isinstance(c, Product):
                _merge_settings(name, settings, source, c)
            comps.extend(c.components if isinstance(c, Product) else [c])
        names = [c.name for c in comps]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SymmetryError(f"Product {name!r}: component names must be unique, repeated: {sorted(dup)}")
        self.components = tuple(comps)
        self.name = name
        self.newton_iters = settings["newton_iters"]
        self.sweeps = settings["sweeps"]
        self.newton = settings["newton"]
        self.dense_max = settings["dense_max"]

    # --- structure ----------------------------------------------------------------------------------------
    @property
    def continuous(self) -> bool:  # type: ignore[override]
        return any(c.continuous for c in self.components)

    @property
    def charge_linear(self) -> dict[str, bool]:  # type: ignore[override]
        return {c.name: c.charge_linear for c in self.components if c.continuous}

    def component(self, name: str) -> Group:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component named {name!r}; components: {[c.name for c in self.components]}")

    def _cont(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.components) if c.continuous)

    def continuous_clusters(self):
        return _clusters(self.components, lambda c: c.continuous)

    def clusters(self):
        return _clusters(self.components, lambda c: True)

    def paths(self):
        seen = []
        for c in self.components:
            seen.extend(p for p in c.paths() if p not in seen)
        return tuple(seen)

    def _check(self, flat):
        for c in self.components:
            c._check(flat)

    # --- group law --------------------------------------------------------------------------------------
    def _sample(self, key, flat, scale):
        keys = jax.random.split(key, max(len(self.components), 1))
        return Word(tuple(range(len(self.components))),
                    tuple(c._sample(k, flat, scale) for c, k in zip(self.components, keys)))

    def sample_component(self, key, params, name: str, scale: float = 1.0) -> Word:
        """A random element of the component ``name`` alone, as an element of the product."""
        _check_scale(scale, "sample_component")
        _check_key(key, "sample_component")
        i = [c.name for c in self.components].index(self.component(name).name)
        flat, _ = self._flat(params)
        comp = self.components[i]
        # (compiled as sample is: bfloat16 / float16 parameters in float32, whose GL QR XLA:CPU lacks; it failed
        # with "Unsupported dtype bfloat16" where sample returned a float32 element)
        return Word((i,), (_compiled(comp, "_sample", key, flat, sample_scale(scale, flat, comp.paths())),))

    def _identity(self, flat):
        return Word((), ())

    def _check_element(self, g, flat, where: str = "") -> None:
        self._check_word(g)
        for pos, (i, e) in enumerate(zip(g.indices, g.elements)):
            self.components[i]._check_element(e, flat, f"{where}position {pos} of the Word: ")

    def _check_word(self, g) -> None:
        if not isinstance(g, Word):
            raise TypeError(f"Product {self.name!r}: an element must be a Word (from sample, sample_component, "
                            f"identity, canonical_element, compose or inverse of this group), got {type(g).__name__}")
        bad = [i for i in g.indices if not 0 <= i < len(self.components)]
        if bad or len(g.indices) != len(g.elements):
            raise ValueError(f"Product {self.name!r}: the Word names components {list(g.indices)} with "
                             f"{len(g.elements)} elements; this group has components 0..{len(self.components) - 1} "
                             f"({[c.name for c in self.components]}), one element each")

    def _act(self, g: Word, flat):
        self._check_word(g)
        for i, e in zip(g.indices, g.elements):
            flat = self.components[i]._act(e, flat)
        return flat

    def _cotransport(self, g: Word, cot):
        # rho(k_n ... k_1)^{-T} = rho(k_n)^{-T} ... rho(k_1)^{-T}: the components' own, in the word's order
        self._check_word(g)
        for i, e in zip(g.indices, g.elements):
            cot = self.components[i]._cotransport(e, cot)
        return cot

    def _inverse(self, g: Word):
        self._check_word(g)
        return Word(tuple(reversed(g.indices)),
                    tuple(self.components[i]._inverse(e) for i, e in zip(reversed(g.indices), reversed(g.elements))))

    def _compose(self, g: Word, h: Word):
        self._check_word(g)
        self._check_word(h)
        return Word(h.indices + g.indices, h.elements + g.elements)

    # --- Lie algebra (continuous components, in order) -------------------------------------------------------
    def _exp(self, xi):
        idx = self._cont()
        return Word(idx, tuple(self.components[i]._exp(x) for i, x in zip(idx, xi)))

    def _algebra_zeros(self, flat):
        return tuple(self.components[i]._algebra_zeros(flat) for i in self._cont())

    def _tmap(self, flat, xi):
        out: Flat = {}
        for i, x in zip(self._cont(), xi):
            for p, d in self.components[i]._tmap(flat, x).items():
                out[p] = out[p] + d if p in out else d
        return out

    def _tmap_T(self, flat, v):
        return tuple(self.components[i]._tmap_T(flat, v) for i in self._cont())

    def _vcoeffs(self, flat, v):
        idx = self._cont()
        coeffs: dict[int, Any] = {}
        # lone GL actions (attention heads of every block): one batched Sylvester solve for all of them
        gl = [cl[0] for cl in self.continuous_clusters() if len(cl) == 1 and isinstance(self.components[cl[0]], GL)]
        coeffs.update(zip(gl, sylvester_vcoeffs(tuple(self.components[i] for i in gl), flat, v)))
        for cl in self.continuous_clusters():
            if len(cl) == 1 and cl[0] in coeffs:
                continue
            if len(cl) == 1:
                coeffs[cl[0]] = self.components[cl[0]]._vcoeffs(flat, v)
            else:
                comps = tuple(self.components[i] for i in cl)
                k = sum(x.size for c in comps for x in jax.tree.leaves(c._algebra_zeros(flat)))
                # small clusters: exact dense solve; large ones: matrix-free CG (O(P) per iteration).  Overlapping
                # non-abelian actions (a deep linear GL chain) couple their generators far from diagonally: Jacobi-
                # preconditioned CG stalled at its step cap on one of 72 generators (16-24% off at an unbalanced
                # point), so they are solved densely up to NONABELIAN_DENSE_MAX generators.
                dense = k <= (NONABELIAN_DENSE_MAX if any(not getattr(c, "abelian", True) for c in comps)
                              else self.dense_max)
                # a chain of plain rescales (and a logit translation): the Gram matrix from the squared weights
                # (_reduced); up to dense_max units factorised exactly as an M-matrix, above by CG
                split = _reduced.split_cluster(comps, flat)
                signs = None if split is None or not dense else _reduced.m_signs(split[2], len(split[0]))
                # per-channel scales chained with rescales (a BatchNorm CNN: each conv's channel scales, and the
                # rescale between a norm's (scale, bias) and the next conv's input channels) have the tangents of
                # rescales with incoming members only, so the same factorisation applies.  The eigendecomposition
                # lost the direction the two leave on the norm's (scale, bias) alone: the rescale's share of the
                # next kernel is the sum of that kernel's channel-scale tangents, so the direction is their
                # difference, small against the kernel far from balance (float32, a (1, 2)-channel BatchNorm CNN
                # at an element of scale 2: the projection 24% of |v| off, float64 6e-13).  A scale of a whole block
                # (a LayerNorm CNN's conv kernel and bias) is one such unit: chained with the rescale between the
                # previous norm's (scale, bias) and that kernel's input channels, the eigendecomposition left the
                # float32 projection 13% of |v| off at an element of scale 3 (a (3, 3)-channel CNN; 3 of 16 samples
                # above 1e-3 on a (4, 8) one), the factorisation 6e-6 / 2e-5
                wide = None if split is not None or not dense else _reduced.split_cluster(comps, flat, scales=True)
                wide_signs = None if wide is None else _reduced.m_signs(wide[2], len(wide[0]))
                if signs is not None:
                    sol = _reduced.direct_vcoeffs(comps, flat, v, split, signs)
                elif wide_signs is not None:
                    sol = _reduced.direct_vcoeffs(comps, flat, v, wide, wide_signs)
                elif dense:
                    sol = generic_vcoeffs(comps, flat, v)
                else:
                    sol = cg_vcoeffs(comps, flat, v) if split is None else _reduced.vcoeffs(comps, flat, v, split)
                coeffs.update(zip(cl, sol))
        return tuple(coeffs[i] for i in idx)

    # --- canonical representative ---------------------------------------------------------------------------
    def _newton(self, cl, flat) -> Word:
        """Joint canonicalisation of a cluster of abelian minimum-norm components by Newton's method on the orbit
        norm in Lie-algebra coordinates (see the class docstring).

        Shift actions (a logit :class:`Translation`) are eliminated in closed form: the Newton variables are the
        other components' coordinates, and the norm is evaluated after each shift's own minimum-norm element at
        the point they reach (variable projection; at the minimum the shift's partial derivatives vanish, so the
        stationary point is the joint minimum-norm point).  Jointly in (log-factors, shifts) the norm is not
        convex (a shift adds to rows that the rescales scale): Newton's steps there crept along a flat valley and
        stopped at ``newton_iters`` 1e-4 to 5e-2 away from the canonical point (an MLP classifier moved by
        elements of scale 3, half of the samples).  With the shifts eliminated the norm is the rescale chain's
        convex one at the class-centred point, and the shifts act after the others in the returned word."""
        order = sorted(range(len(cl)), key=lambda j: self.components[cl[j]].shift_action)
        cl = tuple(cl[j] for j in order)
        comps = tuple(self.components[i] for i in cl)
        paths = list(dict.fromkeys(p for c in comps for p in c.paths()))  # ordered: a set would make the
        # summation order (and the compiled program) depend on PYTHONHASHSEED
        shifts = tuple(c for c in comps if c.shift_action)
        comps = comps[:len(comps) - len(shifts)]
        if not comps:  # nothing to eliminate the shifts against
            comps, shifts = shifts, ()

        def apply(xis, f):
            for c, x in zip(comps, xis):
                f = c._act(c._exp(x), f)
            return f

        def settle(f):
            """``f`` moved by each shift's minimum-norm element, and those elements."""
            elems = []
            for c in shifts:
                elems.append(c._canonical_element(f))
                f = c._act(elems[-1], f)
            return f, tuple(elems)

        xi0 = tuple(c._algebra_zeros(flat) for c in comps)
        vec0, unravel = ravel_pytree(xi0)

        def sqnorm(vec):
            f = settle(apply(unravel(vec), flat))[0]
            return sum(jnp.sum(jnp.square(f[p])) for p in paths)

        ts = jnp.asarray([1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 64, 0.0], vec0.dtype)
        tol = 64 * jnp.finfo(vec0.dtype).eps

        def body(carry):
            vec, it, _ = carry
            grad = jax.grad(sqnorm)(vec)
            hess = jax.hessian(sqnorm)(vec)
            # Jacobi-scaled pseudo-inverse: generators of very different norms stay resolvable in float32.
            dg = jnp.sqrt(jnp.maximum(jnp.diagonal(hess), jnp.finfo(hess.dtype).tiny))
            w, U = jnp.linalg.eigh(hess / dg[:, None] / dg[None, :])
            winv = jnp.where(w > jnp.finfo(w.dtype).eps * w.shape[0] * jnp.max(w), 1 / jnp.where(w > 0, w, 1), 0)
            step = -(U @ (winv * (U.T @ (grad / dg)))) / dg
            norms = jax.vmap(lambda t: sqnorm(vec + t * step))(ts)
            # Near the minimum the decrease is below the float resolution of the norm, so the line search can no
            # longer rank the candidates: inside the quadratic-convergence region take the full Newton step.
            t = jnp.where(jnp.max(jnp.abs(step)) < 0.25, ts[0], ts[jnp.argmin(norms)])
            return vec + t * step, it + 1, jnp.max(jnp.abs(t * step))

        def cond(carry):
            _, it, size = carry
            return (it < self.newton_iters) & (size > tol)

        # Start from a few block-coordinate sweeps (each component's closed-form canonicalisation given the
        # others; for these abelian actions the algebra coordinates are the element's log-factors / shifts).
        xis = list(xi0)
        for _ in range(4):
            for j, c in enumerate(comps):
                cur = settle(apply(tuple(xis), flat))[0]
                xis[j] = jax.tree.map(jnp.add, xis[j], c._canonical_element(cur))
        vec_init = ravel_pytree(tuple(xis))[0]

        def solve(_, v):
            return jax.lax.while_loop(cond, body, (v, jnp.asarray(0), jnp.asarray(jnp.inf, vec0.dtype)))[0]

        def tangent_solve(lin, y):  # the Hessian of the norm, pseudo-inverted (a generator with zero tangent: 0)
            return jnp.linalg.lstsq(jax.jacfwd(lin)(jnp.zeros_like(y)), y)[0]

        # as in the sweeps: implicit differentiation at the minimum (grad sqnorm = 0) instead of the while_loop
        vec = jax.lax.custom_root(jax.grad(sqnorm), jax.lax.stop_gradient(vec_init), solve, tangent_solve)
        xis = unravel(vec)
        return Word(cl, tuple(c._exp(x) for c, x in zip(comps, xis)) + settle(apply(xis, flat))[1])

    def _continuous_canonical(self, cont, flat, init: dict | None = None) -> Word:
        word = Word((), ())
        sub = _clusters(self.components, lambda c: c.continuous)
        for cl in sub:
            if set(cl) <= set(cont):
                word = self._compose(self._continuous_subcluster(cl, flat, init), word)
        return word

    def _continuous_subcluster(self, cl, flat, init: dict | None = None) -> Word:
        comps = [self.components[i] for i in cl]
        if len(cl) == 1:
            return Word(cl, (comps[0]._canonical_element(flat),))
        if all(c.canonical_kind == "min_norm" and getattr(c, "abelian", True) for c in comps) and self.newton:
            return self._newton(cl, flat)
        if _gl_chain_order(comps) is not None:
            return self._gl_chain_canonical(cl, flat)
        if any(getattr(c, "abelian", True) is False for c in comps):
            raise SymmetryError(
                f"canonicalize: components {[c.name for c in comps]} overlap and include a non-abelian action "
                f"other than a deep linear GL chain; no canonical section is implemented for that case (nor "
                f"invariants, which such a cluster reads at its canonical point); act, vertical / horizontal, tangents "
                f"and charges work."
            )
        return self._sweeps(cl, flat, None if init is None else tuple(init[i] for i in cl))

    def _gl_chain_canonical(self, cl, flat, word_only: bool = False):
        """Canonical representative of a minimal deep linear chain ``M = W_1 W_2 ... W_L`` (every inner width
        ``n`` equal, ``n <= min(d_in, d_out)``, ``M`` of rank ``n``): the orbit is then determined by ``M``.  With
        the thin SVD ``M = U S V^T`` (``n`` columns; signs fixed so that the largest-magnitude entry of each
        column of ``U`` is positive, and where singular values repeat the basis of their subspace by
        :func:`~._gl.spectral_gauge`, so that the point is the same for every SVD of ``M``) the representative is
        ``W_1 = U S^{1/L}``, ``W_l = S^{1/L}`` (diagonal), ``W_L = S^{1/L} V^T``: balanced (``W_l^T W_l = W_{l+1}
        W_{l+1}^T``, the minimum-norm point of the orbit), with the remaining orthogonal freedom fixed by the
        diagonal inner factors.  The element of bond ``l`` is ``A_l = P_l^+ U S^{l/L} Q`` with ``P_l = W_1 ...
        W_l`` (the partial product moves as ``P_l -> P_l A_l``) and ``Q`` the gauge's orthogonal matrix.
        A chain whose ``M`` has rank ``< n`` has no balanced point on its orbit and is left as it is.

        Limits (measured): such a rank-deficient chain's orbit is not closed (the minimum norm is approached, never
        attained), so no canonical section exists there and ``canonicalize`` is not an orbit invariant on it: a
        6-4-4-5 chain with one zero column in its middle factor gave canonical points 129% apart for ``p`` and
        ``g . p`` (float64, element scale 1); its invariants (the end-to-end product) are exact.  Near that set the
        point is ill conditioned in float32: with a middle factor of condition number ``1e6`` (``1e9``) idempotence
        and invariance under an element of scale 1 were ``5e-4`` to ``1.4e-3`` (``1e-2`` to ``3e-2``), against
        ``1e-12`` (``1e-10``) in float64.  Chains that are not minimal (an inner width above ``min(input, output)``
        or unequal inner widths) raise ``SymmetryError`` here; their invariants work."""
        order, chain = _gl_chain_order(tuple(self.components[i] for i in cl))
        mats = [flat[p] for p in order]
        widths = {m.shape[1] for m in mats[:-1]}
        n, L = mats[0].shape[1], len(mats)
        if len(widths) != 1 or n > min(mats[0].shape[0], mats[-1].shape[1]):
            raise SymmetryError(
                f"canonicalize: the GL chain {[c.name for c in chain]} has inner widths "
                f"{[m.shape[1] for m in mats[:-1]]} for input {mats[0].shape[0]} and output {mats[-1].shape[1]}; "
                "a canonical section is implemented for minimal chains only (all inner widths equal and at most "
                "min(input, output)), where the end-to-end product determines the orbit. Use the invariants "
                "(the end-to-end product) instead."
            )

        def word_at(mats):
            P = [mats[0]]
            for m in mats[1:]:
                P.append(P[-1] @ m)
            # U S^{l/L} Q: the gauge Q fixes the signs, and the basis where singular values repeat
            targets = gauged_powers(P[-1], n, tuple(l / L for l in range(1, L)))
            elems = []
            for l, target in zip(range(1, L), targets):
                # P_l^+ target by QR (P_l has full column rank n where the chain is usable): lstsq's SVD made
                # jax.grad garbage (NaN) where P_l's singular values repeat (an orthonormal first factor)
                q, r = jnp.linalg.qr(P[l - 1])
                elems.append(jax.scipy.linalg.solve_triangular(r, q.T @ target, lower=False))
            by_name = {c.name: e for c, e in zip(chain, elems)}
            return Word(cl, tuple(by_name[self.components[i].name] for i in cl))

        if word_only:  # (the element as a function of the chain's matrices, for _gl_chain_point)
            return word_at

        # M of rank < n (a rank-deficient factor): no balanced point lies on the orbit and the elements are singular
        # (the representative would be NaN); the chain then keeps the identity (same function).
        usable, safe_mats = self._gl_chain_usable(cl, order, flat, word_at)
        word = word_at(safe_mats)
        return Word(cl, tuple(jnp.where(usable, e, jnp.eye(e.shape[-1], dtype=e.dtype)) for e in word.elements))

    def _gl_chain_usable(self, cl, order, flat, word_at):
        """``(usable, matrices)`` for a minimal GL chain: whether its elements move it to finite matrices (``M`` of
        full rank), and its matrices, replaced where it is not usable by a well-conditioned chain (end-to-end
        singular values ``1..n``) for the derivatives."""
        mats = [flat[p] for p in order]
        n = mats[0].shape[1]
        fixed = jax.lax.stop_gradient(flat)
        moved = self._act(jax.lax.stop_gradient(word_at([fixed[p] for p in order])), fixed)
        usable = jnp.all(jnp.stack([jnp.all(jnp.isfinite(moved[p])) for p in order]))
        # The identity carries no derivative, but differentiating the discarded elements (zero singular values under
        # a fractional power, a rank-deficient least-squares solve) gave 0 times infinity: jax.grad of the
        # canonicalisation was NaN.  For the derivatives the elements are computed again, with such a chain's
        # matrices replaced by a well-conditioned chain (end-to-end singular values 1..n).
        safe = [jnp.eye(*m.shape, dtype=m.dtype) * (jnp.arange(1, n + 1, dtype=m.dtype)[None, :] if l == 0 else 1)
                for l, m in enumerate(mats)]
        return usable, [jnp.where(usable, m, sm) for m, sm in zip(mats, safe)]

    def _sweeps(self, cl, flat, init=None) -> Word:
        """Block-coordinate canonicalisation of an abelian cluster that is not a pure minimum-norm problem (a
        rescale feeding a scale-invariant block): each component's closed-form canonical element given the others,
        repeated until the elements stop changing (the fixed point is the unique point of the joint orbit that
        satisfies every component's gauge condition; the error contracts geometrically, by about 1/2 a sweep for
        a rescale next to a scale block).  Elements of these actions are additive coordinates (log-factors,
        shifts), so the sweeps accumulate them inside a ``lax.while_loop``.

        Reverse-mode differentiation cannot go through a ``while_loop``: the loop is wrapped in
        ``jax.lax.custom_root`` with the gauge conditions ``r(xi) = (canonical element of each component at
        xi . theta)``, zero at the fixed point, so derivatives of the canonical point follow from the implicit
        function theorem (a dense ``k x k`` least-squares solve with the linearised conditions, ``k`` generators,
        built only when differentiating; a generator with no gauge condition, a unit with a zero side, gets 0).

        Shift actions (a logit :class:`Translation`) are swept, and act in the returned word, after every other
        component of the cluster, whatever the order the product lists them in.  A shift applied *before* a
        rescale of the rows it shifts is scaled by that rescale, so its closed-form element (computed at the
        point after the whole word) over- or under-corrects by the rows' factor: the centring error was multiplied
        by ``1 - a`` each sweep, ``a`` the row factor, and grew without bound for ``a > 2`` (a product listing the
        translation first, with a scale block in the cluster so that the squared-weight path does not apply).
        Applied last, the shift's element centres the final point exactly and the sweeps are those of the
        squared-weight path: the same fixed point for every listing order."""
        order = sorted(range(len(cl)), key=lambda j: self.components[cl[j]].shift_action)
        cl = tuple(cl[j] for j in order)
        init = None if init is None else tuple(init[j] for j in order)
        comps = tuple(self.components[i] for i in cl)
        # (the dtype of the cluster's own parameters: the first leaf of the whole tree may be one no component acts
        # on, an integer step counter that sorts first in nnx.split(model)'s state, whose finfo raised a bare
        # "data type int32 not inexact")
        tol = 64 * jnp.finfo(_tree.float_dtype([flat[p] for c in comps for p in c.paths()])).eps
        split = _reduced.split_cluster(comps, flat)
        if split is not None:
            return self._reduced_sweeps(cl, comps, flat, init, split, tol)

        def apply(xis):
            f = flat
            for c, x in zip(comps, xis):
                f = c._act(x, f)
            return f

        def body(carry):
            xis, it, _ = carry
            xis = list(xis)
            size = jnp.zeros((), tol.dtype)
            for j, c in enumerate(comps):
                d = c._canonical_element(apply(tuple(xis)))
                # (cast back: parameters of mixed widths, float32 kernels with float64 biases, promote the step)
                xis[j] = jax.tree.map(lambda x, y: (x + y).astype(x.dtype), xis[j], d)
                for x in jax.tree.leaves(d):
                    size = jnp.maximum(size, jnp.max(jnp.abs(x)).astype(size.dtype))
            return tuple(xis), it + 1, size

        def residual(xis):
            f = apply(xis)
            return tuple(c._canonical_element(f) for c in comps)

        xi0 = tuple(c._identity(flat) for c in comps) if init is None else tuple(init)
        return Word(cl, tuple(self._sweep_fixed_point(residual, body, xi0, tol)))

    def _sweep_fixed_point(self, residual, body, x0, tol):
        """``body`` (one sweep: ``(x, it, size) -> (x', it + 1, largest change)``) repeated from ``x0`` inside a
        ``lax.while_loop`` until the largest change is at most ``tol`` or after ``self.sweeps`` sweeps, wrapped in
        ``jax.lax.custom_root`` with the gauge conditions ``residual`` (zero at the fixed point): derivatives by
        the implicit function theorem, a dense least-squares solve with the linearised conditions."""
        def cond(carry):
            _, it, size = carry
            return (it < self.sweeps) & (size > tol)

        def solve(_, x):
            return jax.lax.while_loop(cond, body, (x, jnp.asarray(0), jnp.asarray(jnp.inf, tol.dtype)))[0]

        def tangent_solve(lin, y):
            yv, unravel = ravel_pytree(y)
            jac = jax.jacfwd(lambda v: ravel_pytree(lin(unravel(v)))[0])(jnp.zeros_like(yv))
            return unravel(jnp.linalg.lstsq(jac, yv)[0])

        return jax.lax.custom_root(residual, jax.lax.stop_gradient(x0), solve, tangent_solve)

    def _reduced_sweeps(self, cl, comps, flat, init, split, tol) -> Word:
        """:meth:`_sweeps` for a chain of plain rescales and logit translations (:func:`_reduced.split_cluster`):
        the translations' canonical point is the class-centred one whatever the rescales do, so the rescales are
        swept alone on the squared weights of the centred point (matrix-vector products with them instead of
        acting on every parameter each sweep), and the translations follow in closed form.  The same fixed point
        as the generic sweeps; derivatives by the implicit function theorem on the rescales' conditions."""
        resc, trans, plan = split
        stats = _reduced.squared_stats(plan, _reduced.centred(comps, trans, flat) if trans else flat)

        def delta(xr, j):  # rescale j's balancing log-factor given the others
            return _reduced.balance_delta(*_reduced.unit_norms_sq(plan, stats, xr, j))

        def deltas(xr):
            return tuple(delta(xr, j) for j in range(len(xr)))

        def body(carry):
            xr, it, _ = carry
            xr = list(xr)
            size = jnp.zeros((), tol.dtype)
            for j in range(len(xr)):
                d = delta(xr, j)
                xr[j] = (xr[j] + d).astype(xr[j].dtype)  # (mixed widths: as in _sweeps)
                size = jnp.maximum(size, jnp.max(jnp.abs(d), initial=0).astype(size.dtype))
            return tuple(xr), it + 1, size

        xr0 = tuple(comps[i]._identity(flat) if init is None else init[i] for i in resc)
        xr = self._sweep_fixed_point(deltas, body, xr0, tol)
        elems = dict(zip(resc, xr)) | _reduced.translation_elements(comps, resc, trans, plan, flat, xr)
        return Word(cl, tuple(elems[i] for i in range(len(comps))))

    def _cluster_canonical(self, cl, flat) -> Word:
        cont = tuple(i for i in cl if self.components[i].continuous)
        disc = tuple(i for i in cl if not self.components[i].continuous)
        k1 = self._continuous_canonical(cont, flat) if cont else Word((), ())
        if not disc:
            return k1
        at = self._act(k1, flat)
        perms = Word(disc, tuple(self.components[i]._canonical_element(at) for i in disc))
        if not cont:
            return perms
        sorted_flat = self._act(perms, flat)
        return self._compose(self._continuous_canonical(cont, sorted_flat), perms)

    def _canonical_element(self, flat):
        word = Word((), ())
        for cl in self.clusters():
            word = self._compose(self._cluster_canonical(cl, flat), word)
        return word

    def _canonicalize_flat(self, flat):
        """``canonical_element . flat``, with every cluster that is a minimal deep linear GL chain (and nothing
        else) written directly from the SVD of its end-to-end product ``M = U S V^T`` (:meth:`_gl_chain_canonical`):
        ``W_1 = U S^{1/L} Q``, ``W_l = Q^T S^{1/L} Q`` and ``W_L = Q^T S^{1/L} V^T`` (``Q`` the spectral gauge).
        The same point as acting with the chain's elements, but without their products: far from balance those
        elements are ill conditioned (``P_l^+`` of the partial products), and acting with them in float32 multiplied
        their rounding by about ``cond(A)^2``: a 6-6-6-6 or 8-4-4-4-8 chain moved by an element of scale 3
        (``cond(A) = 8e3``) came out 5% to 700% off the float64 canonical point of the same float32 parameters,
        where the float32 product ``M`` itself is 1-3% off (the rounding of the parameters already moves ``M`` that
        much).  A chain whose ``M`` has rank below its width keeps its parameters (see :meth:`_gl_chain_canonical`).

        Measured after this for GL chains (float32, element scale 3, 6-6-6-6, 8-4-4-4-8, 5-3-3-4 chains):
        balanced to ``1e-6`` of ``|M|`` (``W_l^T W_l = W_{l+1} W_{l+1}^T``; it was ``1e-2`` to ``2e2``), and within
        0.1-5% of the float64 canonical point of the same float32 parameters, as close as the chain's function
        survives the float32 element (the product ``M`` of the point against that of the parameters: the same
        0.1-5%).  The first of these limits is float32's, not the method's: float64 gives ``1e-10``.

        Shift actions (a logit :class:`Translation`): their kernel rows by :meth:`_centred_rows`."""
        word = self._canonical_element(flat)
        out = self._act(word, flat)
        for cl in self.clusters():
            found = _gl_chain_order(tuple(self.components[i] for i in cl)) if len(cl) > 1 else None
            if found is not None:
                out.update(self._gl_chain_point(cl, found[0], flat, out))
        for c in self.components:
            if c.shift_action:
                out = self._centred_rows(c, word, flat, out)
        return out

    def _centred_rows(self, t, word: Word, flat, out):
        """``out`` (the canonical point) with the rows of the shift action ``t``'s kernel computed as the other
        components' elements applied to the centred rows of the parameters, ``s (W - mean W)``, rather than as the
        word gives them, ``s W + a``; then centred once more.  Both are the canonical rows (the word's shifts act
        last and centre them), but far from balance ``s W`` and ``a`` are large against their sum (an MLP
        classifier at element scale 3: shifts up to 6e3 after the rescales, canonical rows of size 0.6), and their
        float32 rounding left the point 1e-4 to 3e-4 off the float64 canonical point of the same float32 parameters
        (fused multiply-adds, where the compiler forms them, hid part of it).  Centring first subtracts numbers of
        one size (exact but for the mean's own rounding, the same for the whole row, which the last centring
        removes).  Used when every other component acting on the kernel scales or permutes its rows (a
        :class:`Rescale` or :class:`Permutation` on axis 0, a :class:`Scale` of the whole array or of its rows),
        which commute with centring; otherwise only the last centring."""
        from ._rescale import Rescale
        from ._scale import Scale

        def rowwise(c):
            if isinstance(c, Rescale):
                members = c.incoming + c.outgoing
            elif isinstance(c, (Scale, Permutation)):
                members = c.members
            else:
                return t.kernel not in c.paths()
            nd = flat[t.kernel].ndim
            return all(ax is None and isinstance(c, Scale) or ax is not None and ax % nd == 0
                       for q, ax in members if q == t.kernel)

        others = [(i, e) for i, e in zip(word.indices, word.elements) if not self.components[i].shift_action]
        if all(rowwise(self.components[i]) for i, _ in others):
            start = dict(flat)
            start[t.kernel] = flat[t.kernel] - jnp.mean(flat[t.kernel], axis=1, keepdims=True)
            moved = self._act(Word(tuple(i for i, _ in others), tuple(e for _, e in others)), start)
            out = dict(out)
            out[t.kernel] = moved[t.kernel]
        return t._act(t._canonical_element(out), out)

    def _gl_chain_point(self, cl, order, flat, acted):
        """The canonical matrices of a minimal GL chain (paths ``order``) from the SVD of the end-to-end product of
        ``acted`` (the chain moved by its canonical element); ``acted``'s own where the chain is not usable
        (:meth:`_gl_chain_canonical`: its parameters unchanged).  ``M`` is formed from the matrices the element
        reached, not from the parameters: those are near balance, so their float32 product is accurate (the product
        of the unbalanced factors was 5-8% off the exact product of the same float32 matrices at element scale 3,
        and the point followed it)."""
        usable, safe = self._gl_chain_usable(cl, order, flat, self._gl_chain_canonical(cl, flat, word_only=True))
        mats = [jnp.where(usable, acted[p], m) for p, m in zip(order, safe)]
        n, L = mats[0].shape[1], len(mats)
        M = mats[0]
        for m in mats[1:]:
            M = M @ m
        first, gauge, last = gauged_powers(M, n, (1 / L, 0.0, -(L - 1) / L))
        point = [first] + [gauge.T @ first] * (L - 2) + [last.T @ M]
        return {p: jnp.where(usable, x, acted[p]) for p, x in zip(order, point)}

    def continuous_canonical_element(self, params, init: Word | None = None) -> Word:
        """The element ``k`` taking ``params`` to the canonical point of the continuous part of the group only
        (each cluster of overlapping continuous actions canonicalised jointly; no permutation sort).  It differs
        from :meth:`canonical_element` by a permutation of units, so norms, and per-component norms, at
        ``k . params`` equal those at the canonical representative: the cheaper choice for norm observables.

        ``init``: a previous result of this method (same group and shapes), e.g. from the last training step.
        Iterative cluster canonicalisations (block-coordinate sweeps) start from it; the fixed point is unique,
        so the result does not depend on ``init`` beyond the solver tolerance, only the number of sweeps does."""
        flat, _ = self._flat(params)
        self._check_given(init, flat, "continuous_canonical_element", "init")
        return _compiled(self, "_continuous_canonical_flat", flat, init)

    def _check_given(self, word, flat, method: str, arg: str) -> None:
        """The error of :meth:`act` for ``word`` (not a Word of this group at these shapes), naming ``method`` and
        its argument ``arg`` (it surfaced inside the compiled program as an AttributeError of a tracer, a bare
        ``KeyError: 0`` or a while_loop's carry mismatch); ``None`` passes."""
        if word is None:
            return
        try:
            self._check_element(word, flat)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{method}: {arg} must be an element of this group at these parameters' shapes (a "
                            f"previous result of continuous_canonical_element): {err}") from None

    def _continuous_canonical_flat(self, flat, init):
        if init is None:
            start = None
        else:  # components the word does not name (the identity Word((), ())) start at the identity
            start = {i: self.components[i]._identity(flat) for i in self._cont()}
            start.update(zip(init.indices, init.elements))
        return self._continuous_canonical(self._cont(), flat, start)

    def unordered_invariants(self, params, element: Word | None = None):
        """Per component, orbit invariants up to the order of permuted units: equal to :meth:`invariants` after
        a permutation of units within each array, so every norm or sum of them equals that of
        :meth:`invariants`.  Clusters that :meth:`invariants` canonicalises are evaluated at the continuous
        canonical point instead (``element``: :meth:`continuous_canonical_element` when already known), which
        skips the permutation sort and the second continuous canonicalisation."""
        flat, _ = self._flat(params)
        self._check_given(element, flat, "unordered_invariants", "element")
        with reading_invariants("unordered_invariants"):
            return _compiled(self, "_unordered_invariants_flat", flat, element)

    def _unordered_invariants_flat(self, flat, element):
        at: list = []

        def point(cl):
            if not at:
                k = self._continuous_canonical(self._cont(), flat) if element is None else element
                at.append(self._act(k, flat))
            return at[0]

        return self._cluster_invariants(flat, point, unordered=True)

    # --- invariants and charges -----------------------------------------------------------------------------
    def _invariants(self, flat):
        return self._cluster_invariants(flat, lambda cl: self._act(self._cluster_canonical(cl, flat), flat))

    def _cluster_invariants(self, flat, point, unordered: bool = False):
        """Per component invariants, cluster by cluster: a lone component's own; a GL chain's end-to-end product;
        a permutation-sorted cluster's (:meth:`_sorted_invariants`); any other cluster's components' own
        invariants at ``point(cluster)``, a point of its orbit fixed by its canonicalisation.  ``unordered``: a
        permutation's invariants at that point in the units' order, unsorted (:meth:`unordered_invariants`)."""
        out = {}
        for cl in self.clusters():
            chain = _gl_chain(tuple(self.components[i] for i in cl)) if len(cl) > 1 else None
            if chain is not None:
                prod = chain(flat)
                out.update({self.components[i].name: prod for i in cl})
                continue
            sorted_inv = self._sorted_invariants(cl, flat) if len(cl) > 1 else None
            if sorted_inv is not None:
                out.update(sorted_inv)
                continue
            src = flat if len(cl) == 1 else point(cl)
            for i in cl:
                c = self.components[i]
                out[c.name] = c._unordered_invariants(src) if unordered else c._invariants(src)
        return {c.name: out[c.name] for c in self.components}

    def _sorted_invariants(self, cl, flat):
        """Invariants of a cluster of non-overlapping continuous actions and the permutations that reorder their
        units, without canonicalising it: each continuous action's own invariants (orbit invariants of that
        action, equivariant under the permutations: ``_perm_axis``), with every permutation's units sorted by a
        key built from those invariants (and from the member slices no continuous action touches).  Invariant
        under the whole cluster, as complete as the canonical-point invariants, and a few array passes instead of
        two canonicalisations.  ``None`` when the cluster does not have that shape (the caller canonicalises)."""
        comps = [self.components[i] for i in cl]
        cont = [c for c in comps if c.continuous]
        perms = [c for c in comps if not c.continuous]
        if not cont or not perms or not all(isinstance(p, Permutation) for p in perms):
            return None

        def overlap(a, b):
            return bool(set(a.paths()) & set(b.paths()))

        pairs = [(a, b) for group in (cont, perms) for i, a in enumerate(group) for b in group[i + 1:]]
        if any(overlap(a, b) for a, b in pairs):
            return None
        axes: dict[tuple[str, str], int] = {}
        for c in cont:
            for p in perms:
                if overlap(c, p):
                    ax = c._perm_axis(p, flat)
                    if ax is None:
                        return None
                    axes[(c.name, p.name)] = ax
        inv = {c.name: c._invariants(flat) for c in cont}
        if not all(isinstance(v, jax.Array) for v in inv.values()):
            return None
        out = {}
        for p in perms:
            touching = [c for c in cont if overlap(c, p)]
            covered = {q for c in touching for q in c.paths()}
            feats = [(inv[c.name], axes[(c.name, p.name)]) for c in touching]
            paths = [q for q, _ in p.members]
            feats += [(flat[q], a, paths.count(q) > 1) for q, a in p.members if q not in covered]
            key = unit_key(feats)
            order = unit_order(feats, key)
            out[p.name] = key[order]
            for c in touching:
                inv[c.name] = jnp.take(inv[c.name], order, axis=axes[(c.name, p.name)])
        out.update(inv)
        return out

    def _charges(self, flat):
        return {c.name: c._charges(flat) for c in self.components if c.continuous}
