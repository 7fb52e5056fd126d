"""Argument checks shared by the models: a clear ``ValueError`` naming the model and the argument."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def as_size(model: str, name: str, value, low: int = 1) -> int:
    """``value`` as a Python ``int >= low``: a Python or NumPy integer, or a concrete 0-d integer array (NumPy or
    JAX, e.g. ``jnp.int32(16)``); a ``ValueError`` naming the model and the argument for a ``bool``, a float, a
    string, an array with axes, a traced value, or an integer below ``low``.  (A JAX integer was refused as
    ``MLP: din must be an integer >= 1, got Array(16, dtype=int32)`` while a NumPy one was accepted.)"""
    need = f"{model}: {name} must be an integer >= {low}"
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{need} known when the model is built, got a traced value {value!r}; pass a Python "
                         f"integer (sizes fix the parameters' shapes)")
    ok = not isinstance(value, (bool, np.bool_))
    if ok and not isinstance(value, numbers.Integral):
        try:
            kind = np.asarray(value).dtype
        except Exception:  # an object NumPy cannot read as an array
            kind = np.dtype(object)
        ok = kind.kind in "iu" and np.ndim(value) == 0
    if not ok or int(value) < low:
        raise ValueError(f"{need}, got {value!r}")
    return int(value)


def check_sizes(model: str, **sizes) -> tuple[int, ...]:
    """Every value an integer >= 1 (``din=4, width=0`` -> ``MeanField: width must be an integer >= 1, got 0``),
    returned as Python ``int`` s in the order given (:func:`as_size`: NumPy and concrete JAX integers accepted)."""
    return tuple(as_size(model, name, value) for name, value in sizes.items())


def check_widths(model: str, name: str, widths, *, allow_empty: bool = True) -> tuple[int, ...]:
    """A sequence of integers >= 1 (layer widths / channels), returned as a tuple of ints."""
    example = "(64, 64) or (32,)"
    if isinstance(widths, (numbers.Integral, str)) or not hasattr(widths, "__iter__"):
        raise ValueError(f"{model}: {name} must be a sequence of widths >= 1, e.g. {example}, got {widths!r}")
    try:
        out = tuple(widths)
    except TypeError:  # a 0-d array has __iter__ but cannot be iterated
        out = None
    try:
        sizes = None if out is None else tuple(as_size(model, name, w) for w in out)
    except ValueError:
        sizes = None
    if sizes is None or (not sizes and not allow_empty):
        raise ValueError(f"{model}: {name} must be a {'non-empty ' if not allow_empty else ''}sequence of widths "
                         f">= 1, e.g. {example}, got {widths!r}")
    return sizes


def check_classes(model: str, name: str, n: int, classifier) -> None:
    """A classifier's ``log_softmax`` over a single class is identically 0: the model would be constant, and its
    translation symmetry the whole head."""
    if classifier and n < 2:
        raise ValueError(f"{model}: classifier=True needs {name} >= 2 classes (log_softmax over one class is "
                         f"constant); got {name}={n}. Use classifier=False for a single output")


def check_eps(model: str, name: str, value) -> float:
    """A finite number >= 0 (a normalisation epsilon: a negative one makes a constant input NaN); text such as
    ``"1e-5"``, which ``float`` would read, is refused as the other non-numbers are."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if isinstance(value, (bool, str, bytes)) or not 0 <= out < float("inf"):
        raise ValueError(f"{model}: {name} must be a finite number >= 0, got {value!r}")
    return out


def as_real_input(model: str, x, dtype) -> jax.Array:
    """``x`` cast to the parameters' real floating ``dtype``; ``ValueError`` naming the model for inputs that are
    not real numbers: a complex ``x`` was cast with its imaginary part dropped (only a ``ComplexWarning``; a purely
    imaginary input became zeros), a string failed in NumPy's conversion naming neither the model nor ``x``."""
    kind = getattr(x, "dtype", None)
    if kind is None:
        try:
            kind = np.asarray(x).dtype
        except (TypeError, ValueError):
            kind = np.dtype(object)
    if not any(jnp.issubdtype(kind, k) for k in (jnp.floating, jnp.integer, jnp.bool_)):
        hint = ("; pass its real and imaginary parts as features (x.real, x.imag)"
                if jnp.issubdtype(kind, jnp.complexfloating) else "")
        raise ValueError(f"{model}: x must hold real numbers (a float, integer or bool array), got dtype {kind}{hint}")
    return jnp.asarray(x, dtype)


