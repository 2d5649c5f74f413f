"""Tables of parameter and optimizer-state trees for notebooks (notebooks/inspect_pytrees.ipynb): one row per leaf
with its path, shape, dtype, logical axes, sharding and L2 norm; and, for a growth, each leaf's old and new shape,
which of its entries are new and whether its old entries survived. Rows are plain dicts (pandas.DataFrame(rows)
makes a table of them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

Rows = list[dict[str, Any]]


def adam_moments(opt_state: Any) -> dict[str, Any]:
    """The Adam state in an optax state: {'count': step count, 'mu': first moments, 'nu': second moments} (mu and
    nu have the parameter tree's structure)."""
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState)):
        if isinstance(node, optax.ScaleByAdamState):
            return {"count": node.count, "mu": node.mu, "nu": node.nu}
    raise ValueError("the optimizer state holds no optax.ScaleByAdamState")


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _specs(tree: Any) -> list[PartitionSpec]:
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, PartitionSpec))


def sharding_text(x: Any) -> str:
    """A short description of where an array (or a ShapeDtypeStruct, or a sharding) lives."""
    sharding = x if isinstance(x, jax.sharding.Sharding) else getattr(x, "sharding", None)
    if sharding is None:
        return "host (numpy)"
    if isinstance(sharding, NamedSharding):
        return f"{tuple(sharding.spec)} over mesh {dict(sharding.mesh.shape)}"
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return f"single device {next(iter(sharding.device_set))}"
    return str(sharding)


def leaf_table(tree: Any, logical_axes: Any = None) -> Rows:
    """One row per array leaf: path, shape, dtype, logical axes (from a PartitionSpec tree of the same structure,
    e.g. `checkpoint_reader.param_logical_axes(config)`; optional), sharding and L2 norm."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    axes = _specs(logical_axes) if logical_axes is not None else [None] * len(leaves)
    if len(axes) != len(leaves):
        raise ValueError("tree and logical_axes must have the same structure")
    return [
        {
            "path": _path(path),
            "shape": tuple(x.shape),
            "dtype": str(x.dtype),
            "logical_axes": None if spec is None else tuple(spec),
            "sharding": sharding_text(x),
            "l2_norm": float(np.linalg.norm(np.asarray(x, np.float64).ravel())),
        }
        for (path, x), spec in zip(leaves, axes)
    ]


def _is_layer_stacked(path) -> bool:
    return any(getattr(k, "key", None) == "layers" for k in path)


def _kept_layers(order: Sequence[tuple[int, bool]]) -> list[int]:
    """For a growth's layer order ((source layer, is new) per grown layer): the grown index of each old layer."""
    where = {int(src): j for j, (src, new) in enumerate(order) if not new}
    return [where[i] for i in range(len(where))]


def _old_index(path, old_shape: Sequence[int], order: Sequence[tuple[int, bool]] | None) -> tuple:
    """Where a grown leaf holds the old leaf's entries, as a numpy index: growth appends new entries at the end of
    each axis (duplication puts its first copy there), and a layer-stacked leaf (axis 0) keeps old layer i at the
    grown layer `order` says."""
    if not old_shape:
        return ()
    stacked = order is not None and _is_layer_stacked(path)
    head = np.asarray(_kept_layers(order)) if stacked else slice(0, old_shape[0])
    return (head, *(slice(0, n) for n in old_shape[1:]))


def _compare(part: np.ndarray, old: np.ndarray) -> str:
    """'kept' (bit-identical), 'scaled xC' (one factor for the whole leaf, e.g. μP's readout) or 'changed'."""
    part, old = part.astype(np.float64), old.astype(np.float64)
    if np.array_equal(part, old):
        return "kept"
    denominator = float(np.vdot(old, old))
    c = float(np.vdot(part, old)) / denominator if denominator else 0.0
    if denominator and np.allclose(part, c * old, rtol=1e-5, atol=1e-12):
        return f"scaled x{c:.4g}"
    return "changed"


def _check_same_structure(*trees: Any) -> None:
    if len({jax.tree_util.tree_structure(t) for t in trees}) != 1:
        raise ValueError("the trees must have the same structure")


def growth_table(old: Any, new: Any, order: Sequence[tuple[int, bool]] | None = None, logical_axes: Any = None) -> Rows:
    """One row per leaf of a grown tree (parameters, or Adam's mu or nu) against the tree it grew from: path, old
    and new shape, which entries are new ('embed[64:128]', 'layers 1 (copy of 0)'; logical axis names from the
    grown tree's PartitionSpec tree when given) and what became of the old entries ('kept', 'scaled xC' or
    'changed'). `order` is the growth's layer order (GrowthResult.order); None: depth did not change."""
    _check_same_structure(old, new)
    new_leaves = jax.tree_util.tree_leaves(new)
    axes = _specs(logical_axes) if logical_axes is not None else [None] * len(new_leaves)
    rows = []
    for (path, a), b, spec in zip(jax.tree_util.tree_leaves_with_path(old), new_leaves, axes):
        stacked = order is not None and _is_layer_stacked(path)
        marks = [f"layers {j} (copy of {src})" for j, (src, is_new) in enumerate(order) if is_new] if stacked else []
        for dim, (n, m) in enumerate(zip(a.shape, b.shape)):
            if m > n and not (stacked and dim == 0):
                name = spec[dim] if spec is not None and dim < len(spec) and spec[dim] else f"axis {dim}"
                marks.append(f"{name}[{n}:{m}]")
        rows.append(
            {
                "path": _path(path),
                "old_shape": tuple(a.shape),
                "new_shape": tuple(b.shape),
                "new_entries": ", ".join(marks) or "-",
                "old_entries": _compare(np.asarray(b)[_old_index(path, a.shape, order)], np.asarray(a)),
            }
        )
    return rows


def growth_masks(old: Any, new: Any, order: Sequence[tuple[int, bool]] | None = None) -> Any:
    """The grown tree's structure with a boolean array per leaf, True where the growth added the entry (to draw
    next to the grown arrays)."""
    _check_same_structure(old, new)

    def mask(path, a, b):
        m = np.ones(b.shape, bool)
        m[_old_index(path, a.shape, order)] = False
        return m

    return jax.tree_util.tree_map_with_path(mask, old, new)
