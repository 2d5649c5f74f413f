"""Hugging Face weight files: a streaming, sharded safetensors writer and a reader for safetensors or `.bin` folders.

The writer knows every tensor's name, shape and dtype up front, so it can write each shard's header first and
then append tensors one at a time: host memory holds one tensor, never a whole shard. Files follow the safetensors
format (8-byte little-endian header length, JSON header padded with spaces to 8 bytes, raw little-endian data) and
the Hugging Face sharding convention (model-0000k-of-0000n.safetensors plus model.safetensors.index.json).
`.bin` files are read with `torch.load(weights_only=True)`, which refuses pickled code.
"""

from __future__ import annotations

import json
import pickle  # only for the error torch.load(weights_only=True) raises: nothing here unpickles
import re
from collections.abc import Iterator
from typing import IO

import ml_dtypes
import numpy as np

from flm_jax.config import ConfigError
from flm_jax.paths import PathLike, as_path

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
NUMPY_DTYPES = {
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE, BIN_INDEX_FILE = "pytorch_model.bin", "pytorch_model.bin.index.json"
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536_870_912, 1000 -> 1000 (Hugging Face's convention)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in _UNITS:
        raise ConfigError(f"size {text!r} is not a number of bytes such as 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    return int(np.prod(shape, dtype=np.int64)) * NUMPY_DTYPES[dtype].itemsize


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], dtype: str, max_shard_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = _nbytes(shape, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class SafetensorsWriter:
    """Writes the planned tensors, which must arrive in plan order, into one or several safetensors files: all of
    them, or (several processes exporting together) the files numbered `process, process + count, ...`."""

    def __init__(
        self,
        out_dir: PathLike,
        specs: list[tuple[str, tuple[int, ...]]],
        dtype: str,
        max_shard_bytes: int,
        process: int = 0,
        count: int = 1,
    ):
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
        self.out_dir, self.dtype = as_path(out_dir), dtype
        self.shapes = dict(specs)
        self.shards = plan_shards(specs, dtype, max_shard_bytes)
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.mine = [k for k in range(n) if k % count == process]
        self._wanted = {name for k in self.mine for name in self.shards[k]}
        self._order: Iterator[tuple[int, str]] = iter([(k, name) for k in self.mine for name in self.shards[k]])
        self._shard, self._file = -1, None

    def wants(self, name: str) -> bool:
        """Whether `name` goes into a file this writer writes (the others need not be read)."""
        return name in self._wanted

    def _open_shard(self, k: int) -> IO[bytes]:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in self.shards[k]:
            nbytes = _nbytes(self.shapes[name], self.dtype)
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[self.dtype],
                "shape": list(self.shapes[name]),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        f = (self.out_dir / self.files[k]).open("wb")
        f.write(len(text).to_bytes(8, "little") + text)
        return f

    def write(self, name: str, array: np.ndarray) -> None:
        k, expected = next(self._order, (None, None))
        if name != expected:
            raise ValueError(f"tensor {name!r} written out of order; expected {expected!r}")
        if tuple(array.shape) != tuple(self.shapes[name]):
            raise ValueError(f"tensor {name!r} has shape {array.shape}, planned {self.shapes[name]}")
        if k != self._shard:
            if self._file:
                self._file.close()
            self._shard, self._file = k, self._open_shard(k)
        data = np.ascontiguousarray(array.astype(NUMPY_DTYPES[self.dtype], copy=False))
        self._file.write(memoryview(data.reshape(-1).view(np.uint8)))

    def close(self) -> list[str]:
        """Finish the last shard; returns the names of the files written here."""
        leftover = next(self._order, None)
        if leftover is not None:
            raise ValueError(f"export incomplete: tensor {leftover[1]!r} and later ones were never written")
        if self._file:
            self._file.close()
        return [self.files[k] for k in self.mine]

    def index(self) -> dict | None:
        """The safetensors index of all the files (None for a single file)."""
        if len(self.files) == 1:
            return None
        weight_map = {name: self.files[k] for k, names in enumerate(self.shards) for name in names}
        total = sum(_nbytes(shape, self.dtype) for shape in self.shapes.values())
        return {"metadata": {"total_size": total}, "weight_map": weight_map}


class HFWeights:
    """The tensors of a Hugging Face model folder, read one at a time (safetensors, or `.bin` weights only)."""

    def __init__(self, hf_dir: PathLike):
        self.dir = as_path(hf_dir)
        self._handles: dict[str, object] = {}
        self._bin: dict[str, dict] = {}
        if (self.dir / INDEX_FILE).is_file():
            self.kind, self.file_of = "safetensors", self._index(INDEX_FILE)
        elif (self.dir / SINGLE_FILE).is_file():
            self.kind, self.file_of = "safetensors", self._listing(SINGLE_FILE)
        elif (self.dir / BIN_INDEX_FILE).is_file():
            self.kind, self.file_of = "bin", self._index(BIN_INDEX_FILE)
        elif (self.dir / BIN_FILE).is_file():
            self.kind, self.file_of = "bin", {name: BIN_FILE for name in self._bin_file(BIN_FILE)}
        else:
            raise FileNotFoundError(f"{self.dir} holds no {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE} or {BIN_INDEX_FILE}")

    def _index(self, name: str) -> dict[str, str]:
        return dict(json.loads((self.dir / name).read_text())["weight_map"])

    def _listing(self, file: str) -> dict[str, str]:
        return {name: file for name in self._safetensors(file).keys()}

    def _safetensors(self, file: str):
        from safetensors import SafetensorError, safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.dir / file), framework="numpy")
            except (SafetensorError, OSError) as e:
                raise ConfigError(
                    f"{self.dir / file} is not a readable safetensors file ({e}); download or export it again."
                ) from None
        return self._handles[file]

    def _bin_file(self, file: str) -> dict:
        import torch

        if file not in self._bin:
            try:
                self._bin = {file: torch.load(self.dir / file, map_location="cpu", weights_only=True, mmap=True)}
            except pickle.UnpicklingError as e:  # torch's own advice (weights_only=False) would run the code
                refused = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
                raise ConfigError(
                    f"{self.dir / file} holds pickled objects besides tensors, which are never loaded ({refused}); "
                    "convert the weights to safetensors from a copy you trust."
                ) from None
            except RuntimeError as e:
                raise ConfigError(
                    f"{self.dir / file} is not a readable PyTorch file ({str(e).splitlines()[0]}); download it again."
                ) from None
        return self._bin[file]

    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        file = self.file_of[name]
        if self.kind == "safetensors":
            return tuple(self._safetensors(file).get_slice(name).get_shape())
        return tuple(self._bin_file(file)[name].shape)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Tensor `name`, or only its block `index` (safetensors reads just those bytes)."""
        file = self.file_of[name]
        if self.kind == "safetensors":
            handle = self._safetensors(file)
            return handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        import torch

        tensor = self._bin_file(file)[name]
        tensor = tensor if index is None else tensor[index]
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.contiguous().numpy()
