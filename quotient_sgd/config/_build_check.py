"""The symmetry component names a configured model declares, found without computing anything."""

from __future__ import annotations

import functools

from ._settings import Settings


def input_spec(s: Settings) -> tuple[tuple[int, ...], int, bool]:
    """``(input shape without batch, output dim, tokens?)`` of the configured data, by arithmetic."""
    d = s.data
    if d.name == "teacher_student":
        return (d.din,), d.dout, False
    if d.name == "sparse_parity":
        return (d.n_bits,), 2, False
    if d.name == "modular_arithmetic":
        if s.model.name == "transformer":
            return (3,), d.p, True
        return (2 * d.p,), d.p, False
    return ((8, 8, 1) if s.model.name == "cnn" else (64,)), 10, False


def abstract_model(s: Settings):
    """The configured model built abstractly (``nnx.eval_shape``: shapes only, nothing computed).  A model
    constructor that refuses the settings (a ``ValueError`` that validation's own checks did not anticipate) is a
    :class:`~quotient_sgd.config.ConfigError` naming ``model.name`` and the model's reason, not a bare
    ``ValueError`` of the model."""
    from flax import nnx

    from ..runner._build import make_model
    from ._validate import ConfigError

    try:
        return nnx.eval_shape(lambda: make_model(s, nnx.Rngs(0)))
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"config.model.name = {s.model.name!r}: the model refuses these settings of config.model "
                          f"and config.data: {e}") from None


@functools.lru_cache(maxsize=64)
def _components(model_settings, data_settings) -> tuple[tuple[str, bool], ...]:
    s = Settings(model=model_settings, data=data_settings)
    model = abstract_model(s)
    return tuple((c.name, bool(c.continuous)) for c in model.symmetries().components)


def component_names(s: Settings) -> list[str]:
    """Names of the symmetry components the configured model declares (built abstractly: ``nnx.eval_shape``)."""
    return [name for name, _ in _components(s.model, s.data)]


def selected_components(s: Settings) -> list[tuple[str, bool]]:
    """``(name, continuous)`` of the components ``symmetry.components`` selects (as
    :func:`quotient_sgd.runner._build.select_group` does); empty when the symmetry is off."""
    if not s.symmetry.enabled:
        return []
    want = s.symmetry.components
    return [(name, cont) for name, cont in _components(s.model, s.data)
            if "all" in want or name in want or name.split("/")[0] in want]


@functools.lru_cache(maxsize=64)
def num_params(model_settings, data_settings) -> int:
    """The number of parameters of the configured model (built abstractly: ``nnx.eval_shape``)."""
    import jax
    from flax import nnx

    s = Settings(model=model_settings, data=data_settings)
    model = abstract_model(s)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return sum(x.size for x in jax.tree.leaves(params))


@functools.lru_cache(maxsize=64)
def _dimensions(model_settings, data_settings, symmetry_settings) -> tuple[int, int]:
    import jax
    from flax import nnx

    from ..runner._build import select_group

    s = Settings(model=model_settings, data=data_settings, symmetry=symmetry_settings)
    model = abstract_model(s)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    group = select_group(s, model.symmetries())
    tangents = jax.tree.leaves(jax.eval_shape(group.tangents, params)) if group is not None else []
    return sum(x.size for x in jax.tree.leaves(params)), (tangents[0].shape[0] if tangents else 0)


def parameter_dimensions(s: Settings) -> tuple[int, int]:
    """``(parameters, generators)``: the configured model's number of parameters and of the generators of the
    continuous symmetries ``symmetry.components`` selects (the vertical directions; the horizontal space has
    ``parameters - generators`` dimensions at a generic point), found abstractly (``nnx.eval_shape``)."""
    return _dimensions(s.model, s.data, s.symmetry)
