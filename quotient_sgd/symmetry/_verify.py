"""Numerical verification that a declared action is a symmetry of a model."""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import _tree
from ._base import Group, SymmetryError, _check_key, _check_scale, as_count
from ._permutation import Permutation
from ._product import Product, Word

#: A change above ``rtol`` is put down to rounding when the round trip ``g^-1 . (g . theta)`` (exactly ``theta``)
#: changes the outputs by at least ``1 / ROUNDING_FACTOR`` as much.
ROUNDING_FACTOR = 10.0

#: A change of at most this many machine epsilons of the dtype the sums are accumulated in (the outputs' dtype,
#: float32 for bfloat16 / float16 outputs) is rounding, whatever ``rtol``: a permutation, exact in its round trip,
#: reorders the sums of the next layer (float32 MLPs and Transformers: 1.2 eps; a 784-256-256-10 float64 MLP: 3.4
#: eps), and an ``rtol`` below that (1e-7 in float32, 0 in float64) reported it as "not a symmetry".
ROUNDING_EPS = 16

#: ... plus this many epsilons of the outputs' own dtype: a low-precision output (bfloat16, float16) is accumulated
#: in float32 and rounded once, so a reordered sum moves it by at most about one unit in its last place (measured:
#: 0 - 0.5 eps for permutations of bfloat16 / float16 MLPs, CNNs and Transformers).  16 epsilons of bfloat16 are
#: 12.5%: a rescale forced onto a bfloat16 tanh MLP changed the outputs by 5-12% (its round trip by 0.4%) and
#: passed, and a LayerNorm CNN with ``norm_eps=1e-3`` had every scale component pass alone (its product failed, with
#: a message blaming the overlaps).
OUTPUT_EPS = 2


def _requirement(action: Group) -> str:
    """What makes an action of this kind a symmetry, for the message of a declared action that is not one."""
    from ._gl import GL
    from ._permutation import Permutation
    from ._rescale import Rescale
    from ._scale import Scale
    from ._translation import Translation

    if isinstance(action, Rescale):
        return ("a rescale is a symmetry only when the incoming units reach the outgoing weights through a positively "
                "homogeneous activation (relu, leaky_relu, identity) and nothing else: not across a residual / skip "
                "connection, a normalisation or another path that reads the units")
    if isinstance(action, Translation):
        return ("a translation shifts every logit by the same amount, which leaves log_softmax unchanged but not the "
                "logits: verify compares the model's outputs, so the model must return log-probabilities (e.g. "
                "jax.nn.log_softmax of the logits)")
    if isinstance(action, Scale):
        return ("a scale is a symmetry only of weights whose outputs go through a normalisation (LayerNorm, RMSNorm, "
                "BatchNorm over the members' units) and nowhere else; exactly only where the normalisation's epsilon "
                "is negligible against the variance of its input (small weights, or log-factors at large scale, are "
                "not)")
    if isinstance(action, GL):
        return ("a GL action is a symmetry only when its two factors enter the network through their product alone "
                "(W_Q W_K^T, W_V W_O, consecutive linear layers): no activation or normalisation between them")
    if isinstance(action, Permutation):
        return ("a permutation must reorder every array indexed by those units (incoming kernel columns and biases, "
                "outgoing kernel rows, per-unit normalisation parameters) and be followed by an elementwise "
                "activation")
    return "its action changes the network function"


def _running_statistics_note(model) -> str:
    """For a model with a normalisation in evaluation mode (``use_running_average=True``, ``model.eval()``): a
    sentence saying why a scale or permutation of its units changes the outputs; ``""`` otherwise."""
    modes = [path for path, node in nnx.iter_graph(model) if getattr(node, "use_running_average", False) is True]
    if not modes:
        return ""
    where = ".".join(map(str, modes[0])) or type(model).__name__
    return (f" Note: {where} normalises with running statistics (evaluation mode), which are state, not parameters: "
            f"a group element does not move them, so scale and permutation symmetries hold for the training-mode "
            f"function only. Verify the model in training mode (model.train()), or transform the statistics with "
            f"the parameters (CNN.act_on_batch_stats).")


def _real_number(value) -> float | None:
    """``value`` as a float when it is a real number (a Python or NumPy scalar, or a concrete 0-d real array), else
    ``None`` (a bool, a string, an array of several values, a complex or traced value)."""
    if isinstance(value, (bool, str, bytes)) or getattr(value, "dtype", None) == bool:
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    if (dtype is not None and jnp.ndim(value) == 0 and not isinstance(value, jax.core.Tracer)
            and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))):
        return float(value)
    return None


def _moving(action: Group, g):
    """``g`` with every permutation element that is the identity (drawn with probability ``1 / n!``: one in two for
    two units) replaced by the cyclic shift of its units: the identity moves nothing, so a declared permutation that
    is not a symmetry passed ``verify`` whenever only identities were drawn (a permutation of two hidden units
    that leaves the bias out, ``num_samples=1``: 15 of 40 keys; as a product's component 4 of 40)."""
    def fix(c, e):
        e_np = np.asarray(e)
        if isinstance(c, Permutation) and e_np.shape[-1] > 1 and np.array_equal(e_np, np.arange(e_np.shape[-1])):
            return jnp.roll(e, 1)
        return e

    if isinstance(action, Product):
        return Word(g.indices, tuple(fix(action.components[i], e) for i, e in zip(g.indices, g.elements)))
    return fix(action, g)


