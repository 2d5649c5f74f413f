"""Which layers to copy when depth grows L -> L'. Each strategy returns the new stack as a list of
(source layer, is_new) pairs; a new layer is a copy of its source placed as given.

- stack:      the old stack, then copies of its first L'-L layers on top (stacking, repeated if L' > 2L)
- interleave: duplicate layers in place, each followed by its copy, from the bottom (L -> 2L copies every layer)
- even:       duplicate in place layers spread evenly over the stack
- distance:   rank layers by 1 - cos(h_in, h_out) on a calibration batch and duplicate, in place, the ones that
              change the hidden state least (prefer='low') or most ('high'). Tele-FLM used a distance-based rule
              whose exact form is unpublished (docs/paper.md): this is one plausible reading, measure it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Order = list[tuple[int, bool]]


def _in_place(num_layers: int, chosen: Sequence[int]) -> Order:
    counts = np.bincount(np.asarray(chosen, dtype=int), minlength=num_layers)
    order: Order = []
    for i in range(num_layers):
        order.append((i, False))
        order.extend([(i, True)] * int(counts[i]))
    return order


def evenly_spaced(num_layers: int, extra: int) -> list[int]:
    """`extra` source layers spread over the stack (a layer repeats when extra > num_layers)."""
    return [int(i * num_layers // extra) % num_layers for i in range(extra)] if extra else []


def select_layers(
    strategy: str, num_layers: int, target_layers: int, distances: Sequence[float] | None = None, prefer: str = "low"
) -> Order:
    extra = target_layers - num_layers
    if extra < 0:
        raise ValueError(f"cannot grow {num_layers} layers to {target_layers}")
    if strategy == "stack":
        return [(i, False) for i in range(num_layers)] + [(i % num_layers, True) for i in range(extra)]
    if strategy == "interleave":
        return _in_place(num_layers, [i % num_layers for i in range(extra)])
    if strategy == "even":
        return _in_place(num_layers, evenly_spaced(num_layers, extra))
    if strategy == "distance":
        if distances is None or len(distances) != num_layers:
            raise ValueError("the distance strategy needs one calibration distance per layer")
        ranked = np.argsort(np.asarray(distances) * (1 if prefer == "low" else -1), kind="stable")
        chosen = [int(ranked[i % num_layers]) for i in range(extra)]
        return _in_place(num_layers, chosen)
    raise ValueError(f"unknown layer strategy {strategy!r}")
