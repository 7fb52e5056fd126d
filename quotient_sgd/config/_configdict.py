"""The ``ConfigDict`` that :func:`~quotient_sgd.config.default_config` returns: ``ml_collections``' own, except
that a bool assigned to a numeric key is refused.

``ml_collections`` converts an ``int`` assigned to a ``float`` key to ``float``, and a ``bool`` is an ``int``:
``config.optim.lr = True`` in a config file stored ``1.0``, which validation could no longer tell from a number.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Any, Iterator

import ml_collections
import numpy as np


def _numeric_kind(field: Any) -> str | None:
    """``"a float"`` / ``"an int"`` for a field holding a (non-bool) number, else ``None``."""
    if isinstance(field, ml_collections.FieldReference):
        kind = field.get_type()
        return {float: "a float", int: "an int"}.get(kind)
    if isinstance(field, (bool, np.bool_)):
        return None
    if isinstance(field, float):
        return "a float"
    if isinstance(field, int):
        return "an int"
    return None


def array_value(value: Any) -> Any:
    """A NumPy scalar or a 0-d array (NumPy or JAX: ``np.int64(16)``, ``jnp.float32(0.1)``, ``jnp.bool_(False)``)
    as the Python value it holds (``value.item()``), a 1-D array (``np.logspace(-3, -1, 4)``,
    ``jnp.arange(4)``) as the tuple of those; anything else as it is.  Recognised by its ``shape``, ``dtype`` and
    ``item`` (JAX is not imported for this)."""
    if isinstance(value, np.generic):
        return value.item()
    shape = getattr(value, "shape", None)
    if (isinstance(shape, tuple) and hasattr(value, "dtype") and hasattr(value, "item")
            and not isinstance(value, (str, bytes))):
        if shape == ():
            return value.item()
        if len(shape) == 1 and hasattr(value, "tolist"):
            return tuple(value.tolist())
    return value


def int_text(value: int) -> str:
    """``repr(value)`` of an integer, or ``"an integer of about N digits"`` for one too long for Python to print
    (more than ``sys.get_int_max_str_digits()`` digits, 4300 by default: its ``repr`` raises ``ValueError``)."""
    try:
        return repr(value)
    except ValueError:
        return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"


def float_overflow(value: Any) -> str | None:
    """Why the number ``value`` cannot be a float key's value when ``float(value)`` overflows (an integer beyond
    about 1.8e308, e.g. ``10**400``: ``ml_collections`` and validation failed in a bare ``OverflowError: int too
    large to convert to float``, naming no key), else ``None``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    try:
        float(value)
    except OverflowError:
        shown = int_text(value) if isinstance(value, numbers.Integral) else type(value).__name__
        return (f"{shown[:40] + '...' if len(shown) > 40 else shown} is beyond the range of a float (|x| <= "
                f"1.8e308; the programs compute in float32, |x| <= 3.4e38)")
    return None


def _plain_scalar(value: Any, field_type: Any) -> Any:
    """A NumPy scalar or 0-d array, NumPy's or JAX's (``np.int64(16)``, ``np.float32(0.1)``, ``jnp.float32(0.1)``,
    ``np.bool_(False)``) assigned to a key holding a Python ``int``, ``float`` or ``bool``, as the Python value it
    holds (``value.item()``), and a 1-D array assigned to a key holding a tuple as the tuple of its values
    (:func:`array_value`); anything else as it is.  ``ml_collections`` checks the value's type: ``np.int64(16)``
    from ``np.arange`` was refused for ``data.batch_size`` ("expected an int, got int64"), ``np.bool_(False)`` for
    ``logging.plots`` ("expected a bool, got bool"), ``jnp.float32(0.1)`` for ``optim.lr`` and
    ``np.logspace(-3, -1, 4)`` for ``sweep.lr``, where validation reads the values they hold."""
    if field_type in (int, float, bool, tuple):
        out = array_value(value)
        if field_type is tuple or not isinstance(out, tuple):
            return out
    return value


