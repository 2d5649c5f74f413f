"""The paths of runs and tools: local folders, `file://` URIs and bucket URIs (`gs://bucket/run`) alike.

Every workdir, checkpoint folder and output a tool touches goes through `as_path`, an `etils.epath.Path`: orbax
writes checkpoints through it (arrays with tensorstore, which speaks gs:// itself), TensorBoard through TensorFlow's
file systems, and small files (config.gin, metrics.jsonl, growth.json) through epath's own backends, so a bucket
URI is never mistaken for a local folder named `gs:`. A local path is made absolute against the caller's working
directory at once, so a relative workdir means the same folder in every process and every stage of a schedule.
"""

from __future__ import annotations

import os

from etils import epath

FILE_SCHEME = "file://"
REMOTE_SCHEMES = ("gs://", "s3://", "az://")

PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: a bucket URI as it is, `file:///x` as the local /x, a relative path absolute."""
    text = os.fspath(path)
    if text.startswith(FILE_SCHEME):
        text = text[len(FILE_SCHEME) :]
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_remote(path: PathLike) -> bool:
    return os.fspath(path).startswith(REMOTE_SCHEMES)
