"""A workdir's checkpoints and config.gin: orbax checkpoints of the train state, the data-iterator position and
self-describing metadata.

Layout of WORKDIR/checkpoints/<step>/:
  state/     params, optimizer state and step (orbax, OCDBT); stacked layer arrays are stored in one-layer chunks
             so that export and growth can read a layer at a time
  data/      the data iterator's JSON state (the next batch to draw)
  metadata/  JSON: the model config (Hugging Face field names), the layer-stack layout, growth state, ...
orbax writes each step into a temporary folder and renames it when complete, so a crash never leaves a partial
checkpoint that `latest_step` would pick up.

WORKDIR/config.gin holds the gin config of the run (its model, mesh, optimizer, training and hardware settings), so
`python -m flm_jax.train --workdir=WORKDIR` with no --gin_file continues the same run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from flm_jax.config import TeleFLMConfig

LAYER_STACK_LAYOUT = {"stacked_axis": 0, "collection": "layers", "scan": True}
CONFIG_GIN = "config.gin"
# Bindings that config.gin files of earlier flm_jax versions hold and that no longer exist: dropped when such a
# file is read, so their workdirs still resume.
OBSOLETE_BINDINGS = ("make_optimizer.optimizer", "MeshLayout.device_kind")


def checkpoint_dir(workdir: str | Path) -> Path:
    return Path(workdir).resolve() / "checkpoints"


def _is_layer_stacked(path) -> bool:
    return any(getattr(k, "key", None) == "layers" for k in path)


def layer_chunked_save_args(state: Any) -> Any:
    """SaveArgs that store each stacked-layer array one layer per chunk (cheap one-layer reads, docs/stack.md)."""

    def args(path, x):
        if not _is_layer_stacked(path) or getattr(x, "ndim", 0) < 2:
            return ocp.SaveArgs()
        shard_shape = x.sharding.shard_shape(x.shape) if hasattr(x, "sharding") else x.shape
        one_layer = math.prod(shard_shape[1:]) * x.dtype.itemsize
        return ocp.SaveArgs(chunk_byte_size=one_layer, shard_axes=(0,))

    return jax.tree_util.tree_map_with_path(args, state)


def read_config_gin(workdir: str | Path) -> str | None:
    """The workdir's config.gin, less obsolete bindings; None when there is none."""
    path = Path(workdir) / CONFIG_GIN
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


class Checkpointer:
    """A CheckpointManager for train states; saves are asynchronous unless async_save=False."""

    def __init__(
        self, workdir: str | Path, save_interval_steps: int = 1, max_to_keep: int | None = 3, async_save: bool = True
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
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "metadata"))

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

    def save(self, step: int, state: Any, data_state: dict, metadata: dict, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state, save_args=layer_chunked_save_args(state)),
            data=ocp.args.JsonSave(data_state),
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

    def metadata(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
