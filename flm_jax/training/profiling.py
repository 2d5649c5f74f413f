"""A jax.profiler trace of a few training steps (TrainConfig.profile_steps), for TensorBoard's profile tab."""

from __future__ import annotations

import jax

from flm_jax.paths import PathLike


class StepTrace:
    """Traces steps first..last (1-based, inclusive) into `logdir`; `close` ends a trace the run left open."""

    def __init__(self, steps: tuple[int, int] | None, logdir: PathLike):
        self.first, self.last = steps or (0, -1)
        self.logdir, self.active = str(logdir), False

    def before(self, step: int) -> None:
        """Called before step `step` runs."""
        if step == self.first and jax.process_index() == 0:
            jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        """Called once step `step` is dispatched, with its outputs (waited for, so the trace holds the step)."""
        if step == self.last:
            self.close(outputs)

    def close(self, outputs=None) -> None:
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            print(f"Profile of steps {self.first}-{self.last} written to {self.logdir}.", flush=True)
