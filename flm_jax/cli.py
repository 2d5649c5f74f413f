"""T5X-style command lines shared by every entry point, and the one place where gin becomes config objects.

    python -m flm_jax.<tool> --gin_file=A.gin [--gin_file=B.gin ...] [--gin.BINDING=VALUE ...] [tool flags]

`--gin.TeleFLMConfig.hidden_size=512` becomes the gin binding `TeleFLMConfig.hidden_size = 512`. gin files are
looked up relative to the working directory, then to the repository root, so `gin/models/52b.gin` works anywhere.
Multi-host runs add `--coordinator_address/--num_processes/--process_id` (or `--multihost` on a TPU pod, where
jax.distributed finds its peers itself); then only process 0 prints.

Every tool's main runs under `run_tool`: a user error (a bad config value, a missing file, a refused operation)
prints one line naming the problem and the fix and exits with status 2; anything else is a bug and keeps its
traceback. Library code never reads gin: an entry point calls `configured(...)` for the objects it needs and
passes them down.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
import sys
import tokenize
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import gin
from flm_jax.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
GIN_PREFIX = "gin."
USER_ERROR_EXIT = 2
# Errors that are the user's to fix (ConfigError covers config values, refused growths, bad Hugging Face folders).
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError)
# The gin configurables of flm_jax.data (task registration). Tools that never read data skip their bindings instead
# of importing TensorFlow to register them; tests check this list against flm_jax.data.tasks.
DATA_CONFIGURABLES = (
    "register_chat_task",
    "register_text_task",
    "register_jsonl_task",
    "register_tfds_task",
    "register_function_task",
    "register_mixture",
    "register_default_tasks",
    "register_tasks",
)
gin.add_config_file_search_path(str(REPO_ROOT))  # `include 'gin/models/x.gin'` works from any directory

T = TypeVar("T")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog="Gin bindings: --gin.Name.field=VALUE (repeatable).")
    p.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable, applied in order)")
    return p


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument(
        "--multihost",
        action="store_true",
        help="call jax.distributed.initialize() with auto-detection (TPU pods, SLURM, ...)",
    )
    g.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)


def parse(
    p: argparse.ArgumentParser, argv: Sequence[str] | None = None, *, reads_data: bool = True, load: bool = True
) -> argparse.Namespace:
    """Parse flags, split off --gin.X=Y bindings, and (with load=True) apply every gin file and binding.
    `reads_data=False`: the tool never reads data, so flm_jax.data (and TensorFlow) is not imported."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--" + GIN_PREFIX):
            key, sep, value = arg[len("--" + GIN_PREFIX) :].partition("=")
            if not sep:
                p.error(f"gin binding {arg!r} needs a value: --gin.{key}=VALUE")
            bindings.append(f"{key} = {value}")
        else:
            rest.append(arg)
    args = p.parse_args(rest)
    args.gin_bindings = bindings
    if load:
        load_gin(args.gin_file, bindings, reads_data=reads_data)
    return args


