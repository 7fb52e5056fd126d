"""Alignment of two parameter vectors modulo the symmetry group, and the quotient distance."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .. import _tree
from ._base import Flat, Group, SymmetryError, _compiled, as_count, as_flag
from ._permutation import Permutation
from ._gl import GL
from ._product import Product, Word


def _sqdist(a: Flat, b: Flat):
    """``|a - b|^2`` over every leaf, integer leaves (a step counter beside the parameters) in the parameters' float
    dtype: squared in their own integer dtype, a difference of 100000 overflowed int32 (the distance came out
    37551)."""
    dt = _tree.float_dtype(list(a.values()))

    def diff(x, y):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            x, y = jnp.asarray(x).astype(dt), jnp.asarray(y).astype(dt)
        return x - y

    return sum(jnp.sum(jnp.square(diff(a[p], b[p]))) for p in a)


def _closest(target: Flat, cands: list[Flat]) -> Flat:
    """The candidate nearest ``target``.  A candidate that is not finite (an exponential or a solve that overflowed
    on a badly conditioned orbit) counts as infinitely far: ``argmin`` would otherwise pick its NaN distance."""
    d = jnp.stack([_sqdist(target, c) for c in cands])
    best = jnp.argmin(jnp.where(jnp.isnan(d), jnp.inf, d))
    return jax.tree.map(lambda *xs: jnp.stack(xs)[best], *cands)


def _lsa(cost):
    def host(c):
        from scipy.optimize import linear_sum_assignment  # imported on first use: scipy.optimize takes ~0.5 s

        c = np.asarray(c)
        if not np.all(np.isfinite(c)):
            # NaN / inf parameters (a diverged run, under jit where align cannot check them): scipy would raise
            # inside the callback (an opaque XLA runtime error); keep the units in place so the NaNs reach the output
            return np.arange(c.shape[0], dtype=np.int32)
        _, col = linear_sum_assignment(c, maximize=True)
        return col.astype(np.int32)

    # The assignment is piecewise constant in the cost: no gradient flows through it (so jax.grad of a distance
    # differentiates at the matched permutation), and a vmapped cost is solved matrix by matrix.
    return jax.pure_callback(host, jax.ShapeDtypeStruct(cost.shape[:1], jnp.int32), jax.lax.stop_gradient(cost),
                             vmap_method="sequential")


def _match(perm: Permutation, target: Flat, cur: Flat):
    """Weight matching (Ainsworth et al., 2023): the permutation of ``cur``'s units maximising the total inner
    product of corresponding unit slices with ``target``."""
    cost = 0.0
    for p, a in perm.members:
        t = jnp.moveaxis(target[p], a, 0).reshape(target[p].shape[a], -1)
        c = jnp.moveaxis(cur[p], a, 0).reshape(cur[p].shape[a], -1)
        cost = cost + t @ c.T
    return _lsa(cost)


#: A Gauss-Newton step of :func:`_gauss_newton` with a Lie-algebra coordinate larger than this (a log-factor: a
#: factor above ``e^8``) carries no derivative through its coefficients.
GN_SMOOTH_MAX = 8.0


def _gauss_newton(group: Group, target: Flat, cur: Flat, iters: int) -> Flat:
    """Fit the continuous gauge: ``cur <- exp(t xi) . cur`` with ``xi = (J^T J)^+ J^T (target - cur)``, the step
    ``t`` in (1, 1/2, 1/4, 0) that lands nearest ``target`` (``t = 0`` keeps ``cur``: never farther).

    Differentiated through the steps (the derivative of the computed point), with two exceptions that gave
    ``jax.grad`` of :func:`quotient_distance` NaN (0 times infinity).  Only the chosen step is applied after the
    choice, so a candidate that overflowed is never differentiated.  A step with a coordinate above
    :data:`GN_SMOOTH_MAX` (outside shifts) carries no derivative through its coefficients, only through the point
    it moves (the envelope theorem's derivative, exact at the fitted point): where the nearest point lies in the
    orbit's closure only (a per-channel scale whose weights point away from the target's is nearest it as its
    factor goes to 0) the log-factor grew to -2e21 in 8 steps, ``exp`` flushed the channel to exactly 0 while the
    derivative of the coefficient ``<w, t> / |w|^2`` overflowed."""
    if not group.continuous or iters == 0:
        return cur
    comps = [group.components[i] for i in group._cont()] if isinstance(group, Product) else [group]
    # (exp's step, GL's linear step): exp(t xi) only reaches GL elements of positive determinant, so a head whose
    # canonical point is not on its orbit (a zero W_O, a rank-deficient factor: canonicalisation leaves it as it
    # is) and that was moved by an element of negative determinant was never fitted (measured: align 0.3 |a| off
    # a for b = g . a); the linear step (I + t xi) . cur reaches it, in one step where the action is linear
    linear = any(isinstance(c, GL) for c in comps)
    # (exp's steps down to 1/64: a unit with one side zero that shrank its other side by e^-6 linearises to a
    # log-factor of e^6 = 400 for a true 6, and every step down to 1/4 overshot: the fit stayed 9% of |a| off)
    ts = jnp.asarray(((1.0, 0.0), (0.5, 0.0), (0.25, 0.0), (1 / 16, 0.0), (1 / 64, 0.0), (0.0, 0.0))
                     + (((0.0, 1.0), (0.0, 0.5), (0.0, 0.25)) if linear else ()))

    def one(c, x, te, tl):
        if isinstance(c, GL):  # (one of te, tl is 0: that factor is the identity, smooth whichever is chosen)
            eye = jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape)
            return c._exp((te * x).astype(x.dtype)) @ (eye + tl * x).astype(x.dtype)
        return c._exp(jax.tree.map(lambda y: ((te + tl) * y).astype(y.dtype), x))

    def step(xi, t):
        te, tl = t[0], t[1]
        if isinstance(group, Product):
            idx = group._cont()
            return Word(idx, tuple(one(group.components[i], x, te, tl) for i, x in zip(idx, xi)))
        return one(group, xi, te, tl)

    def largest(xi):
        xis = tuple(xi) if isinstance(group, Product) else (xi,)
        sizes = [jnp.max(jnp.abs(y), initial=0) for c, x in zip(comps, xis) if not c.shift_action
                 for y in jax.tree.leaves(x)]
        return jnp.max(jnp.stack(sizes)) if sizes else jnp.zeros(())

    def coeffs(cur):
        return group._vcoeffs(cur, {p: target[p] - cur[p] for p in cur})

    def body(_, cur):
        fixed = jax.lax.stop_gradient(cur)
        xi = jax.lax.stop_gradient(coeffs(fixed))
        smooth = largest(xi) <= GN_SMOOTH_MAX
        # (a select, not a product, on the way back: the unused derivative of a large step is dropped, NaN or not)
        xi = coeffs({p: jnp.where(smooth, cur[p], fixed[p]) for p in cur})
        ts_ = ts.astype(jnp.result_type(*jax.tree.leaves(xi)))
        d = jax.vmap(lambda t: _sqdist(target, group._act(step(xi, t), fixed)))(ts_)
        best = jax.lax.stop_gradient(jnp.argmin(jnp.where(jnp.isnan(d), jnp.inf, d)))
        return group._act(step(xi, ts_[best]), cur)

    return jax.lax.fori_loop(0, iters, body, cur)


def _separate_gl(group: Group) -> tuple[GL, ...]:
    """The :class:`GL` components whose parameters no other continuous component moves (a Transformer's per-head
    ``qk`` / ``vo`` factors; not a deep linear chain's, which share their matrices): the distance is then a sum of
    one term per head of each, fitted on its own."""
    if isinstance(group, GL):
        return (group,)
    if not isinstance(group, Product):
        return ()
    comps = [group.components[i] for i in group._cont()]
    out = []
    for c in comps:
        others = {p for o in comps if o is not c for p in o.paths()}
        if isinstance(c, GL) and not set(c.paths()) & others:
            out.append(c)
    return tuple(out)


def _fit(group: Group, target: Flat, cur: Flat, iters: int) -> Flat:
    """:func:`_gauss_newton`, and for each head of a :class:`GL` component that no other continuous component
    touches (:func:`_separate_gl`) the nearer of two fits: from ``cur`` and from ``cur`` reflected
    (``diag(-1, 1, ..., 1)``).  GL has two connected components (the sign of the determinant) and the fit stays,
    nearly always, in the one it starts in: on 1-layer Transformers of 2 heads (``d_head = 2``) the alignment of
    unrelated points stopped 1.5-4.4% above the brute-force minimum over every permutation and both signs (6 of 6
    pairs, ``restarts=8`` reaching none; with both: 4 of 6 within 0.04%, see :func:`align`).  One trace of the
    Gauss-Newton loop (a ``vmap`` over the two starts)."""
    gls = _separate_gl(group)
    if not gls or not group.continuous or iters == 0:
        return _gauss_newton(group, target, cur, iters)
    start = cur
    for c in gls:
        d, batch, dt = c._d(cur), c._batch(cur), cur[c.left[0]].dtype
        refl = jnp.broadcast_to(jnp.diag(jnp.ones((d,), dt).at[0].set(-1)), batch + (d, d))
        start = c._act(refl, start)
    fits = jax.vmap(lambda s: _gauss_newton(group, target, s, iters))(_stack([cur, start]))
    out, other = _row(fits, 0), _row(fits, 1)
    for c in gls:
        nb = len(c._batch(cur))

        def per_head(f, nb=nb, c=c):
            return sum(jnp.sum(jnp.square(f[p] - target[p]), axis=tuple(range(nb, f[p].ndim))) for p in c.paths())

        flip = per_head(other) < per_head(out)
        for p in c.paths():
            out[p] = jnp.where(flip.reshape(flip.shape + (1,) * (out[p].ndim - nb)), other[p], out[p])
    return out


def _perm_components(group: Group, flat: Flat):
    """The permutation components ``(index, component)`` in the order of their parameters in ``flat`` (the tree's
    order: an MLP's layer 0 before layer 1), whatever order the product lists them in.  Weight matching and the
    coordinate descent match them one after the other, so the order picks the local minimum: a 3-4-5-3 classifier's
    product listing ``permutation/layers.1`` first stopped 4-7.5% above the brute-force minimum over all 2880
    permutations, against 0-2.2% in the model's own order, for the same group."""
    comps = group.components if isinstance(group, Product) else (group,)
    at = {p: k for k, p in enumerate(flat)}
    perms = [(i, c) for i, c in enumerate(comps) if isinstance(c, Permutation)]
    return sorted(perms, key=lambda ic: min(at[p] for p, _ in ic[1].members))


def _unshifted(group: Group, flat: Flat) -> Flat:
    """``flat`` with every shift action (a logit :class:`~quotient_sgd.symmetry.Translation`) at its canonical
    element: kernel rows and bias centred over the classes.  The centring commutes with permutations of the rows,
    and the shift that best fits one row to another is their mean difference, so the inner products of centred
    rows are what a permutation changes in the distance once the shift is fitted: matched on the raw rows, their
    means (which the shift absorbs) weighed in and picked another permutation."""
    comps = group.components if isinstance(group, Product) else (group,)
    for c in comps:
        if c.shift_action:
            flat = c._act(c._canonical_element(flat), flat)
    return flat


def _stack(flats: list[Flat]) -> Flat:
    return {p: jnp.stack([f[p] for f in flats]) for p in flats[0]}


def _row(stacked, i: int):
    return jax.tree.map(lambda x: x[i], stacked)


def _fits(group: Group, fa: Flat, ca: Flat, fb: Flat, cb: Flat, kinv, iters: int) -> Flat:
    """The four Gauss-Newton fits of :func:`_align_flat`, stacked: ``fb`` fitted at ``fa``; ``kinv . cb`` fitted at
    ``fa``; ``cb`` fitted at ``ca``; that fit mapped through ``kinv`` and fitted at ``fa``.  One ``lax.scan`` over
    the (target, start) pairs, so the Gauss-Newton loop (the whole group's action and Jacobian) is compiled once,
    not once per fit (four copies made the first alignment of a small Transformer compile for ~50 s)."""
    targets = _stack([fa, fa, ca, fa])
    raws = _stack([fb, cb, cb, cb])  # (the last start is the previous fit, not read from here)
    back = jnp.asarray([False, True, False, True])
    chain = jnp.asarray([False, False, False, True])

    def body(prev, x):
        target, raw, b, c = x
        src = {p: jnp.where(c, prev[p], raw[p]) for p in raw}
        # (a cond, not a select: the map-back of a start not taken carries no derivative, NaN or not)
        start = jax.lax.cond(b, lambda s: group._act(kinv, s), lambda s: s, src)
        out = _fit(group, target, start, iters)
        return out, out

    _, outs = jax.lax.scan(body, {p: jnp.zeros_like(x) for p, x in fb.items()}, (targets, raws, back, chain))
    return outs


#: The seed of the random permutations that :func:`align`'s ``restarts`` start from (fixed: the alignment and the
#: quotient distance are deterministic functions of their arguments).
RESTART_SEED = 0


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _align_flat(group: Group, fa: Flat, fb: Flat, rounds: int, iters: int, restarts: int = 0) -> Flat:
    """One compiled program per group, parameter layout and ``(rounds, iters)``: the Gauss-Newton iterations are a
    ``fori_loop`` and the Hungarian matching a host callback, so repeated alignments (along a trajectory) reuse
    it.  Each piece is compiled once: the two canonical elements are one ``lax.map``, the matching rounds and the
    descent rounds loops, the first four Gauss-Newton fits one ``lax.scan`` (:func:`_fits`).

    Candidates, the nearest to ``fa`` returned: ``fb``; ``fb`` fitted by Gauss-Newton; the canonical points
    matched, mapped back through ``fa``'s canonical element and fitted; the same with the continuous gauge first
    fitted between the canonical points (a unit with one side zero has no balanced point, so its canonical factor
    is arbitrary and the two canonical points differ by it; fitted at ``fa``, next to a logit translation, the
    linearised log-factor overshot, every step of the line search moved away and the fit stayed 4% of ``|a|``
    off ``a`` for ``b = g . a``); and, from the nearest of these, ``rounds`` rounds of coordinate descent at
    ``fa`` (each permutation matched at the fitted point, then the continuous gauge refitted): the permutation
    matched between canonical points is not the one nearest ``fa``'s gauge, and the distance was up to 42% above
    the exact minimum over the group (a 3-3-2 classifier, brute force over the 6 permutations).  With
    ``restarts``, the descent runs from the nearest candidate and from ``restarts`` random permutations of it (one
    ``lax.map``; round 0 refits the gauge, the later rounds match and refit), the nearest of all returned."""
    ks = jax.lax.map(group._canonical_element, _stack([fa, fb]))
    ka = _row(ks, 0)
    ca = group._act(ka, fa)
    cb = group._act(_row(ks, 1), fb)
    perms = _perm_components(group, fa)
    if perms and rounds:
        def matching(_, cb):
            for i, c in perms:
                cb = c._act(_match(c, ca, cb), cb)
            return cb

        cb = jax.lax.fori_loop(0, rounds, matching, cb)
    kinv = group._inverse(ka)
    if not group.continuous or iters == 0:
        return _closest(fa, [fb, _gauss_newton(group, fa, fb, iters),
                             _gauss_newton(group, fa, group._act(kinv, cb), iters)])
    fits = _fits(group, fa, ca, fb, cb, kinv, iters)
    cands = [fb, _row(fits, 0), _row(fits, 1), _row(fits, 3)]
    if perms and rounds:
        ta = _unshifted(group, fa)

        def descend(_, cur):
            return _fit(group, fa, _match_all(perms, group, ta, cur), iters)

        start = _closest(fa, cands)
        if not restarts:
            cands.append(jax.lax.fori_loop(0, rounds, descend, start))
        else:
            # (one lax.map over the starts: the descent, its matching and Gauss-Newton fit, is compiled once)
            def run(k):
                cur = start
                for j, (i, c) in enumerate(perms):
                    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(RESTART_SEED), k), j)
                    perm = jnp.where(k == 0, c._identity(cur), c._sample(key, cur, 1.0))
                    cur = c._act(perm, cur)

                # round 0 refits the continuous gauge at the random start (the units keep the factors fitted for
                # their old places), the later rounds match and refit
                def body(r, cur):
                    cur = jax.lax.cond(r > 0, lambda x: _match_all(perms, group, ta, x), lambda x: x, cur)
                    return _fit(group, fa, cur, iters)

                return jax.lax.fori_loop(0, rounds + 1, body, cur)

            outs = jax.lax.map(run, jnp.arange(restarts + 1))
            cands.extend(_row(outs, k) for k in range(restarts + 1))
    return _closest(fa, cands)


