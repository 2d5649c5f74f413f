"""Every test process sees 8 fake CPU devices (set before JAX starts), so sharding runs anywhere, and the session
shares one persistent compilation cache with the subprocesses its tests start (each `python -m flm_jax.train` of a
test compiles the steps an earlier one did: the cache saves about 5 s of every start), and XLA compiles at LLVM -O0,
which cut the suite's CPU time by about an eighth.

The suite runs on two pytest-xdist workers, one test module per worker at a time (pyproject.toml: `-n 2 --dist
loadscope`), the slowest modules first so that no long one is left running alone at the end; `-n 0` runs it in one
process.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    # The tests' models are tiny, so XLA's compiles are much of their CPU time, and LLVM at -O0 compiles faster
    # (docs/performance.md). Its float results can differ from -O2's in the last bits, so a subprocess whose
    # results a test compares bitwise with its own keeps these flags (tests.helpers.xla_flags).
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flm_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

import gin  # noqa: E402

# Modules by their time in a 2-worker run (docs/performance.md), slowest first; the rest follow in file order.
SLOWEST_FIRST = (
    "test_train",
    "test_benchmarks",
    "test_growth",
    "test_preemption",
    "test_multihost",
    "test_growth_harness",
    "test_tpu_compile",
    "test_data",
    "test_export",
    "test_finetune",
    "test_remote_paths",
    "test_notebook",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.stem
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(autouse=True)
def _clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
