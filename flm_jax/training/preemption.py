"""Preemption: SIGTERM asks a run to stop after its current step with a checkpoint, then exit 0.

One process catches SIGTERM itself. Several processes (jax.distributed) must stop at the same step, which the
signal alone cannot promise (it reaches hosts at different steps): there jax's preemption service, which installs
its own SIGTERM handler, agrees on a sync point, and orbax's `reached_preemption(step)` reports it.
"""

from __future__ import annotations

import signal
import threading

import jax
import orbax.checkpoint as ocp


class PreemptionWatch:
    """`reached(step)`: True once this run has been told to stop (on every process at the same step)."""

    def __init__(self, manager: ocp.CheckpointManager):
        self._manager, self._signalled, self._previous = manager, False, None
        self._local = jax.process_count() == 1
        if self._local and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True

    def reached(self, step: int) -> bool:
        return self._signalled if self._local else self._manager.reached_preemption(step)

    def close(self) -> None:
        """Give SIGTERM back its previous handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