def _match_all(perms, group: Group, ta: Flat, cur: Flat) -> Flat:
    """One round of matching: each permutation matched at ``cur`` to ``ta`` (centred), one after the other."""
    for i, c in perms:
        cur = c._act(_match(c, ta, _unshifted(group, cur)), cur)
    return cur


def _common_dtype(fa: Flat, fb: Flat) -> tuple[Flat, Flat]:
    """Both flat views with their floating leaves in the common dtype of all of them (standard promotion) when they
    hold several float widths (a float64 bias beside float32 kernels, or one network in float32 and the other in
    float64): under strict dtype promotion they failed with JAX's bare ``TypePromotionError``."""
    floats = [x for f in (fa, fb) for x in f.values() if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if len({jnp.result_type(x) for x in floats}) <= 1:
        return fa, fb
    dt = _tree.float_dtype(floats)

    def cast(f):
        return {p: x.astype(dt) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x for p, x in f.items()}

    return cast(fa), cast(fb)


def _leaf_dtype(x):
    """The dtype of a leaf (a NumPy dtype for a Python scalar or sequence; ``None`` for what NumPy cannot read)."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(x).dtype
        except (TypeError, ValueError):
            return None
    return dtype


def _check_real(name: str, fa: Flat, fb: Flat) -> None:
    """``TypeError`` naming the argument and the path of the first leaf that does not hold real numbers (float or
    integer): a Euclidean distance is taken over every leaf, and a PRNG key (an ``nnx.Rngs`` or ``Dropout`` state
    in ``nnx.split(model)``), a boolean mask or a complex array failed inside the alignment with JAX's bare
    ``sub does not accept dtype key<fry>`` / ``lt does not accept dtype complex64``."""
    for arg, flat in (("params_a", fa), ("params_b", fb)):
        for path, x in flat.items():
            dtype = _leaf_dtype(x)
            ok = dtype is not None and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
            if not ok:
                raise TypeError(f"{name}: {arg} has a leaf of dtype {dtype} at {path!r}; the distance is taken over "
                                f"every leaf, which must hold real numbers (float or integer arrays): pass the "
                                f"parameters alone, e.g. nnx.split(model, nnx.Param, ...)[1], not the model's whole "
                                f"state with its PRNG keys")


def _check_same_layout(name: str, fa, fb) -> None:
    """``ValueError`` naming the first parameter whose path or shape differs between the two networks: orbits of
    one group are compared only between parameter trees of one architecture; ``TypeError`` for a leaf that does not
    hold real numbers (:func:`_check_real`)."""
    _check_real(name, fa, fb)
    if set(fa) != set(fb):
        diff = sorted(set(fa) ^ set(fb), key=str)[0]
        raise ValueError(f"{name}: params_a and params_b have different parameters (e.g. {diff!r} is in only one); "
                         f"they must come from the same architecture")
    for path in fa:
        if fa[path].shape != fb[path].shape:
            raise ValueError(f"{name}: parameter {path!r} has shape {fa[path].shape} in params_a and "
                             f"{fb[path].shape} in params_b; they must come from the same architecture")


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    """Whether every leaf is finite, as one compiled program (op by op, each leaf's test and reduction compiled a
    program of its own for every new shape)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


@jax.jit
def _symmetrised_distance(a: dict, ab: dict, b: dict, ba: dict) -> jax.Array:
    """``sqrt(min(|a - ab|^2, |b - ba|^2))`` as one compiled program (the leaves keyed alike in all four)."""
    return jnp.sqrt(jnp.minimum(_sqdist(a, ab), _sqdist(b, ba)))


def _check_finite(name: str, fa: Flat, fb: Flat) -> None:
    """``ValueError`` naming the first parameter of ``params_a`` / ``params_b`` that holds a NaN or an infinity
    (checked only for concrete arrays: under ``jax.jit`` such parameters give NaN results instead)."""
    leaves = [*fa.values(), *fb.values()]
    if any(isinstance(x, jax.core.Tracer) for x in leaves) or bool(_all_finite(leaves)):  # one program, one transfer
        return
    for arg, flat in (("params_a", fa), ("params_b", fb)):
        for path, x in flat.items():
            if not bool(jnp.all(jnp.isfinite(x))):
                raise ValueError(f"{name}: {arg} has non-finite values (NaN or inf) in parameter {path!r}; "
                                 f"the orbits of finite parameters only can be aligned")


def align(group: Group, params_a, params_b, *, rounds: int = 3, iters: int = 8, restarts: int = 0):
    """Bring ``params_b`` to a point of its orbit close to ``params_a``.

    Both are first canonicalised; permutations are matched by weight matching on the canonical points (Hungarian
    algorithm, ``scipy.optimize.linear_sum_assignment``; several rounds of coordinate descent for chained
    layers); the continuous gauge is then recovered by mapping back through ``params_a``'s canonical element and
    refined by Gauss-Newton steps in the Lie algebra (fitted between the canonical points first too, for units
    whose canonical factor is arbitrary: one side zero).  Then ``rounds`` rounds of coordinate descent at
    ``params_a``'s gauge: each permutation matched at the fitted point (kernel rows centred first where a logit
    translation acts), the continuous gauge refitted.  The result is on the orbit of ``params_b`` and never
    farther from ``params_a`` than ``params_b`` itself.  For ``params_b = g . params_a`` it returns ``params_a``
    up to float rounding.  For two unrelated points it is a local minimum of the distance over the orbit, not
    always the global one.  Measured against a brute force over all permutations of a 3-3-2 / 2-4-3 MLP's hidden
    units with the continuous optimum found numerically (float64, 8 pairs of unrelated points, both directions):
    without a logit translation 15 of 16 alignments reached the minimum (one 0.2% above), with one 13 of 16
    (three 0.9-2.2% above); before the coordinate descent, 9 and 9 of 16, up to 42% above.  With two hidden
    layers (two permutations matched one after the other) the minima are farther: on a 2-3-3-2 MLP, the symmetrised
    :func:`quotient_distance` of 8 pairs with and 8 without a logit translation against the brute force over all
    36 permutation pairs reached the minimum in 9 of 16, the rest 0.2-24% above (more rounds or Gauss-Newton
    iterations changed none of them): the descent changes one layer's permutation at a time, and there both had to
    change at once.  ``restarts`` (default 0) runs the descent again from that many random permutations of every
    permutation component (fixed seeds: the result is a deterministic function of the arguments; each start's
    continuous gauge refitted first) and keeps the nearest point; the starts run in one ``lax.map``, so the
    descent is compiled once whatever their number.  Measured on 16 other pairs of 2-3-3-2 MLPs (the same
    brute force, float64): the symmetrised distance reached the minimum in 11 of 16 with ``restarts=0`` (the rest
    0.7-27% above), 14 with 4, all 16 with 8; the one-sided alignments in 19, 25, 29 of 32 (with 8, the rest
    1-13% above).  On 16 pairs of 3-4-4-3 MLPs (576 permutation pairs): 9, 14, 15, 16 of 16 with 0, 4, 8, 16
    restarts (0: the rest 0.1-7.5% above; 8: one 1.1% above); one-sided 11, 22, 26, 28 of 32 (0: up to 58%
    above; 8: up to 9.4%).  Cost (2-core CPU, a 16-64-64-10 MLP's first ``quotient_distance``): 11.8 CPU s to compile
    with 0 restarts, 14.9 with 8; later calls 0.04 and 0.19 CPU s.  Permutations are matched in the order of their
    parameters in the tree, whatever order the product lists them in (listed in reverse, the result changed by up to
    7%).  A GL head whose canonical point is not on its orbit (canonicalisation leaves it as it is) is fitted by
    the Gauss-Newton steps alone (exp and, reaching elements of negative determinant, linear steps): exact for a
    zero factor (a zero-initialised ``W_O``), but for a rank-deficient nonzero factor it can stop at a local minimum
    (measured: a ``W_Q`` head of rank 2 of 3 moved by random elements, 3 of 4 left 0.19 ``|a|`` off ``a``).
    Each head of a GL component that no other continuous component moves (a Transformer's ``qk`` / ``vo``) is
    fitted from its start and from its start reflected, the nearer kept: the fit stays in the sign of the
    determinant it starts in.  On CNNs and Transformers (float64 unless said): ``b = g . a`` recovered to 2e-15
    (``|a|`` 3-9, element scales 0.3 and 1; a (3, 3)-channel CNN classifier with ``norm`` None, ``"layer"``,
    ``"batch"``, a 1-layer 2-head Transformer), in float32 to 2e-7-4e-6 at scales 0.3-2 (the Transformer at scale
    2: 2-3e-5, 3e-6 of ``|a|``).  Unrelated points against a brute force over every permutation with the
    continuous part fitted by BFGS: a one-layer CNN classifier (3 channels, kernel 2) reached the minimum in 11 of
    12 pairs (one 16% above) with ``restarts=0`` and 12 of 12 with 4; 1-layer Transformers (2 heads of size 2, 4
    MLP units, 48 permutation pairs, each GL head's fit started in both signs of the determinant), 6 pairs: before
    the two-sign fit none reached the minimum, 1.5-4.4% above (``restarts=8``: 1.5-4.3%); with it 4 of 6 within
    0.04%, the others 2.0% and 3.5% above (``restarts=8``: 5 of 6 within 0.03%, one 2.4% above).

    Raises:
        SymmetryError: the group has no canonical section at these parameters (e.g. a deep linear chain that is
            not minimal: see its ``canonicalize``).
        ValueError: ``params_a`` or ``params_b`` holds a NaN or an infinity (under ``jax.jit``, where this cannot
            be checked, the result has NaNs instead).
    """
    rounds, iters, restarts = _check_counts("align", rounds=rounds, iters=iters, restarts=restarts)
    fa, treedef = group._flat(params_a)
    fb, _ = group._flat(params_b)
    _check_same_layout("align", fa, fb)
    _check_finite("align", fa, fb)
    with _canonicalising("align"):
        # bfloat16 / float16: in float32; several float widths: in their common dtype
        out = _align_flat(group, *_common_dtype(_tree.widen(fa), _tree.widen(fb)), rounds, iters, restarts)
    return _tree.unflatten({p: x.astype(fb[p].dtype) for p, x in out.items()}, treedef)


@contextlib.contextmanager
def _canonicalising(fn: str):
    """Re-raise a ``SymmetryError`` from canonicalising (a group with no canonical section at these parameters,
    e.g. a deep linear chain that is not minimal) naming the function ``fn`` that canonicalised."""
    try:
        yield
    except SymmetryError as err:
        if not str(err).startswith("canonicalize:"):
            raise
        raise SymmetryError(f"{fn}: both points are canonicalised first (weight matching runs on the canonical "
                            f"points), which this group cannot do here.  The group says: {err}") from err


def _check_counts(fn: str, **counts) -> tuple[int, ...]:
    """The counts as Python ints (they are static arguments of the compiled alignment), in the order given:
    integers >= 0, NumPy and concrete 0-d JAX integers included (:func:`as_count`)."""
    out = []
    for name, n in counts.items():
        value = as_count(n)
        if value is None or value < 0:
            raise ValueError(f"{fn}: {name} must be an integer >= 0, got {n!r}")
        out.append(value)
    return tuple(out)


def quotient_distance(group: Group, params_a, params_b, *, rounds: int = 3, iters: int = 8, restarts: int = 0,
                      canonical: bool = False):
    """Distance between the orbits of ``params_a`` and ``params_b``:
    ``min(|a - align(a, b)|, |b - align(b, a)|)`` (Euclidean).

    Zero (to tolerance) when ``b = g . a``; symmetric by construction; never larger than ``|a - b|``.
    The symmetrisation is needed because rescale and GL actions are not isometries, so the one-sided distance
    ``min_g |a - g . b|`` is not symmetric in general.  For the same reason it depends on where ``a`` and ``b``
    sit on their orbits (moving ``a`` to ``g . a`` changes it, by a few percent for random ``g``): it measures
    how far these two networks are from each other's orbits.  ``canonical=True`` compares the canonical
    representatives ``c(a)``, ``c(b)`` instead (the same formula, never larger than ``|c(a) - c(b)|``): a
    function of the two orbits alone, unchanged when either argument is moved along its orbit.  ``rounds`` /
    ``iters`` / ``restarts``: as for :func:`align`, whose canonicalisation limits (``SymmetryError``) apply, and its
    accuracy (a local minimum over each orbit: measured up to 2.2% above the exact minimum with one hidden layer,
    up to 27% with two, where ``restarts=8`` reached it in 16 of 16 pairs of 2-3-3-2 and 15 of 16 of 3-4-4-3
    MLPs), and its ``ValueError`` for parameters holding a NaN or an infinity (NaN under ``jax.jit``).
    """
    rounds, iters, restarts = _check_counts("quotient_distance", rounds=rounds, iters=iters, restarts=restarts)
    flag = as_flag(canonical)  # (a 0-d boolean array, jnp.bool_(True), as the models' flags take it)
    if flag is None:
        raise ValueError(f"quotient_distance: canonical={canonical!r} is not allowed; need True or False")
    canonical = flag
    fa, _ = group._flat(params_a)
    fb, _ = group._flat(params_b)
    _check_same_layout("quotient_distance", fa, fb)
    _check_finite("quotient_distance", fa, fb)
    fa, fb = _common_dtype(_tree.widen(fa), _tree.widen(fb))  # bfloat16 / float16: in float32; mixed: common
    with _canonicalising("quotient_distance"):
        if canonical:  # (compiled, as group.canonicalize: op by op it dispatched for ~40 s on a small Transformer)
            fa, fb = _compiled(group, "_canonicalize_flat", fa), _compiled(group, "_canonicalize_flat", fb)
        ab = _align_flat(group, fa, fb, rounds, iters, restarts)
        ba = _align_flat(group, fb, fa, rounds, iters, restarts)
    keys = list(fa)  # (numbered: jit sorts a dict's keys, and a path's parts need not compare with each other)
    a, b, ab, ba = ({i: f[p] for i, p in enumerate(keys)} for f in (fa, fb, ab, ba))
    return _symmetrised_distance(a, ab, b, ba)