class StrictConfigDict(ml_collections.ConfigDict):
    """A type-safe ``ConfigDict`` that refuses a ``bool`` (Python or NumPy) for a key holding a float or an int,
    with a ``TypeError`` naming the key, the value and what is allowed (``ml_collections`` would store
    ``True`` as ``1.0`` in a float key), and reads a NumPy scalar assigned to a number or bool key as the Python
    value it holds (:func:`_plain_scalar`; a NumPy float for an ``int`` key is still refused, as a Python float
    is).  A section replaced by an ``ml_collections.ConfigDict`` (or a dict, or a ``FrozenConfigDict``) becomes a
    ``StrictConfigDict`` holding its keys.  Everything else is ``ml_collections.ConfigDict``'s behaviour."""

    def __setitem__(self, key, value):
        if (isinstance(value, ml_collections.ConfigDict) and not isinstance(value, StrictConfigDict)
                and isinstance(key, str) and isinstance(self._fields.get(key), StrictConfigDict)):
            # a section given as ml_collections' own ConfigDict (or a FrozenConfigDict): its keys become a
            # StrictConfigDict section, as those of a dict do (type safety refused the other class outright)
            value = StrictConfigDict(value, type_safe=self.is_type_safe)
        if isinstance(key, str) and key in self._fields and not isinstance(self._fields[key],
                                                                          ml_collections.FieldReference):
            # (first: a JAX bool becomes a bool, refused below for a number key)
            value = _plain_scalar(value, type(self._fields[key]))
        if isinstance(key, str) and key in self._fields and _numeric_kind(self._fields[key]) == "a float":
            too_large = float_overflow(value)
            if too_large is not None:
                raise TypeError(f"Could not override field {key!r}: {too_large}; write a number within float32's "
                                f"range")
        if isinstance(value, (bool, np.bool_)) and isinstance(key, str) and key in self._fields:
            kind = _numeric_kind(self._fields[key])
            if kind is not None:
                raise TypeError(f"Could not override field {key!r}: {value!r} is a bool, and {key!r} holds {kind}; "
                                f"write a number (e.g. {1.0 if kind == 'a float' else 1}), not True/False")
        super().__setitem__(key, value)


def strict_config_dict(values: dict) -> StrictConfigDict:
    """``values`` (a nested dict) as a :class:`StrictConfigDict` whose sections are :class:`StrictConfigDict`s."""
    out = StrictConfigDict()
    for k, v in values.items():
        out[k] = strict_config_dict(v) if isinstance(v, dict) else v
    return out


_CAST_LOCK = threading.RLock()


@contextlib.contextmanager
def refuse_bool_numbers() -> Iterator[None]:
    """While the block runs, every ``ml_collections.ConfigDict`` (the plain class too, type-safe or not) refuses a
    ``bool`` (Python or NumPy) assigned to a key holding a float or an int, with a ``TypeError`` naming the key, the
    value and what is allowed, and a NumPy scalar assigned to a number or bool key is read as the Python value it
    holds (:func:`_plain_scalar`).

    ``ml_collections`` converts the value at assignment (``_safe_cast``: an ``int`` assigned to a ``float`` key
    becomes a ``float``, and ``True`` is an ``int``), so a config file building its config from
    ``ml_collections.ConfigDict`` and writing ``config.optim.lr = True`` handed validation ``1.0``: the original
    value is gone before validation reads it.  :func:`~quotient_sgd.config.load_config` and the CLI run the
    config file inside this block.  Where ``ml_collections`` has no ``_safe_cast`` (another version), the block
    changes nothing."""
    from ml_collections.config_dict import config_dict as _cd

    original = getattr(_cd, "_safe_cast", None)
    if original is None:
        yield
        return

    def safe_cast(value, field_type, type_safe=False):
        value = _plain_scalar(value, field_type)
        too_large = float_overflow(value) if field_type is float else None
        if too_large is not None:  # (ml_collections names the key: "Could not override field 'lr' ...")
            raise TypeError(f"{too_large}; write a number within float32's range")
        if isinstance(value, (bool, np.bool_)) and field_type in (float, int):
            kind = "a float" if field_type is float else "an int"
            raise TypeError(f"{value!r} is a bool, and the key holds {kind}; write a number (e.g. "
                            f"{1.0 if field_type is float else 1}), not True/False")
        return original(value, field_type, type_safe)

    with _CAST_LOCK:
        _cd._safe_cast = safe_cast
        try:
            yield
        finally:
            _cd._safe_cast = original
