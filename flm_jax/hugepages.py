"""Transparent huge pages for the heap of the command lines, on Linux with glibc.

XLA's CPU runtime allocates the buffers of every execution afresh, and glibc serves blocks that large with mmap, so
each training step faults in hundreds of MiB of zeroed 4 KiB pages and unmaps them again: over 100 steps of the
tiny pretraining, 9.1 million page faults and 17% of the CPU time in the kernel. glibc's tunable
`glibc.malloc.hugetlb=1` advises those mappings for transparent huge pages (2 MiB), where the kernel's THP mode is
`madvise`; the kernel time falls to about 7% and steps run ~20% faster (docs/performance.md). Tunables are read
when a process starts, so `python -m flm_jax.<tool>` started without it re-executes itself once with it set, before
anything else is imported. Setting the tunable yourself (`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` turns it off)
is respected.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def wanted() -> bool:
    """Whether this process would gain from the tunable: Linux, glibc, THP on madvise, and the tunable unset."""
    if sys.platform != "linux" or TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        with open(THP_MODE_FILE) as f:
            return "[madvise]" in f.read()
    except (OSError, ValueError):
        return False


def environment() -> dict[str, str]:
    """os.environ with the tunable added (for a child process), or unchanged where it is not wanted."""
    if not wanted():
        return dict(os.environ)
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), f"{TUNABLE}=1"]))
    return {**os.environ, "GLIBC_TUNABLES": tunables}


def reexec_command_line() -> None:
    """Re-execute `python -m flm_jax.<tool>` with the tunable. Python sets sys.argv[0] to '-m' while it imports
    the package of a -m module, so imports from a program, a notebook or the tests are left alone."""
    if sys.argv[:1] != ["-m"] or not wanted():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment())


if __name__ == "__main__":  # `python -m flm_jax.hugepages`: the tunables a command line runs with
    print(os.environ.get("GLIBC_TUNABLES", ""))