def check_input(model: str, x, kernel: jax.Array) -> jax.Array:
    """``x`` cast to the dtype of the first layer's ``kernel`` ``(din, ...)``; ``ValueError`` naming the model
    unless its last axis has ``din`` features (JAX's own error, from inside the first matrix product, named
    neither), or when ``x`` does not hold real numbers (:func:`as_real_input`)."""
    x = as_real_input(model, x, kernel.dtype)
    if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"{model}: x must have din={kernel.shape[0]} features on its last axis, "
                         f"(..., {kernel.shape[0]}), got shape {x.shape}")
    return x


def check_flag(model: str, name: str, value) -> bool:
    """A bool (or NumPy bool, or a concrete 0-d boolean NumPy / JAX array such as ``jnp.bool_(True)``), returned as
    ``bool``: ``bool("False")`` is ``True``, so a string or a number is refused rather than read by its truth
    value."""
    if (not isinstance(value, (bool, np.bool_, jax.core.Tracer)) and hasattr(value, "__array__")
            and getattr(value, "ndim", None) == 0 and getattr(value, "dtype", None) == np.bool_):
        value = bool(value)
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{model}: {name} must be True or False, got {value!r}")
    return bool(value)


#: The parameter dtypes the models take (by name): JAX's other real floating dtypes (the 8-bit ``float8_*`` and the
#: 4-bit ``float4_e2m1fn`` of ``ml_dtypes``) cannot hold a trainable model: the initial draws of a float8_e4m3fn
#: model were NaN (every output NaN, silently), float8_e8m0fnu has no zero and no sign, and float4 failed inside
#: ``jax.random`` naming neither the model nor the argument.
PARAM_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_param_dtype(model: str, value) -> jnp.dtype:
    """One of :data:`PARAM_DTYPES` (``jnp.float32``, ``jnp.float64``, ``jnp.bfloat16``, ``"float16"`` ...),
    returned as a ``jnp.dtype``; integer, boolean and complex dtypes cannot be trained by gradient descent (an
    integer one failed inside the first layer with a dtype-promotion error), nor can 8- or 4-bit floats."""
    try:
        dtype = jnp.dtype(value)
    except (TypeError, ValueError):
        dtype = None
    if value is None or dtype is None or dtype.name not in PARAM_DTYPES:
        raise ValueError(f"{model}: param_dtype must be a real floating dtype (one of {', '.join(PARAM_DTYPES)}; e.g. "
                         f"jnp.float32), got {repr(value) if value is None or dtype is None else dtype.name}")
    return dtype


def check_rngs(model: str, rngs) -> None:
    """An ``nnx.Rngs`` with a ``params`` or a ``default`` stream (the models draw their initial parameters from
    ``rngs.params()``, which falls back to ``default``): ``nnx.Rngs(dropout=0)`` failed inside the first layer with
    flax's ``AttributeError: No RngStream named 'params' found in Rngs``, naming neither the model nor the argument."""
    if not isinstance(rngs, nnx.Rngs):
        raise ValueError(f"{model}: rngs must be an nnx.Rngs (e.g. nnx.Rngs(0)), got {type(rngs).__name__} "
                         f"{rngs!r}")
    if "params" not in rngs and "default" not in rngs:
        raise ValueError(f"{model}: rngs must have a 'params' or a 'default' stream to draw the initial parameters "
                         f"from (e.g. nnx.Rngs(0) or nnx.Rngs(params=0)), got an nnx.Rngs without either")


def check_features(model: str, z, num_features: int) -> None:
    """``ValueError`` naming the layer unless ``z`` has ``num_features`` entries on its last axis (the parameters'
    broadcast would fail with JAX's error, naming neither)."""
    if jnp.ndim(z) < 1 or jnp.shape(z)[-1] != num_features:
        raise ValueError(f"{model}: the input must have num_features={num_features} features on its last axis, "
                         f"(..., {num_features}), got shape {jnp.shape(z)}")