def verify(model, group: Group, x, key, *, num_samples: int = 4, scale: float = 1.0, rtol: float = 1e-4) -> float:
    """Check numerically that every component of ``group`` leaves ``model``'s outputs on ``x`` unchanged.

    For each component, ``num_samples`` random elements (``group.sample(..., scale)``; a permutation drawn as the
    identity is replaced by the cyclic shift of its units, so that every element moves something) are applied to
    the parameters from ``nnx.split(model, nnx.Param, ...)``, and the relative output change
    ``max |f(x; g.theta) - f(x; theta)| / max |f(x; theta)|`` is measured (for a model returning a pytree of
    arrays, the largest over its arrays, each relative to its own largest entry; the outputs must be floating
    point); then the same for elements of the whole group.  THEORY section 1: a symmetry is a claim about the
    architecture, so a declared action that changes the function is an error.

    A change above ``rtol`` is put down to floating-point rounding, and not reported, when applying the element
    and then its inverse (``g^-1 . (g . theta)``, exactly ``theta``) changes the outputs by at least a tenth as
    much (:data:`ROUNDING_FACTOR`): a badly conditioned element (a GL matrix at ``scale=3`` in float32) loses
    that many digits either way, whereas an action that is not a symmetry changes the outputs far beyond the
    rounding of its round trip.  A change of at most :data:`ROUNDING_EPS` machine epsilons of the dtype the outputs
    are accumulated in (theirs; float32 for bfloat16 / float16), or :data:`OUTPUT_EPS` of the outputs' own dtype if
    larger, is rounding too, whatever ``rtol`` (a permutation's round trip is exact, but it reorders sums).

    When the element is too large for the parameter dtype to tell (the outputs become non-finite, or a change
    above ``rtol`` is within rounding of a round trip that itself changes the outputs by a tenth of their size
    or more: GL elements at ``scale=8`` in float32, rescale factors beyond the float32 range), the result is
    neither a pass nor a failure: ``ValueError`` (a ``SymmetryError`` used to claim that the action was not a
    symmetry).

    Returns:
        the worst relative output change observed.

    Raises:
        SymmetryError: naming the component and the parameter paths it acts on, when the change exceeds ``rtol``
        and is not explained by rounding; for a model whose normalisation runs in evaluation mode (running
        statistics, ``model.eval()``), saying so: its scale and permutation symmetries hold in training mode.
        ValueError: a bad argument (outputs that are not floating point, or not finite at the model's own
        parameters: NaN or inf in ``x`` or in a parameter; empty outputs, an ``x`` of no examples; ``scale=0``,
        whose rescale, scale and translation elements are the identity), or an inconclusive comparison (above).
        TypeError: a ``model``, ``group`` or ``key`` of the wrong kind.
    """
    count = as_count(num_samples)  # (NumPy and concrete 0-d JAX integers too)
    if count is None or count < 1:
        raise ValueError(f"verify: num_samples must be an integer >= 1 (random elements per component), got "
                         f"{num_samples!r}")
    num_samples = count
    value = _real_number(rtol)  # (a 0-d NumPy / JAX array as scale accepts it, read as a float)
    if value is None or not value >= 0:
        raise ValueError(f"verify: rtol must be a number >= 0, got {rtol!r}")
    rtol = value
    _check_scale(scale, "verify")  # (a negative scale was refused by the sampler, as "sample: scale=...")
    if _real_number(scale) == 0:
        # at scale 0 every log-factor and shift is 0: rescale, scale and translation elements are the identity, so a
        # declared action of theirs that is not a symmetry passed (a rescale forced onto a tanh MLP: 0.0 returned)
        raise ValueError("verify: scale must be > 0, got 0: at scale 0 the rescale, scale and translation elements "
                         "are the identity and move nothing, so nothing would be checked (use e.g. scale=1.0)")
    _check_key(key, "verify")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"verify: model must be the Flax NNX model (its parameters are split from it), got "
                        f"{type(model).__name__}")
    if not isinstance(group, Group):
        raise TypeError(f"verify: group must be a symmetry group (e.g. model.symmetries()), got "
                        f"{type(group).__name__}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def _f(p, r):
        # the non-Param state (e.g. batch statistics a training-mode BatchNorm updates) is an argument, so the
        # model is rebuilt inside the trace and nothing outside it is mutated
        return nnx.merge(graphdef, p, r)(x)

    def f(p):
        return _f(p, rest)

    # the outputs may be a pytree of arrays (logits and auxiliary outputs): each array is compared relative to its
    # own largest entry (a tuple failed in jnp.abs, "absolute requires ndarray or scalar arguments")
    y0 = jax.tree_util.tree_leaves_with_path(f(params))
    if not y0:
        raise ValueError(f"verify: {type(model).__name__} returned no arrays on x; verify compares its outputs")
    for path, y in y0:
        if not jnp.issubdtype(y.dtype, jnp.floating):
            where = f" at {jax.tree_util.keystr(path)}" if path else ""
            raise ValueError(f"verify: the outputs of {type(model).__name__} must be floating-point arrays (the change "
                             f"is measured relative to them), got dtype {y.dtype}{where} (e.g. an argmax); verify a "
                             f"model returning the logits or probabilities instead")
    if not any(y.size for _, y in y0):
        # (an empty batch: every relative change was 0 and any declared action, a symmetry or not, passed)
        raise ValueError(f"verify: the outputs of {type(model).__name__} on x are empty (shapes "
                         f"{[tuple(y.shape) for _, y in y0]}); x must hold at least one example to compare outputs on")
    y0 = [y for _, y in y0]
    if not all(bool(jnp.all(jnp.isfinite(y))) for y in y0):
        # (every comparison is then NaN, which was reported as "inconclusive ... use a smaller scale")
        bad = [p for p, v in _tree.flatten(params)[0].items() if not bool(jnp.all(jnp.isfinite(v)))]
        where = f"the parameters hold NaN or inf at {bad[0]!r}" if bad else "x holds NaN or inf, or the model overflows"
        raise ValueError(f"verify: the outputs of {type(model).__name__} on x are not finite at its own parameters "
                         f"({where}); there is nothing to compare a moved copy with")
    refs = [jnp.maximum(jnp.max(jnp.abs(y), initial=0), jnp.finfo(y.dtype).tiny) for y in y0]
    out_dtype = max((y.dtype for y in y0), key=lambda d: float(jnp.finfo(d).eps))  # the least precise output
    # what reordering the sums can change (see ROUNDING_EPS, OUTPUT_EPS)
    accumulated = out_dtype if jnp.finfo(out_dtype).bits >= 32 else jnp.float32
    reorder = max(ROUNDING_EPS * float(jnp.finfo(accumulated).eps), OUTPUT_EPS * float(jnp.finfo(out_dtype).eps))
    comps = group.components if isinstance(group, Product) else (group,)

    def relative(p) -> float:
        """The largest change of an output array relative to its largest entry, at parameters ``p``."""
        return max(float(jnp.max(jnp.abs(y - y_0), initial=0) / r)
                   for y, y_0, r in zip(jax.tree.leaves(f(p)), y0, refs))

    def change(action, g) -> float:
        return relative(action.act(g, params))

    def rounding(action, g) -> float:
        # g^-1 . (g . theta) is theta exactly: what it changes is the rounding of applying an element this large
        return relative(action.act(action.inverse(g), action.act(g, params)))

    def fails(action, g, err) -> str | None:
        """``None`` when ``err`` is within ``rtol`` or explained by rounding, else the rounding comparison.
        ``ValueError`` when the element is too large for the dtype to tell (see below)."""
        if err <= max(rtol, reorder):
            return None
        rt = rounding(action, g)
        if math.isfinite(err) and err > ROUNDING_FACTOR * rt:
            return f"(the round trip g^-1 . (g . theta), exactly theta, changed them by only {rt:.3g} in rounding)"
        if math.isfinite(err) and ROUNDING_FACTOR * rt < 1:
            return None
        # The element overflowed (non-finite outputs), or its rounding alone changes the outputs by as much as they
        # are large, so that it would excuse any change: neither "symmetry" nor "not a symmetry" can be read off.
        raise ValueError(
            f"verify: inconclusive for {action.name!r} at scale={scale} in {out_dtype}: a random element changed the "
            f"outputs by {err:.3g} (relative) and the exact round trip g^-1 . (g . theta) by {rt:.3g}: rounding or "
            f"overflow of elements this large swamps the comparison. Use a smaller scale or float64 parameters.")

    worst = 0.0
    keys = jax.random.split(key, len(comps) + 1)
    for c, k in zip(comps, keys):
        for kk in jax.random.split(k, num_samples):
            g = _moving(c, c.sample(kk, params, scale))
            err = change(c, g)
            worst = max(worst, err)
            why = fails(c, g, err)
            if why:
                raise SymmetryError(
                    f"declared action {c.name!r} ({type(c).__name__} on parameters {list(c.paths())}) is not a "
                    f"symmetry of {type(model).__name__}: a random element changed the outputs by {err:.3g} "
                    f"(relative) > rtol={rtol} {why}. Remove it from the model's symmetries(): {_requirement(c)}."
                    f"{_running_statistics_note(model)}"
                )
    if isinstance(group, Product):
        for kk in jax.random.split(keys[-1], num_samples):
            g = _moving(group, group.sample(kk, params, scale))
            err = change(group, g)
            worst = max(worst, err)
            why = fails(group, g, err)
            if why:
                raise SymmetryError(
                    f"each component of {group.name!r} is a symmetry but their product is not: relative output "
                    f"change {err:.3g} > rtol={rtol} {why}; check the overlaps between components"
                )
    return worst
