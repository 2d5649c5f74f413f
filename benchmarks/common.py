"""What the benchmark scripts share: running one measurement in a fresh process, the float32 matmul peak, and the
results file.

Each measurement runs in its own Python process (`run_worker`), so JAX, PyTorch and TensorFlow never share thread
pools or memory, and a worker's start-up never leaks into another's timing. Workers print one JSON line last.
Nothing else should run on the machine while a benchmark measures: these are ratios measured side by side, and
another job on a 2-core host changes both sides unequally.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "

# --smoke: every script's seconds-long run on a toy model (tests/test_benchmarks.py); its figures mean nothing.
SMOKE_MODEL_BINDINGS = [
    "TeleFLMConfig.hidden_size = 64",
    "TeleFLMConfig.intermediate_size = 128",
    "TeleFLMConfig.num_hidden_layers = 2",
    "TeleFLMConfig.num_attention_heads = 2",
    "TeleFLMConfig.num_key_value_heads = 2",
]
SMOKE_BINDINGS = [*SMOKE_MODEL_BINDINGS, "TrainConfig.batch_size = 2", "TrainConfig.seq_len = 64"]


# --smoke runs call their workers inside the calling process (`run_workers_in_process`): their figures mean nothing
# anyway, and a fresh process per worker spent seconds importing JAX, TensorFlow or PyTorch each time.
_in_process = False


def run_workers_in_process() -> None:
    """From here on, `run_worker` calls a worker's `main` in this process unless the worker needs its own
    environment (for --smoke runs only: the workers then share thread pools, caches and memory)."""
    global _in_process
    _in_process = True


def run_worker(module: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 3600) -> dict:
    """Run `python -m module --worker ...args` from the repository root and return the dict its worker printed
    (`emit`). Its other output passes through, so long work shows progress. Every worker, flm_jax's or another
    library's, runs with the heap settings that `python -m flm_jax.<tool>` gives itself (flm_jax/hugepages.py)."""
    if _in_process and env is None:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            importlib.import_module(module).main(args)
        result = _relay(printed.getvalue().splitlines(keepends=True))
        if result is None:
            raise RuntimeError(f"benchmark worker printed no result: {module} {' '.join(args)}")
        return result

    from flm_jax import hugepages

    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env={**hugepages.environment(), **(env or {})}, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    result = _relay(proc.stdout)
    if proc.wait(timeout) != 0 or result is None:
        raise RuntimeError(f"benchmark worker failed (exit {proc.returncode}): {' '.join(cmd)}")
    return result


def _relay(lines) -> dict | None:
    """Print a worker's lines, indented, as they come; the dict of its result line."""
    result = None
    for line in lines:
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
        else:
            print("    " + line, end="", flush=True)
    return result


def emit(result: dict[str, Any]) -> None:
    """A worker's last line: its measurements for `run_worker`."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def best_of(fn, repeats: int) -> float:
    """The shortest of `repeats` timed calls of fn (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def jax_matmul_peak(n: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of one n x n matmul in JAX on the default device, the best of `repeats` (compiled first): in `dtype`,
    accumulated in float32 (bfloat16 as the model's matmuls run it)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    return 2 * n**3 / best_of(lambda: matmul(a, b).block_until_ready(), repeats)


def torch_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """The same matmul in PyTorch, on its configured threads."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / best_of(lambda: a @ b, repeats)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "host": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def write_results(path: str, results: dict[str, Any]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"Wrote {out}.", flush=True)
