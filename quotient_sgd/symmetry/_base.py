"""The abstract group action and the flat-dictionary machinery shared by every action.

Every action works on a *flat view* of the parameters, ``{path: array}`` (see :mod:`quotient_sgd._tree`), and
touches only the leaves named by its paths.  The public methods (``act``, ``vertical``, ``canonicalize``, ...)
take and return the user's parameter pytree (an ``nnx.State`` or a nested dict).

Notation follows THEORY section 1: for a continuous action with Lie-algebra coordinates ``xi`` the tangent
map at ``theta`` is ``J xi = d/ds exp(s xi) . theta |_{s=0}``; the vertical space is ``V(theta) = range(J)``
and the Euclidean vertical projection is ``P_V u = J (J^T J)^+ J^T u``.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .. import _tree
from .._reduce import sum_except
from .._tree import Path

Flat = dict[Path, jax.Array]
Member = tuple[Path, Any]


#: Flat methods returning a pytree like the parameters: the position of the argument whose dtypes it keeps.
_LIKE_ARG = {"_act": 1, "_canonicalize_flat": 0, "_vertical_flat": 1, "_horizontal_flat": 1, "_tangents_flat": 0}


#: Flat methods whose parameters are not their first argument: the position of the parameters.
_PARAMS_ARG = {"_act": 1, "_sample": 1}


def unify_floats(args: tuple, at: int = 0) -> tuple:
    """``args`` with the floating leaves of the parameters ``args[at]`` (a flat view), and of every other flat view
    of the same paths (a vector to project), cast to the parameters' common dtype (standard promotion: float64 for
    float32 kernels beside float64 biases) when they have several; the same ``args`` otherwise.  Under strict dtype
    promotion such parameters failed in every method that combines leaves (a GL's stacked ``[W; b]``, a rescale's
    unit norms, a scale's block norm) with JAX's bare ``TypePromotionError``."""
    flat = args[at]
    floats = [x for x in flat.values() if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    if len({jnp.result_type(x) for x in floats}) <= 1:
        return args
    dt = _tree.float_dtype(floats)

    def cast(d):
        return {p: x.astype(dt) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x for p, x in d.items()}

    return tuple(cast(a) if i == at or (isinstance(a, dict) and a.keys() == flat.keys()) else a
                 for i, a in enumerate(args))


@functools.partial(jax.jit, static_argnums=(1,))
def _compiled(group: "Group", method: str, *args):
    """``group.<method>(*args)`` as one compiled program, cached per group, method and argument shapes.

    The public methods check their arguments eagerly and then run the flat-view computation through this, so that
    an eager call costs one cached program rather than hundreds of dispatched operations (a canonicalisation is
    block-coordinate sweeps or Newton steps over every component).  Under an outer ``jit`` / ``vmap`` / ``grad``
    it is inlined like any jitted function.  Groups hold only static fields, so ``group`` is part of the cache
    key, not an input.

    Low-precision floats (bfloat16, float16) are computed in float32 (:func:`quotient_sgd._tree.widen`: XLA:CPU
    has no such QR / SVD / eigh kernels); what is like the parameters (``act``, ``canonicalize``, ``vertical``,
    ``horizontal``, ``tangents``) is returned in their dtypes, group elements, invariants and charges in
    float32.  Parameters of several float widths (float32 kernels with float64 biases) are computed in their common
    dtype (:func:`unify_floats`), and what is like them returned in their own.

    Every matrix product of the computation is at full precision (``jax.default_matmul_precision("highest")``),
    whatever the caller's setting: at JAX's default, float32 operands are rounded to TF32 on recent NVIDIA GPUs and
    to bfloat16 on TPUs (10 / 7 bits), far below the accuracy the projections and canonical points are built for
    (README, Accuracy notes).  XLA:CPU computes the same either way."""
    with jax.default_matmul_precision("highest"):
        out = getattr(group, method)(*unify_floats(_tree.widen(args), _PARAMS_ARG.get(method, 0)))
    if method in _LIKE_ARG:
        like = args[_LIKE_ARG[method]]
        out = {p: x.astype(like[p].dtype) if p in like else x for p, x in out.items()}
    return out


def common_float(*elements):
    """``elements`` (pytrees of arrays) with their floating leaves cast to their common dtype (standard promotion:
    float64 for a float32 element beside a float64 one), for the arithmetic of a group law: elements sampled at
    parameters of two float widths failed to compose under strict promotion with JAX's bare
    ``TypePromotionError``.  The same elements when there is nothing to cast."""
    leaves = [x for x in jax.tree.leaves(elements) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    dtypes = {jnp.result_type(x) for x in leaves}
    if len(dtypes) <= 1:
        return elements
    dt = _tree.float_dtype(leaves)
    return jax.tree.map(lambda x: jnp.asarray(x).astype(dt) if jnp.issubdtype(jnp.result_type(x), jnp.floating)
                        else x, elements)


class SymmetryError(ValueError):
    """A declared group action is not a symmetry of the model (or is malformed)."""


@contextlib.contextmanager
def reading_invariants(method: str):
    """Re-raise a ``SymmetryError`` from canonicalising a cluster whose invariants are read at its canonical point
    (one with no canonical section) naming ``method``, which the caller called: it was reported as coming from
    ``canonicalize`` (and advised using the invariants)."""
    try:
        yield
    except SymmetryError as err:
        msg = str(err)
        if not msg.startswith("canonicalize: "):
            raise
        raise SymmetryError(f"{method}: {msg[len('canonicalize: '):]}") from None


def as_path(path) -> Path:
    """A parameter path as a declaration gives it: a sequence of keys (``("layers", 0, "kernel")``), or one key
    naming a top-level parameter (``"w_in"`` is ``("w_in",)``; ``tuple("w_in")`` would be its characters).
    ``TypeError`` for anything else."""
    if isinstance(path, (str, int)):
        return (path,)
    return tuple(path)


def as_axis(axis) -> int:
    """A unit axis as a declaration gives it: an integer (``TypeError`` for a float, a string or a bool, which
    ``int`` would have truncated or read: ``int(1.5) == 1``)."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    return int(axis)


def as_count(value) -> int | None:
    """``value`` as a Python ``int`` when it is an integer known now: a Python or NumPy integer, or a concrete 0-d
    integer array (NumPy or JAX, e.g. ``jnp.int32(3)``, as the models' sizes take it); ``None`` for anything else (a
    bool, a float, a traced value, an array with axes), for the caller's error.  (A JAX integer was refused as
    ``num_samples must be an integer >= 1, got Array(2, dtype=int32)``.)"""
    if isinstance(value, (bool, np.bool_, jax.core.Tracer)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    dtype = getattr(value, "dtype", None)
    if dtype is not None and getattr(value, "ndim", None) == 0 and jnp.issubdtype(dtype, jnp.integer):
        return int(value)
    return None


def as_flag(value) -> bool | None:
    """``value`` as a Python ``bool`` when it is a bool known now: ``True`` / ``False``, a NumPy bool, or a concrete
    0-d boolean array (``jnp.bool_(True)``); ``None`` for anything else (a number, a string, a traced value)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if (not isinstance(value, jax.core.Tracer) and getattr(value, "ndim", None) == 0
            and getattr(value, "dtype", None) == np.bool_):
        return bool(value)
    return None


def _tiny(x: jax.Array) -> jax.Array:
    return jnp.asarray(jnp.finfo(x.dtype).tiny, x.dtype)


def unit_sqnorm(x: jax.Array, axis: int) -> jax.Array:
    """Sum of squares over every axis but ``axis`` (the unit axis); shape ``(n,)``."""
    return sum_except(jnp.square(x), axis)


def unit_dot(x: jax.Array, y: jax.Array, axis: int) -> jax.Array:
    return sum_except(x * y, axis)


def along(v: jax.Array, x: jax.Array, axis: int) -> jax.Array:
    """Broadcast the per-unit vector ``v`` (shape ``(n,)``) against ``x`` along ``axis``."""
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return jnp.reshape(v.astype(x.dtype), shape)


def _check_scale(scale, method: str = "sample") -> None:
    """``ValueError`` for a known ``scale`` that is negative or not finite (traced values pass); the message names
    ``method``."""
    try:
        value = float(scale)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    except (TypeError, ValueError):
        value = float("nan")  # not a number (a sequence): reported below; a string that reads as one ("1") too
    if isinstance(scale, (bool, str, bytes)) or not (value >= 0 and value != float("inf")):
        raise ValueError(f"{method}: scale={scale!r} is not allowed; need a finite number >= 0 (the spread of the "
                         f"log-factors, 2 x scale).")


def sample_scale(scale, flat: Flat, paths) -> float | jax.Array:
    """``scale`` as the samplers read it: a Python float when it is known (weakly typed, so the elements come out in
    the parameters' dtype whatever ``scale``'s own: a NumPy / JAX float64 or integer scale beside float32 parameters
    failed under strict dtype promotion with JAX's bare ``TypePromotionError``), a traced one cast to the common
    float dtype of the parameters at ``paths`` (low-precision ones read as float32, as the samplers compute)."""
    try:
        return float(scale)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return jnp.asarray(scale).astype(_tree.float_dtype(_tree.widen([flat[p] for p in paths])))


def _check_key(key, method: str = "sample") -> None:
    """``TypeError`` naming ``key`` when it is not one PRNG key: a typed key of shape ``()`` (``jax.random.key``)
    or a legacy ``uint32`` key of shape ``(2,)`` (``jax.random.PRNGKey``); batches of keys are for ``jax.vmap``."""
    dtype, shape = getattr(key, "dtype", None), jnp.shape(key) if hasattr(key, "shape") else None
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return
    elif dtype == jnp.uint32 and shape == (2,):
        return
    what = f"an array of shape {shape} and dtype {dtype}" if shape is not None else repr(key)
    raise TypeError(f"{method}: key={what} is not a PRNG key; need one key, jax.random.key(seed) (or a legacy "
                    f"jax.random.PRNGKey(seed)); for several elements split the key and jax.vmap over the keys")


class Group(eqx.Module):
    """A group acting on (a subset of) a model's parameters, leaving the network function unchanged.

    Subclasses implement the private flat-view methods; the public methods below wrap them.  A *component*
    (``Rescale``, ``Scale``, ``Translation``, ``GL``, ``Permutation``) acts on the leaves named in its paths;
    :class:`~quotient_sgd.symmetry.Product` combines components.
    """

    name: str = eqx.field(static=True)

    continuous: ClassVar[bool] = True
    #: "min_norm" when the canonical representative is the minimum-norm point of the orbit (Kempf-Ness),
    #: which lets overlapping components be canonicalised jointly by Newton's method.
    canonical_kind: ClassVar[str] = "other"
    #: whether elements commute (so that Lie-algebra coordinates add under composition).
    abelian: ClassVar[bool] = True
    #: whether the Noether charges are linear (translation) rather than quadratic forms of the parameters.
    charge_linear: ClassVar[bool] = False
    #: whether the action is a shift ``theta -> theta + t(g)`` (translation) rather than linear in the parameters;
    #: block-coordinate canonicalisations apply shifts after the linear actions they share arrays with.
    shift_action: ClassVar[bool] = False

    # ----- to implement -------------------------------------------------------------------------------------
    def paths(self) -> tuple[Path, ...]:
        raise NotImplementedError

    def _check(self, flat: Flat) -> None:
        for p in self.paths():
            if p not in flat:
                raise SymmetryError(
                    f"action {self.name!r} names parameter path {p!r}, which the parameters do not have; "
                    f"available paths: {list(flat)}"
                )

    def _check_axes(self, flat: Flat, members) -> None:
        """``SymmetryError`` naming the member whose unit ``axis`` the array does not have (``None``: no axis)."""
        for p, a in members:
            if a is not None and not -flat[p].ndim <= a < flat[p].ndim:
                raise SymmetryError(
                    f"action {self.name!r}: member {p!r} acts along axis {a}, but that parameter has shape "
                    f"{flat[p].shape} ({flat[p].ndim} axes)"
                )

    def _sample(self, key, flat: Flat, scale: float):
        raise NotImplementedError

    def _identity(self, flat: Flat):
        raise NotImplementedError

    def _act(self, g, flat: Flat) -> Flat:
        raise NotImplementedError

    def _inverse(self, g):
        raise NotImplementedError

    def _compose(self, g, h):
        raise NotImplementedError

    def _canonical_element(self, flat: Flat):
        raise NotImplementedError

    def _cotransport(self, g, cot: Flat) -> Flat:
        """A gradient at ``theta`` carried to ``g . theta``: ``J^T cot`` for the Jacobian ``J`` of
        ``phi -> g^{-1} . phi`` (for a linear action ``rho(g)^{-T} cot``; an affine action's shift drops out).
        Generic: one vector-Jacobian product of the inverse's action; components override it in closed form."""
        _, vjp = jax.vjp(lambda phi: self._act(self._inverse(g), phi), cot)
        return vjp(cot)[0]

    def _cotransport_tree(self, g, grads):
        """:meth:`_cotransport` on a pytree like the parameters (``grads``); not compiled on its own, for use
        inside a traced function.  Returned in ``grads``' dtypes; low-precision floats (bfloat16, float16), in the
        gradient or the element, are computed in float32 as :func:`_compiled` computes them (a GL head's inverse
        in bfloat16 failed with XLA:CPU's bare ``NotImplementedError: Unsupported dtype bfloat16``, so
        ``canonical_gradient`` of every bfloat16 / float16 Transformer or deep linear network raised)."""
        flat, treedef = self._flat(grads)
        self._check_element(g, flat)
        with jax.default_matmul_precision("highest"):  # as in _compiled
            # (several float widths: in their common dtype)
            out = self._cotransport(_tree.widen(g), unify_floats((_tree.widen(flat),))[0])
        return _tree.unflatten({p: x.astype(flat[p].dtype) for p, x in out.items()}, treedef)

    def _invariants(self, flat: Flat):
        raise NotImplementedError

    def _unordered_invariants(self, flat: Flat):
        """:meth:`_invariants` up to the order of permuted units (the same here; a permutation skips its sort)."""
        return self._invariants(flat)

    def _charges(self, flat: Flat):
        return {}

    def _perm_axis(self, perm, flat: Flat) -> int | None:
        """For a continuous action whose ``_invariants`` is one array: the axis of that array indexed by the units
        of the permutation ``perm`` (permuting the units permutes the invariants along it, and nothing else), or
        ``None`` when no such axis exists.  Lets :class:`Product` compute the invariants of a cluster of a
        permutation and the continuous actions it reorders without canonicalising it."""
        return None

    # continuous actions only
    def _exp(self, xi):
        raise NotImplementedError

    def _algebra_zeros(self, flat: Flat):
        raise NotImplementedError

    def _tmap(self, flat: Flat, xi) -> Flat:
        """``J xi`` on this action's own paths."""
        raise NotImplementedError

    def _tmap_T(self, flat: Flat, v: Flat):
        """``J^T v`` (reads ``v`` at this action's own paths)."""
        raise NotImplementedError

    def _gram_diag(self, flat: Flat):
        """The diagonal of this action's own Gram matrix ``J^T J`` in algebra coordinates (for preconditioning);
        ones where no cheap diagonal is known."""
        return jax.tree.map(jnp.ones_like, self._algebra_zeros(flat))

    def _vcoeffs(self, flat: Flat, v: Flat):
        """``(J^T J)^+ J^T v``: closed form where one exists; the generic solve otherwise."""
        return generic_vcoeffs((self,), flat, v)[0]

    # ----- public API ---------------------------------------------------------------------------------------
    def _flat(self, params) -> tuple[Flat, Any]:
        flat, treedef = _tree.flatten(params)
        self._check(flat)
        for p in self.paths():
            dtype = getattr(flat[p], "dtype", None)
            if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(f"{self.name}: params has dtype {dtype} at {p!r}, a path the group acts on; "
                                f"group actions need floating-point parameters (float16 / bfloat16 / float32 / "
                                f"float64)")
        return flat, treedef

    def sample(self, key, params, scale: float = 1.0):
        """A random group element.  Positive factors have log-factors ~ U(-2 scale, 2 scale); translation shifts
        ~ N(0, (2 scale)^2); GL elements are ``U diag(s) V^T`` with Haar-random ``U, V`` and
        ``log s = c + 1.5 scale (-1, 1, t_3, ..., t_d)``, ``c ~ U(-1.5 scale, 1.5 scale)`` and ``t_i ~ U(-1, 1)``
        per head (condition number exactly ``exp(3 scale)``, singular values in ``[exp(-3 scale), exp(3 scale)]``,
        ``|det|`` random: ``log |det|`` between ``-3 d scale`` and ``3 d scale``), for ``d = 1`` a random sign times
        ``exp(c)``; permutations are uniform.  ``scale``: a finite number >= 0.
        At 0 factors and shifts are the identity, but GL elements are Haar-random orthogonal matrices ``U V^T``
        (condition number 1), not the identity."""
        _check_scale(scale)
        _check_key(key)
        flat, _ = self._flat(params)
        return _compiled(self, "_sample", key, flat, sample_scale(scale, flat, self.paths()))

    def identity(self, params):
        flat, _ = self._flat(params)
        return _compiled(self, "_identity", flat)

    def _check_element(self, g, flat: Flat, where: str = "") -> None:
        """``ValueError`` naming this action when ``g`` is not shaped like its elements at ``flat`` (an element of
        another action, or sampled at parameters of other widths)."""
        want = jax.eval_shape(self._identity, {p: jax.ShapeDtypeStruct(x.shape, x.dtype) for p, x in flat.items()})
        wleaves, wdef = jax.tree.flatten(want)
        gleaves, gdef = jax.tree.flatten(g)
        if gdef != wdef or any(jnp.shape(a) != b.shape for a, b in zip(gleaves, wleaves)):
            got = jax.tree.map(jnp.shape, g)
            need = jax.tree.map(lambda x: x.shape, want)
            raise ValueError(f"act: {where}the element for action {self.name!r} has shapes {got}, but at these "
                             f"parameters its elements have shapes {need}; sample the element (or take it from "
                             f"identity / canonical_element) at parameters of the same architecture")
        if not any(isinstance(a, jax.core.Tracer) for a in gleaves):  # (traced: values unknown, shapes checked)
            self._check_element_values(g, where)

    def _check_element_values(self, g, where: str = "") -> None:
        """``ValueError`` when the values of a concrete element ``g`` are not an element of this action (a
        permutation that repeats a unit, a singular GL matrix); shapes are checked already.  By default: an
        infinite entry (an infinite log-factor multiplied a unit by inf or 0, an infinite shift made a logit
        infinite, silently).  NaN entries pass (a NaN element of NaN parameters, a diverged run, keeps the NaNs
        reaching the output)."""
        for x in jax.tree.leaves(g):
            # (numpy: a concrete element closed over by a jitted function would be staged by jnp, and bool() of it
            # raised a ConcretizationTypeError)
            dtype = jnp.result_type(x)
            if not jnp.issubdtype(dtype, jnp.floating):
                continue
            if np.any(np.isinf(np.asarray(x).astype(np.float64))):
                raise ValueError(f"act: {where}the element for action {self.name!r} has infinite entries; a group "
                                 f"element's entries (log-factors, shifts, matrix entries) must be finite (one "
                                 f"sampled at a scale too large for its dtype overflows: use a smaller scale or "
                                 f"float64 parameters)")

    def act(self, g, params):
        """``g . params``.  ``ValueError`` when ``g`` is not an element of this group at these parameters' shapes."""
        flat, treedef = self._flat(params)
        self._check_element(g, flat)
        return _tree.unflatten(_compiled(self, "_act", g, flat), treedef)

    def inverse(self, g):
        return self._inverse(g)

    def compose(self, g, h):
        """The element ``g o h`` with ``(g o h) . theta = g . (h . theta)``."""
        return self._compose(g, h)

    def canonical_element(self, params):
        """The element ``k`` with ``k . params = canonicalize(params)``."""
        flat, _ = self._flat(params)
        return _compiled(self, "_canonical_element", flat)

    def continuous_canonical_element(self, params, init=None):
        """The element taking ``params`` to the canonical point of the continuous part of the group (no
        permutation sort); for a single action, its canonical element (continuous) or the identity (discrete).
        See :meth:`Product.continuous_canonical_element`."""
        flat, _ = self._flat(params)
        return _compiled(self, "_canonical_element" if self.continuous else "_identity", flat)

    def unordered_invariants(self, params, element=None):
        """Orbit invariants up to the order of permuted units (see :meth:`Product.unordered_invariants`); for a
        single action, :meth:`invariants`."""
        return self.invariants(params)

    def canonicalize(self, params):
        """The canonical representative of the orbit of ``params`` (same network function)."""
        flat, treedef = self._flat(params)
        return _tree.unflatten(_compiled(self, "_canonicalize_flat", flat), treedef)

    def invariants(self, params):
        """Orbit-invariant features (THEORY section 1): equal on ``params`` and ``g . params`` for every g."""
        flat, _ = self._flat(params)
        with reading_invariants("invariants"):
            return _compiled(self, "_invariants", flat)

    def charges(self, params):
        """Noether charges (THEORY section 2): quadratic forms ``Q(theta) = 1/2 theta^T A theta`` (linear forms
        for translation), conserved by gradient flow."""
        flat, _ = self._flat(params)
        return _compiled(self, "_charges", flat)

    def _flat_like(self, flat: Flat, v, method: str) -> Flat:
        """``v`` flattened, with a ``ValueError`` naming the first leaf whose path or shape differs from ``params``
        and a ``TypeError`` naming a leaf that is not real numbers."""
        vflat, _ = _tree.flatten(v)
        for p, x in flat.items():
            if p not in vflat:
                raise ValueError(f"{method}: v has no leaf at {p!r}; it must be a pytree like params (same paths "
                                 f"and shapes), got paths {list(vflat)}")
            if jnp.shape(vflat[p]) != x.shape:
                raise ValueError(f"{method}: v has shape {jnp.shape(vflat[p])} at {p!r} where params has {x.shape}; "
                                 f"it must be a pytree like params")
            dtype = jnp.result_type(vflat[p])
            if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer) or dtype == bool):
                raise TypeError(f"{method}: v has dtype {dtype} at {p!r}; it must hold real numbers (a complex "
                                f"vector has no Euclidean projection here)")
        if len(vflat) != len(flat):
            extra = [p for p in vflat if p not in flat]
            raise ValueError(f"{method}: v has leaves that params lacks: {extra}; it must be a pytree like params")
        return vflat

    def _project(self, params, v, method: str):
        """``vertical`` / ``horizontal``.  ``v`` is computed in the parameters' dtypes, bfloat16 / float16 in float32 (a
        float64 gradient of float32 parameters, or the reverse, failed under strict promotion with JAX's bare
        ``TypePromotionError``) and returned in its own floating dtypes (integer leaves: the parameters')."""
        flat, treedef = self._flat(params)
        vflat, given = self._vector_in_params_dtypes(flat, v, method)
        out = _compiled(self, "_vertical_flat" if method == "vertical" else "_horizontal_flat", flat, vflat)
        return _tree.unflatten(vector_in_given_dtypes(out, given), treedef)

    def _vector_in_params_dtypes(self, flat: Flat, v, method: str):
        """``(v flattened and cast to the dtypes the parameters are computed in, the dtypes to return it in)`` after
        the checks of :meth:`_flat_like`; :func:`vector_in_given_dtypes` casts a result back.  The parameters are
        computed in their own dtypes, bfloat16 / float16 in float32 (:func:`_compiled`), and so is ``v``: a float32
        vector at bfloat16 parameters was rounded to bfloat16 first, so its float32 projection was 2e-3 of ``|v|``
        off (``horizontal(v) + vertical(v)`` 2e-3 from ``v``).  Floating leaves are returned in their own dtypes,
        integer ones in the parameters'."""
        vflat = self._flat_like(flat, v, method)
        given = {p: jnp.result_type(x) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else flat[p].dtype
                 for p, x in vflat.items()}
        work = {p: _computed_dtype(flat[p].dtype) for p in flat}
        vflat = {p: jnp.asarray(x).astype(work[p]) if jnp.result_type(x) != work[p] else x
                 for p, x in vflat.items()}
        return vflat, given

    def vertical(self, params, v):
        """Euclidean projection of ``v`` (a pytree like ``params``) onto the orbit tangent space at ``params``.
        ``v`` may have other real dtypes than ``params``: it is projected in the parameters' dtypes and returned in
        its own (integer leaves in the parameters')."""
        return self._project(params, v, "vertical")

    def horizontal(self, params, v):
        """``v - vertical(params, v)``: the component of ``v`` orthogonal to the orbit (dtypes as for
        :meth:`vertical`)."""
        return self._project(params, v, "horizontal")

    def tangents(self, params):
        """The orbit tangent vectors ``J e_i`` for a basis ``e_i`` of the Lie algebra, stacked on a leading axis
        of every leaf (a pytree like ``params``); an empty leading axis for a discrete group."""
        flat, treedef = self._flat(params)
        out = _compiled(self, "_tangents_flat", flat)
        return _tree.unflatten(out, treedef)

    # ----- shared flat helpers ------------------------------------------------------------------------------
    def _canonicalize_flat(self, flat: Flat) -> Flat:
        return self._act(self._canonical_element(flat), flat)

    def _horizontal_flat(self, flat: Flat, vflat: Flat) -> Flat:
        out = self._vertical_flat(flat, vflat)
        return {p: vflat[p] - out[p] for p in vflat}

    def _vertical_flat(self, flat: Flat, vflat: Flat) -> Flat:
        out = {p: jnp.zeros_like(x) for p, x in vflat.items()}
        if not self.continuous:
            return out
        d = self._tmap(flat, self._vcoeffs(flat, vflat))
        for p, x in d.items():
            out[p] = out[p] + x.astype(out[p].dtype)
        return out

    def _tangents_flat(self, flat: Flat) -> Flat:
        if not self.continuous:
            return {p: jnp.zeros((0,) + x.shape, x.dtype) for p, x in flat.items()}
        xi0 = self._algebra_zeros(flat)
        vec0, unravel = ravel_pytree(xi0)
        basis = jnp.eye(vec0.shape[0], dtype=vec0.dtype)

        def one(e):
            d = self._tmap(flat, unravel(e))
            return {p: d.get(p, jnp.zeros_like(x)) for p, x in flat.items()}

        return jax.vmap(one)(basis)


def _computed_dtype(dtype):
    """The dtype a leaf of ``dtype`` is computed in (:func:`quotient_sgd._tree.widen`): float32 for bfloat16 /
    float16, ``dtype`` itself otherwise."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return dtype


def vector_in_given_dtypes(out: Flat, given) -> Flat:
    """A projection ``out`` of a vector whose leaves had the dtypes ``given``, returned in them (floating leaves;
    integer ones stay in the parameters' dtypes)."""
    return {p: x.astype(given[p]) if jnp.issubdtype(given[p], jnp.floating) else x for p, x in out.items()}


class LogFactorGroup(Group):
    """Base for positive-factor groups ``(R_{>0})^n`` stored as log-factors: the group law is addition, the
    Lie algebra is ``R^n`` and ``exp`` is the identity on these coordinates (rescale, scale)."""

    def _inverse(self, g):
        return -g

    def _cotransport(self, g, cot):
        # a diagonal action by positive factors: rho(g)^{-T} = rho(g)^{-1} = rho(-g)
        return self._act(-g, cot)

    def _compose(self, g, h):
        g, h = common_float(g, h)
        return g + h

    def _exp(self, xi):
        return xi

    def _algebra_zeros(self, flat):
        return self._identity(flat)


# ----- generic vertical projection for one action or a cluster of overlapping actions -----------------------
def _sum_tmaps(comps, flat: Flat, xis) -> Flat:
    out: Flat = {}
    for c, xi in zip(comps, xis):
        for p, x in c._tmap(flat, xi).items():
            out[p] = out[p] + x if p in out else x
    return out


def gram_matrix(comps, flat: Flat):
    """The dense Gram matrix ``J^T J`` of the joint tangent map of ``comps`` in raveled algebra coordinates."""
    xi0 = tuple(c._algebra_zeros(flat) for c in comps)
    vec0, unravel = ravel_pytree(xi0)

    def jtj(vec):
        xis = unravel(vec)
        d = _sum_tmaps(comps, flat, xis)
        full = {p: d.get(p, jnp.zeros_like(x)) for p, x in flat.items()}
        return ravel_pytree(tuple(c._tmap_T(flat, full) for c in comps))[0]

    return jax.jacfwd(jtj)(vec0), unravel


def inverse_where(x, keep):
    """``1 / x`` where ``keep``, 0 elsewhere (no division by the dropped entries): the pseudo-inverse of the
    eigen- or singular values of a factorisation."""
    return jnp.where(keep, 1 / jnp.where(keep, x, jnp.ones_like(x)), jnp.zeros_like(x))


def _pinv_from_eigh(A):
    w, Q = jnp.linalg.eigh(A)
    cut = jnp.finfo(A.dtype).eps * A.shape[0] * jnp.max(w, initial=0)
    return (Q * inverse_where(w, w > cut)[None, :]) @ Q.T


@jax.custom_jvp
def psd_pinv(A: jax.Array) -> jax.Array:
    """The pseudo-inverse of a symmetric positive semi-definite matrix ``A`` (``k x k``): eigenvalues below
    ``eps k`` of the largest are dropped.

    Differentiated by the constant-rank formula for the pseudo-inverse (Golub & Pereyra, 1973), for symmetric
    ``A`` with ``P = A^+ A`` the projector onto the kept eigenvectors:
    ``d(A^+) = -A^+ dA A^+ + (A^+)^2 dA (I - P) + (I - P) dA (A^+)^2``.  It involves ``A^+`` only, never the
    eigenvectors, so it is finite where eigenvalues coincide (two identical units, a dead unit's zero rows):
    differentiating through ``eigh`` divides by eigenvalue gaps and returned NaN there."""
    return _pinv_from_eigh(A)


@psd_pinv.defjvp
def _psd_pinv_jvp(primals, tangents):
    (A,), (dA,) = primals, tangents
    Ap = _pinv_from_eigh(A)
    dA = 0.5 * (dA + dA.T)  # the symmetric part (A is read as symmetric)
    N = jnp.eye(A.shape[0], dtype=A.dtype) - Ap @ A
    Ap2 = Ap @ Ap
    return Ap, -Ap @ dA @ Ap + Ap2 @ dA @ N.T + N @ dA @ Ap2


def _pinv_from_svd(M):
    U, s, Vt = jnp.linalg.svd(M, full_matrices=False)
    cut = jnp.finfo(M.dtype).eps * max(M.shape) * jnp.max(s, initial=0)
    return (Vt.T * inverse_where(s, s > cut)[None, :]) @ U.T


@jax.custom_jvp
def pinv(M: jax.Array) -> jax.Array:
    """The pseudo-inverse of a matrix ``M`` (``m x k``) by its SVD: singular values below ``eps max(m, k)`` of the
    largest are dropped.  Differentiated by the constant-rank formula (Golub & Pereyra, 1973)
    ``d(M^+) = -M^+ dM M^+ + M^+ M^+^T dM^T (I - M M^+) + (I - M^+ M) dM^T M^+^T M^+``, with no division by
    singular-value gaps (differentiating through ``svd`` returned NaN where singular values coincide), evaluated
    without forming ``m x m`` matrices."""
    return _pinv_from_svd(M)


@pinv.defjvp
def _pinv_jvp(primals, tangents):
    (M,), (dM,) = primals, tangents
    Mp = _pinv_from_svd(M)
    k = M.shape[1]
    t1 = -Mp @ (dM @ Mp)
    t2 = (Mp @ Mp.T) @ (dM.T - (dM.T @ M) @ Mp)
    t3 = (jnp.eye(k, dtype=M.dtype) - Mp @ M) @ ((dM.T @ Mp.T) @ Mp)
    return Mp, t1 + t2 + t3


#: Steps of iterative refinement after a solve of the normal equations ``J^T J xi = J^T v`` (dense clusters and
#: GL actions): the normal equations square the condition number of ``J``; each step forms the residual
#: ``v - J xi`` in parameter space and solves again with the same factorisation.
REFINE_STEPS = 1


#: Largest tangent matrix ``J`` (rows: entries of the cluster's parameters, columns: generators) that
#: :func:`generic_vcoeffs` materialises for a cluster of non-abelian actions.
JACOBIAN_MAX_ENTRIES = 1 << 22


def generic_vcoeffs(comps, flat: Flat, v: Flat, *, refine: int = REFINE_STEPS):
    """``(J^T J)^+ J^T v`` for the joint tangent map of ``comps``, by a dense solve.

    The Gram matrix is materialised by forward-mode differentiation of the (linear) map ``xi -> J^T J xi``,
    scaled to unit diagonal (Jacobi) and eigendecomposed; eigenvalues below ``eps n`` of the largest are dropped
    (the pseudo-inverse), so ``J xi`` is the projection onto ``range(J)`` even where generators are linearly
    dependent (a unit whose weights vanish; its coefficient is 0).  The normal equations square the condition
    number: at an unbalanced point (a chain of rescales with factors ``e^+-4``) a float32 solve was 20-50% of
    ``|v|`` off; ``refine`` steps of iterative refinement (residual ``v - J xi`` in parameter space, solved again
    with the same eigenbasis) bring it to the float32 rounding of the projection (``3e-7`` of ``|v|`` there).
    Not always: a direction whose scaled eigenvalue falls below the cut is dropped, and refinement cannot bring it
    back.  For an overlapping float32 rescale chain (two hidden layers, stacked CNN channels) that happened from
    elements of scale 2 on (2 of 16 samples 3-12% of ``|v|`` off; at scale 3 most samples), so those chains are
    solved by :func:`~._reduced.direct_vcoeffs` (an M-matrix factorisation without cancellation) instead; this
    function serves the clusters without that form.

    Clusters with a non-abelian action (a deep linear GL chain) couple their generators so strongly that
    legitimate directions fall below the Gram matrix's rounding (after an element of condition number ``e^3``,
    9% of ``|v|`` was lost, refinement or not): they solve the least-squares problem ``min |J xi - v|`` by the
    SVD of ``J`` itself (materialised by forward-mode differentiation of ``xi -> J xi``, columns scaled to unit
    norm, singular values below ``eps max(shape)`` of the largest dropped) while ``J`` has at most
    :data:`JACOBIAN_MAX_ENTRIES` entries.

    Both pseudo-inverses (:func:`psd_pinv`, :func:`pinv`) are differentiated by the constant-rank formula, not
    through ``eigh`` / ``svd``, so ``jax.grad`` through the projection is finite where eigen- or singular values
    coincide (symmetric points: identical units, dead units).
    """
    if any(not getattr(c, "abelian", True) for c in comps):
        xi0 = tuple(c._algebra_zeros(flat) for c in comps)
        vec0, unravel = ravel_pytree(xi0)
        paths = list(dict.fromkeys(p for c in comps for p in c.paths()))
        if sum(flat[p].size for p in paths) * vec0.shape[0] <= JACOBIAN_MAX_ENTRIES:
            def jmap(vec):
                d = _sum_tmaps(comps, flat, unravel(vec))
                return jnp.concatenate([jnp.reshape(d.get(p, jnp.zeros_like(flat[p])), (-1,)) for p in paths])

            J = jax.jacfwd(jmap)(vec0)
            rhs = jnp.concatenate([jnp.reshape(v.get(p, jnp.zeros_like(flat[p])), (-1,)).astype(J.dtype)
                                   for p in paths])
            csq = jnp.sum(jnp.square(J), axis=0)
            cs = jnp.where(csq > 0, 1 / jnp.sqrt(jnp.where(csq > 0, csq, 1)), 0)  # (no sqrt'(0) = inf)
            return unravel(cs * (pinv(J * cs[None, :]) @ rhs))
    G, unravel = gram_matrix(comps, flat)
    d = jnp.diagonal(G)
    ds = jnp.where(d > 0, 1 / jnp.sqrt(jnp.where(d > 0, d, 1)), 0)
    Ginv = psd_pinv(G * ds[:, None] * ds[None, :])

    def solve(r: Flat):
        full = {p: r.get(p, jnp.zeros_like(x)) for p, x in flat.items()}
        rhs = ravel_pytree(tuple(c._tmap_T(flat, full) for c in comps))[0]
        return ds * (Ginv @ (ds * rhs))

    x = solve(v)
    for _ in range(refine):
        Jx = _sum_tmaps(comps, flat, unravel(x))
        x = x + solve({p: v.get(p, jnp.zeros_like(y)) - y for p, y in Jx.items()})
    return unravel(x)


def _pcg(matvec, b, inv_diag, tol, max_steps: int, restart: int = 10, *, return_steps: bool = False):
    """Jacobi-preconditioned conjugate gradients for ``A x = b``, ``A`` symmetric positive semi-definite and ``b``
    in its range, from ``x = 0`` (so the minimum-norm solution).  Stops when ``|r_i| <= tol (1 + |b_i|)`` for every
    entry, after ``max_steps``, or when a direction has no positive curvature (``p^T A p <= 0``, e.g. once the
    residual is exactly zero: the 0 / 0 that would turn the iterate into NaN is never taken).  The residual is
    recomputed as ``b - A x`` every ``restart`` steps, against the drift of the recursive update.
    ``return_steps``: return ``(x, number of steps taken)``.

    Written here rather than taken from lineax, whose ``CG`` was used before: the Gram matrices of overlapping
    actions are singular (dead units, deep linear chains, near-degenerate generators), float32 rounding leaves
    ``b`` a small component off their range, and its unguarded ``r^T z / p^T A p`` then turned the projection
    into NaN (an MLP with a width-1 hidden layer: 4-10 of 10 unbalanced points); and it refused the tangent of a
    preconditioner built from the parameters, so ``jax.grad`` through a projection raised.  Derivatives come
    from ``jax.lax.custom_linear_solve`` (:func:`cg_vcoeffs`)."""
    thresh = tol * (1 + jnp.abs(b))

    def cond(carry):
        _, r, _, _, it, ok = carry
        return ok & (it < max_steps) & jnp.any(jnp.abs(r) > thresh)

    def body(carry):
        x, r, p, rz, it, _ = carry
        Ap = matvec(p)
        pAp = jnp.vdot(p, Ap)
        ok = (pAp > 0) & jnp.isfinite(pAp)
        alpha = jnp.where(ok, rz / jnp.where(ok, pAp, 1), 0)
        x = x + alpha * p
        # (lax.cond, not where: the exact residual costs another product with A, taken every restart steps only)
        r = jax.lax.cond((it + 1) % restart == 0, lambda: b - matvec(x), lambda: r - alpha * Ap)
        z = inv_diag * r
        rz_new = jnp.vdot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1), 0)
        return x, r, z + beta * p, rz_new, it + 1, ok

    z0 = inv_diag * b
    init = (jnp.zeros_like(b), b, z0, jnp.vdot(b, z0), jnp.asarray(0), jnp.asarray(True))
    out = jax.lax.while_loop(cond, body, init)
    return (out[0], out[4]) if return_steps else out[0]


#: Steps of iterative refinement, with the residual in parameter space, after the conjugate-gradient solve of
#: :func:`cg_vcoeffs`.
CG_REFINE_STEPS = 1


def cg_vcoeffs(comps, flat: Flat, v: Flat, *, max_steps: int | None = None, gram=None,
               refine: int = CG_REFINE_STEPS):
    """See :func:`cg_system`; the solution, followed by ``refine`` steps of iterative refinement: the residual
    ``r = v - J x`` is formed in parameter space, entry by entry, and ``x`` gains the CG solution for ``J^T r``;
    the iterate with the smallest ``|v - J x|`` (the closest to the projection: ``|v - J x|^2 = |v - P_V v|^2 +
    |J x - P_V v|^2``) is kept.

    CG stops on the residual of the normal equations, ``J^T (v - J x)``, and far from balance the Jacobi-scaled
    Gram matrix is ill conditioned (an MLP's rescale chain of 256 units moved by an element of scale 3: smallest
    singular value of the normalised tangents ``8e-4``): a float32 residual at its tolerance left the vertical part
    0.5-1% off the exact projection (the dense factorisation of :func:`._reduced.direct_vcoeffs`: 1e-5).  Each
    refinement step divides that error by about the same factor, as the dense path's refinement does.  Derivatives
    are those of the first solve (implicit differentiation through ``jax.lax.custom_linear_solve``); the refinement
    corrects the value only."""
    matvec, b, inv, tol, steps, finish = cg_system(comps, flat, v, max_steps=max_steps, gram=gram)

    def solve(mv, rhs_vec):
        return _pcg(mv, rhs_vec, inv, tol, steps)

    # derivatives by the implicit function theorem (the Gram matrix is symmetric), not through the loop
    x0 = finish(jax.lax.custom_linear_solve(matvec, b, solve, symmetric=True))
    if not refine:
        return x0
    fixed, vfixed = jax.lax.stop_gradient((flat, v))
    paths = list(dict.fromkeys(p for c in comps for p in c.paths()))

    def residual(x):
        jx = _sum_tmaps(comps, fixed, x)
        r = {p: vfixed.get(p, jnp.zeros_like(fixed[p])) - jx.get(p, jnp.zeros_like(fixed[p])) for p in paths}
        return r, sum(jnp.sum(jnp.square(y)) for y in r.values())

    x = jax.lax.stop_gradient(x0)
    r, rn = residual(x)
    for _ in range(refine):
        mv, rb, rinv, rtol, rsteps, rfinish = cg_system(comps, fixed, r, max_steps=max_steps, gram=gram)
        # (the stopping test relative to this right-hand side's own size: relative to |r|, as cg_system scales it,
        # the refinement's right-hand side is already below the tolerance and no step is taken)
        size = jnp.max(jnp.abs(rb))
        size = jnp.where(size > 0, size, jnp.ones_like(size))
        x_new = jax.tree.map(jnp.add, x, rfinish(size * _pcg(mv, rb / size, rinv, rtol, rsteps)))
        r_new, rn_new = residual(x_new)
        better = rn_new <= rn
        x, r, rn = jax.tree.map(lambda a, c: jnp.where(better, a, c), (x_new, r_new, rn_new), (x, r, rn))
    return jax.tree.map(lambda a, c: a + jax.lax.stop_gradient(c - a), x0, x)


def cg_system(comps, flat: Flat, v: Flat, *, max_steps: int | None = None, gram=None):
    """The system of :func:`cg_vcoeffs`, ``(J^T J)^+ J^T v`` for the joint tangent map of ``comps`` by matrix-free
    conjugate gradients (:func:`_pcg`): ``(matvec, b, inverse diagonal, tol, max_steps, finish)`` on flat vectors,
    ``finish`` taking the solution back to the coefficients' structure and scale.

    Each iteration costs one ``J`` and one ``J^T`` (``O(P)``), against ``k`` of them to materialise the Gram
    matrix: the method for large clusters (a deep MLP's chain of rescales has one generator per hidden unit).
    The Gram matrix is positive semi-definite and the right-hand side lies in its range, so CG converges to the
    minimum-norm solution from zero; tolerances follow the dtype (``1e-12`` relative in float64, ``1e-6`` in
    float32).

    ``gram``: ``(xi -> J^T J xi, diag(J^T J))`` when the cluster has a cheaper form of its Gram matrix than the
    tangent maps (:mod:`._reduced`); the same iterations on the same matrix.
    """
    xi0 = tuple(c._algebra_zeros(flat) for c in comps)
    paths = list(dict.fromkeys(p for c in comps for p in c.paths()))
    dtype = jax.tree.leaves(xi0)[0].dtype
    k = sum(x.size for x in jax.tree.leaves(xi0))

    def jtj(xis):
        d = _sum_tmaps(comps, flat, xis)
        full = {p: d.get(p, jnp.zeros_like(flat[p])) for p in paths}
        return tuple(c._tmap_T(flat, full) for c in comps)

    full_v = {p: v.get(p, jnp.zeros_like(flat[p])) for p in paths}
    rhs = tuple(c._tmap_T(flat, full_v) for c in comps)
    if gram is None:
        diag = tuple(c._gram_diag(flat) for c in comps)
    else:
        jtj, diag = gram
    # The system is solved Jacobi-scaled, ``(D^-1/2 G D^-1/2) y = D^-1/2 J^T v / |v|`` with ``x = D^-1/2 y |v|``
    # (``D`` the Gram diagonal): entry ``i`` of its residual is ``<t_i, v - J x> / (|t_i| |v|)``, the cosine between
    # generator ``i`` and the horizontal remainder (times ``|h| / |v|``), and the iterations stop when every entry is
    # at most ``tol (1 + |b_i|)``: each generator's own share of the vertical part is resolved to ``tol |v|``.
    # A purely relative test per entry can never pass for entries with ``b_i ~ 0`` in float32 (measured with
    # lineax's CG: 3076 iterations, the cap, on a random vector for an MLP's rescale chain whose Jacobi-scaled Gram
    # has condition number 6, converged after 10); scaling by ``max |b|`` instead amplifies rounding when ``v`` is
    # horizontal, ``b ~ eps`` (on a rank-deficient Gram matrix, a deep linear chain's, CG then chased that noise
    # along null directions and returned a vertical part 20x ``|v|``).  The right-hand side was scaled by
    # ``sqrt(max_i G_ii) |v|`` alone, one number for every generator: far from balance (an MLP's rescale chain moved
    # by an element of scale 3, generator norms from 3 to 3.6e4) the small generators' residuals then passed the
    # test at a relative error of ``1e-6 sqrt(max G / G_ii)`` ~ 1e-2, and the float32 vertical part was 0.5-1% off
    # the exact projection (float64: 1e-11).  The iterates are those of Jacobi-preconditioned CG; only the stopping
    # test and the rounding differ.
    vnorm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in full_v.values()))
    vnorm = jax.lax.stop_gradient(jnp.where(vnorm > 0, vnorm, jnp.ones_like(vnorm)))  # cancels from the solution
    # the scaling steers the iterations only (it cancels from ``J x``), so it carries no derivative
    dflat = jax.lax.stop_gradient(ravel_pytree(diag)[0])
    ds = jnp.where(dflat > 0, 1 / jnp.sqrt(jnp.where(dflat > 0, dflat, 1)), 0)
    rflat, unravel = ravel_pytree(rhs)
    b = ds * rflat / vnorm
    inv = jnp.ones_like(b)
    tol = 1e-12 if dtype == jnp.float64 else 1e-6

    def matvec(y):
        return ds * ravel_pytree(jtj(unravel(ds * y)))[0]

    def finish(y):
        return unravel(ds * y * vnorm)

    return matvec, b, inv, tol, max_steps or max(4 * k, 50), finish
