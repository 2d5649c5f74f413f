"""What the processes of a jax.distributed run agree on: barriers and maxima; free on one process."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (e.g. before process 0 writes what the others wrote)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def max_over_processes(value: int) -> int:
    """The largest of every process's `value` (each process passes its own)."""
    if jax.process_count() == 1:
        return int(value)
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))
