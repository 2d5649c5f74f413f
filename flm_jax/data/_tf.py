"""Imports TensorFlow for the input pipeline only: quiet logs, and no GPU, so it never competes with JAX.

TensorFlow's C++ start-up writes to file descriptor 2 before its log level applies: on a host without CUDA it
reports the missing driver and a failed cuInit on every run, probing for GPUs that this pipeline never uses. The
import and the GPU hiding run with descriptor 2 captured, and every captured line but those probe reports is
written back, so real errors still show.
"""

import contextlib
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The start-up reports of a host without CUDA, and absl's note that they came before its logging began.
_PROBE_NOISE = re.compile(
    r"cudart_stub\.cc|failed call to cuInit|oneDNN custom operations are on|"
    r"All log messages before absl::InitializeLog\(\) is called|Unable to register cu(DNN|FFT|BLAS) factory|"
    r"computation placer already registered|This TensorFlow binary is optimized to use available CPU"
)


def _import_tensorflow():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:  # TF's devices were already initialised by someone else; nothing more we can do.
                pass
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [
                line for line in captured.read().decode(errors="replace").splitlines() if not _PROBE_NOISE.search(line)
            ]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)
    return tf


tf = _import_tensorflow()


def plain_graph_fn(fn):
    """`fn` (a tf.data map, filter or reduce function of this package) traced as written, not rewritten by
    AutoGraph: none of them branches or loops in Python on a tensor, and skipping AutoGraph's source-to-source
    conversion of them took the pretraining pipeline's build from 3.85 s to 3.43 s (one run each). seqio's own
    functions are still converted (its packing needs it)."""
    return tf.autograph.experimental.do_not_convert(fn)


@contextlib.contextmanager
def autograph_off():
    """tf.data functions traced inside are not converted by AutoGraph, seqio's included. For the preprocessing of
    seqio tasks (tokenizing, rekeying), whose functions have no Python control flow on tensors: converting them was
    ~0.9 s of the ~3.2 s that building a pretraining pipeline took. A function that did need the conversion would
    fail to trace, not run differently. seqio's packing needs it, so the feature converter runs outside."""
    from tensorflow.python.autograph.core import ag_ctx  # TF has no public switch for it

    with ag_ctx.ControlStatusCtx(status=ag_ctx.Status.DISABLED):
        yield


__all__ = ["autograph_off", "plain_graph_fn", "tf"]
