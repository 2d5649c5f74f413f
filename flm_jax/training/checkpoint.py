"""A workdir's checkpoints and config.gin: orbax checkpoints of the train state, the data-iterator position and
self-describing metadata.

Layout of WORKDIR/checkpoints/<step>/:
  state/     params, optimizer state and step (orbax, OCDBT); stacked layer arrays are stored in one-layer chunks
             so that export and growth can read a layer at a time
  data/      the data stream's JSON state (its spec and the number of batches drawn)
  data_iterators/  one tf.data iterator snapshot per input shard, written by the first process that reads it, so
             a resume restores the stream's position at once instead of replaying it (flm_jax/data/sharded.py)
  metadata/  JSON: the model config (Hugging Face field names), the layer-stack layout, growth state, ...
orbax writes each step into a temporary folder and renames it when complete, so a crash never leaves a partial
checkpoint that `latest_step` would pick up.

WORKDIR/config.gin holds the gin config of the run (its model, mesh, optimizer, training and hardware settings), so
`python -m flm_jax.train --workdir=WORKDIR` with no --gin_file continues the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.paths import PathLike, as_path

LAYER_STACK_LAYOUT = {"stacked_axis": 0, "collection": "layers", "scan": True}
CONFIG_GIN = "config.gin"
ITEMS = ("state", "data", "data_iterators", "metadata")
# Bindings that config.gin files of earlier flm_jax versions hold and that no longer exist: dropped when such a
# file is read, so their workdirs still resume.
OBSOLETE_BINDINGS = ("make_optimizer.optimizer", "MeshLayout.device_kind")


def checkpoint_dir(workdir: PathLike) -> epath.Path:
    return as_path(workdir) / "checkpoints"


def _is_layer_stacked(path) -> bool:
    return any(getattr(k, "key", None) == "layers" for k in path)


class _SmallChunksAreIntended(logging.Filter):
    """orbax warns, once per array at every save, that a chunk under 1 MiB could be slow; one layer of a small
    model is such a chunk, by design (layer_chunked_save_args)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "target_byte_size too small" not in record.getMessage()


logging.getLogger("absl").addFilter(_SmallChunksAreIntended())


def layer_chunked_save_args(state: Any) -> Any:
    """SaveArgs that store each stacked-layer array one layer per chunk (cheap one-layer reads, docs/stack.md)."""

    def args(path, x):
        if not _is_layer_stacked(path) or getattr(x, "ndim", 0) < 2:
            return ocp.SaveArgs()
        shard_shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
        one_layer = math.prod(shard_shape[1:]) * x.dtype.itemsize
        return ocp.SaveArgs(chunk_byte_size=one_layer, shard_axes=(0,))

    return jax.tree_util.tree_map_with_path(args, state)


def read_config_gin(workdir: PathLike) -> str | None:
    """The workdir's config.gin, less obsolete bindings; None when there is none."""
    path = as_path(workdir) / CONFIG_GIN
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith(OBSOLETE_BINDINGS)) + "\n"


def config_gin_with_model(base: str, config: TeleFLMConfig, comment: str) -> str:
    """A config.gin: `base` (gin text) with its TeleFLMConfig bindings replaced by `config`'s."""
    kept = [line for line in base.splitlines() if not line.startswith("TeleFLMConfig.")]
    model = [f"TeleFLMConfig.{k} = {v!r}" for k, v in config.to_dict().items()]
    return "\n".join([*kept, "", f"# {comment}", *model]) + "\n"


def make_metadata(config: TeleFLMConfig, **extra: Any) -> dict[str, Any]:
    return {"format": "flm_jax/1", "model_config": config.to_dict(), "layer_stack": LAYER_STACK_LAYOUT, **extra}


def _iterator_file(shard: int) -> str:
    return f"shard_{shard:05d}"


class IteratorStatesHandler(ocp.CheckpointHandler):
    """Writes the tf.data snapshots this process was given, one file per input shard; reads back those asked for
    that exist (a shard with none resumes by skipping)."""

    def save(self, directory: epath.Path, args: IteratorStatesSave) -> None:
        for shard, blob in args.states.items():
            (directory / _iterator_file(shard)).write_bytes(blob)

    def restore(self, directory: epath.Path, args: IteratorStatesRestore) -> dict[int, bytes]:
        paths = {s: directory / _iterator_file(s) for s in args.shards}
        return {s: p.read_bytes() for s, p in paths.items() if p.exists()}

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(IteratorStatesHandler, for_save=True)
@dataclasses.dataclass
class IteratorStatesSave(ocp.args.CheckpointArgs):
    states: Mapping[int, bytes]


@ocp.args.register_with_handler(IteratorStatesHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStatesRestore(ocp.args.CheckpointArgs):
    shards: Sequence[int]


class Checkpointer:
    """A CheckpointManager for train states; saves are asynchronous unless async_save=False."""

    def __init__(
        self, workdir: PathLike, save_interval_steps: int = 1, max_to_keep: int | None = 3, async_save: bool = True
    ):
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            max_to_keep=max_to_keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            # wait for an in-flight save instead of silently skipping a step
            enable_should_save_is_saving_in_progress_check=False,
        )
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def describe_latest(self) -> str:
        """Where the latest checkpoint is, for messages."""
        step = self.latest_step()
        return "none yet" if step is None else f"{self.directory}/{step} (step {step})"

    def will_save(self, step: int, force: bool = False) -> bool:
        return force or self.manager.should_save(step)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        metadata: dict,
        force: bool = False,
        iterator_states: Mapping[int, bytes] | None = None,
    ) -> bool:
        """Save at `step` if the interval (or `force`) says so; `iterator_states` are this process's tf.data
        snapshots to write, {input shard: bytes}."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state, save_args=layer_chunked_save_args(state)),
            data=ocp.args.JsonSave(data_state),
            data_iterators=IteratorStatesSave(dict(iterator_states or {})),
            metadata=ocp.args.JsonSave(metadata),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore onto the shardings held by `abstract_state` (ShapeDtypeStructs), whatever mesh saved it."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data, restored.metadata

    def iterator_states(self, step: int, shards: Sequence[int]) -> dict[int, bytes]:
        """The tf.data snapshots of `shards` saved at `step` (none in checkpoints from before they were saved)."""
        if not (self.directory / str(step) / "data_iterators").exists():
            return {}
        args = ocp.args.Composite(data_iterators=IteratorStatesRestore(tuple(shards)))
        return self.manager.restore(step, args=args).data_iterators

    def metadata(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        try:
            return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
        except (ValueError, OSError) as e:  # json.JSONDecodeError: a damaged file; FileNotFoundError: none
            others = sorted(set(self.all_steps()) - {step})
            raise ConfigError(
                f"{self.directory}/{step}/metadata is damaged ({type(e).__name__}: {e}); restore the checkpoint from "
                f"a copy, or use one of its other steps {others} (pass --step, or delete step {step} to resume)."
            ) from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
