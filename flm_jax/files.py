"""Writing the tools' output files safely: checked before any work starts, and never seen half-written.

A local file is written under a temporary name in its own folder, then renamed over its name (os.replace is atomic
within a filesystem), so a crash or an error leaves the old file or the new one, never a mix; an object in a bucket
(gs://) appears only when its upload completes, so it is written directly. A folder of files that belong together
(a Hugging Face export) is written into a private staging folder inside it and moved in only when every file is
complete; a failure removes the staging folder, so the disk is left as it was. Paths are flm_jax.paths paths.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

from etils import epath

from flm_jax.config import ConfigError
from flm_jax.paths import PathLike, as_path, is_remote


def check_output_folder(path: PathLike, what: str) -> None:
    """Raise ConfigError unless `path` is a folder, or one can be created there, that this process may write into.
    `what` names the path in the message (e.g. '--workdir'). A bucket's permissions show only when writing."""
    path = as_path(path)
    if is_remote(path):
        return
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; pass the path of a folder (or move the file).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {path} cannot be created: {existing} is a file. Pass a path under a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what} {path} is not writable: this user may not write into {existing}. Choose a folder you can "
            "write to, or change its permissions."
        )


def _temporary(path: epath.Path) -> epath.Path:
    """A fresh name next to `path`, hidden and unique to this write."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    path = as_path(path)
    if is_remote(path):
        path.write_bytes(data)
        return
    tmp = _temporary(path)
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_folder(out: PathLike) -> Iterator[epath.Path]:
    """A staging folder inside `out` (created if need be) to write files into. When the block succeeds they are
    renamed into `out`, each replacing the file of its name; when it fails they are removed, and so is `out` if
    this created it."""
    out = as_path(out)
    created = None
    if not out.exists():
        created = out
        while not created.parent.exists():
            created = created.parent
    out.mkdir(parents=True, exist_ok=True)
    stage = _temporary(out / "staged")
    stage.mkdir()
    try:
        yield stage
        for file in sorted(stage.iterdir()):
            file.replace(out / file.name)
    except BaseException:
        if created is not None:
            created.rmtree(missing_ok=True)
        raise
    finally:
        stage.rmtree(missing_ok=True)