def boolean(text: str) -> bool:
    """An argparse type for true/false flags (--kv_cache=false)."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def resolve_gin_file(name: str) -> str:
    """The absolute path of gin file `name`, looked up in the working directory, then the repository root."""
    for candidate in (Path(name).absolute(), REPO_ROOT / name):
        if candidate.is_file():
            return str(candidate)
    looked = " and ".join(dict.fromkeys((os.getcwd(), str(REPO_ROOT))))  # once when they are the same
    raise FileNotFoundError(
        f"gin file {name!r} not found (looked in {looked}). Pass a path such as gin/models/52b.gin."
    )


def load_gin(
    files: Sequence[str], bindings: Sequence[str], *, reads_data: bool = True, config_text: str | None = None
) -> None:
    """Apply `config_text` (a workdir's config.gin), then the gin files in order, then the bindings."""
    # Register every configurable a gin file may bind: model, mesh, optimizer, training, growth, schedule,
    # hardware, and (for tools that read data) task registration, whose package imports TensorFlow (~4 s).
    from flm_jax import config, hardware, optim, partitioning  # noqa: F401
    from flm_jax.growth import schedule, spec  # noqa: F401
    from flm_jax.training import config as train_config  # noqa: F401

    if reads_data:
        import flm_jax.data  # noqa: F401
    skip = [] if reads_data else list(DATA_CONFIGURABLES)
    paths = [resolve_gin_file(f) for f in files]
    where = "the workdir's config.gin"
    try:
        if config_text is not None:
            gin.parse_config(config_text, skip_unknown=skip)
        for name, path in zip(files, paths):
            where = name
            gin.parse_config_file(path, skip_unknown=skip)
        for binding in bindings:  # one at a time, so that an error names its binding
            where = "--gin." + binding.replace(" = ", "=", 1)
            gin.parse_config(binding, skip_unknown=skip)
    # An unknown configurable or parameter, a malformed value, a missing include.
    except (ValueError, SyntaxError, tokenize.TokenError, OSError) as e:
        text = e.args[0] if isinstance(e, tokenize.TokenError) else str(e)
        if where.startswith("--gin."):  # gin's own location lines only repeat the binding
            text = text.splitlines()[0]
        if text.startswith("malformed node or string"):  # ast.literal_eval's words for an unquoted string
            text = "the value is not a Python literal."
        raise ConfigError(f"gin ({where}): {text} {gin_fix(text)}") from None


def gin_fix(message: str) -> str:
    """How to fix the gin error `message`."""
    parameter = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message)
    if parameter:
        name, wrong = parameter.groups()
        known = [p for p in inspect.signature(gin.get_configurable(name)).parameters if p not in ("args", "kwargs")]
        close = difflib.get_close_matches(wrong, known, n=1)
        return (f"Did you mean {close[0]!r}? " if close else "") + f"{name} takes {', '.join(known)}."
    if "No configurable matching" in message:
        return (
            "Check the spelling: gin binds the classes and functions flm_jax registers, such as TeleFLMConfig, "
            "MeshLayout, OptimizerConfig, TrainConfig and GrowthSpec."
        )
    if "Unable to open file" in message:
        return "Fix the include's path (relative to the working directory or the repository root)."
    return (
        "Write the value as a Python literal: quote strings (--gin.TrainConfig.mixture=\"'flm_default'\"), "
        "numbers as 1e-3, tuples ('a', 'b'), dicts {'data': -1}."
    )


def configured(cls: Callable[[], T]) -> T:
    """`cls()` with its gin bindings. A missing required binding (no model gin file) becomes a ConfigError."""
    try:
        return cls()
    except RuntimeError as e:
        if "Required bindings" not in str(e):
            raise
        name = getattr(cls, "__name__", str(cls))
        hint = (
            " Include a model gin file, e.g. --gin_file=gin/models/tiny.gin (or gin/models/52b.gin)."
            if name == "TeleFLMConfig"
            else ""
        )
        raise ConfigError(f"{e}.{hint}") from None


def init_distributed(args: argparse.Namespace) -> None:
    """Start jax.distributed when the flags ask for it (before any other JAX call); from then on only process 0
    prints to stdout."""
    import jax

    if jax.distributed.is_initialized():  # a tool called from a program that started it (tests/multihost_tools.py)
        pass
    elif args.coordinator_address or args.num_processes:
        if None in (args.coordinator_address, args.num_processes, args.process_id):
            raise ConfigError("--coordinator_address, --num_processes and --process_id go together.")
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
        )
    elif args.multihost:
        jax.distributed.initialize()
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")


def run_tool(name: str, main: Callable[[], None]) -> None:
    """Run a tool's main: a user error is one line on stderr and exit status 2; a bug keeps its traceback."""
    try:
        main()
    except USER_ERRORS as e:
        message = re.sub(r"\n\s*In call to configurable [^\n]*", "", str(e))  # gin's note of where it raised
        print(f"{name}: {' '.join(message.split())}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None
