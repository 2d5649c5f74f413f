"""Crash injection for recovery tests: FLM_JAX_FAILPOINT=<name>:<step> kills the process with SIGKILL there.

Names used by the trainer: `mid_step` (a step has been dispatched and is computing) and `mid_save` (an asynchronous
checkpoint save has started and is still being written). Unset in normal runs: then this is a dictionary lookup.
"""

import os
import signal


def maybe_crash(name: str, step: int) -> None:
    if os.environ.get("FLM_JAX_FAILPOINT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
