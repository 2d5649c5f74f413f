"""T5X-style command lines shared by every entry point.

    python -m flm_jax.<tool> --gin_file=A.gin [--gin_file=B.gin ...] [--gin.BINDING=VALUE ...] [tool flags]

`--gin.TeleFLMConfig.hidden_size=512` becomes the gin binding `TeleFLMConfig.hidden_size = 512`. gin files are
looked up relative to the working directory, then to the repository root, so `gin/models/52b.gin` works anywhere.
Multi-host runs add `--coordinator_address/--num_processes/--process_id` (or `--multihost` on a TPU pod, where
jax.distributed finds its peers itself).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import gin

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_PREFIX = "gin."
gin.add_config_file_search_path(str(REPO_ROOT))  # `include 'gin/models/x.gin'` works from any directory


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                epilog="Gin bindings: --gin.Name.field=VALUE (repeatable).")
    p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable, applied in order)")
    return p


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, ...)")
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags, split off --gin.X=Y bindings, and apply every gin file and binding."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--" + GIN_PREFIX):
            key, sep, value = arg[len("--" + GIN_PREFIX):].partition("=")
            if not sep:
                p.error(f"gin binding {arg!r} needs a value: --gin.{key}=VALUE")
            bindings.append(f"{key} = {value}")
        else:
            rest.append(arg)
    args = p.parse_args(rest)
    args.gin_bindings = bindings
    load_gin(args.gin_file, bindings)
    return args


def resolve_gin_file(name: str) -> str:
    for candidate in (Path(name), REPO_ROOT / name):
        if candidate.is_file():
            return str(candidate)
    raise SystemExit(f"gin file {name!r} not found (looked in {os.getcwd()} and {REPO_ROOT}). "
                     "Pass a path such as gin/models/52b.gin.")


def load_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
    # Register every configurable a gin file may bind before parsing (model, mesh, optimizer, training, data
    # registration, growth); the data package imports TensorFlow (~4 s).
    from flm_jax import growth, hardware, optim, train_config  # noqa: F401

    gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in files], list(bindings),
                                        finalize_config=False, skip_unknown=False)


def init_distributed(args: argparse.Namespace) -> None:
    """Start jax.distributed when the flags ask for it (before any other JAX call)."""
    import jax

    if args.coordinator_address or args.num_processes:
        if None in (args.coordinator_address, args.num_processes, args.process_id):
            raise SystemExit("--coordinator_address, --num_processes and --process_id go together.")
        jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif args.multihost:
        jax.distributed.initialize()
