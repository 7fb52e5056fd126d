"""Addressing parameter leaves by path.

A *path* is a tuple of dictionary keys / list indices, e.g. ``("layers", 0, "kernel")``: the key path of a leaf
of an ``nnx.State`` (from ``nnx.split(model, nnx.Param, ...)``) or of a plain nested dict, with the trailing
``.value`` attribute of NNX variables dropped.  Group actions name the leaves they act on by such paths.
"""

from __future__ import annotations

from typing import Any, Hashable

import jax

Path = tuple[Hashable, ...]


def _key_entry(k) -> Hashable | None:
    if isinstance(k, jax.tree_util.DictKey):
        return k.key
    if isinstance(k, jax.tree_util.SequenceKey):
        return k.idx
    if isinstance(k, jax.tree_util.GetAttrKey):
        return None if k.name == "value" else k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return k.key
    return str(k)


def path_of(keypath) -> Path:
    """Convert a JAX key path into a plain tuple path (NNX ``.value`` dropped)."""
    return tuple(e for e in (_key_entry(k) for k in keypath) if e is not None)


def flatten(tree) -> tuple[dict[Path, Any], Any]:
    """``tree -> ({path: leaf}, treedef)``; leaf order is the tree's flatten order."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {path_of(kp): leaf for kp, leaf in leaves}, treedef


def unflatten(flat: dict[Path, Any], treedef) -> Any:
    """Inverse of :func:`flatten` (``flat`` must keep the insertion order of :func:`flatten`)."""
    return jax.tree_util.tree_unflatten(treedef, list(flat.values()))


def get(tree, path: Path):
    """The leaf of ``tree`` at ``path``; ``KeyError`` naming the path and the available ones if absent."""
    flat, _ = flatten(tree)
    try:
        return flat[tuple(path)]
    except KeyError:
        raise KeyError(f"no parameter at path {tuple(path)!r}; available paths: {list(flat)}") from None


def paths(tree) -> list[Path]:
    """All leaf paths of ``tree``."""
    return list(flatten(tree)[0])


def widen(tree):
    """``tree`` with its floating leaves narrower than float32 (bfloat16, float16) cast to float32, every other leaf
    unchanged (the same tree when there are none).  The symmetry groups' solves (``eigh``, QR, SVD: XLA:CPU has no
    bfloat16 kernels for them) and the quotient observables run in float32 on low-precision parameters."""
    import jax.numpy as jnp

    def up(x):
        dt = getattr(x, "dtype", None)
        if dt is not None and jnp.issubdtype(dt, jnp.floating) and jnp.finfo(dt).bits < 32:
            return x.astype(jnp.float32)
        return x

    return jax.tree.map(up, tree)


def float_dtype(tree):
    """The dtype that sums over all of ``tree``'s leaves come out in: the common dtype of its floating leaves by
    JAX's standard promotion (float64 for float32 leaves beside float64 ones, whatever
    ``jax_numpy_dtype_promotion`` is), else the first leaf's dtype.  Scalars recorded over a whole pytree (its
    norms, inner products) are held in it: the first leaf's dtype alone was float32 for a float32 block ahead of
    float64 ones, while those sums were float64."""
    import jax.numpy as jnp

    leaves = jax.tree.leaves(tree)
    floats = [x for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not floats:
        return jnp.result_type(leaves[0])
    with jax.numpy_dtype_promotion("standard"):  # (a Python float among them is weakly typed: it defers)
        return jnp.result_type(*floats)
