"""Where training metrics go: WORKDIR/metrics.jsonl (one JSON object per logged step), TensorBoard, stdout."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import jax

from flm_jax.paths import PathLike, as_path


class MetricWriter:
    """Only process 0 writes; every process may call it."""

    def __init__(self, workdir: PathLike, total_steps: int, start_step: int = 0):
        self.workdir = as_path(workdir)
        self.total_steps, self.start_step = total_steps, start_step
        self.active = jax.process_index() == 0
        self.started = time.time()
        self._tb = None
        if self.active:
            from flm_jax.data._tf import tf  # TensorFlow without a GPU (it must not compete with JAX)

            self._summary = tf.summary
            self._tb = tf.summary.create_file_writer(str(self.workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with (self.workdir / "metrics.jsonl").open("a") as f:  # on a bucket, TensorFlow's GCS file system appends
            f.write(json.dumps(record) + "\n")
        with self._tb.as_default(step=step):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._summary.scalar(key, value, step=step)
        self._tb.flush()

    def progress(self, step: int, text: str) -> None:
        if not self.active:
            return
        elapsed = time.time() - self.started
        done = (step - self.start_step) / max(self.total_steps - self.start_step, 1)
        eta = elapsed / done * (1 - done) if done > 0 else float("nan")
        print(f"[{step:>6}/{self.total_steps}] {text} | elapsed {_duration(elapsed)} eta {_duration(eta)}", flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    return value


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
