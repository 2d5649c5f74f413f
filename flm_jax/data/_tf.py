"""Imports TensorFlow for the input pipeline only: quiet logs, and no GPU, so it never competes with JAX."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF's devices were already initialised by someone else; nothing more we can do.
    pass

__all__ = ["tf"]
