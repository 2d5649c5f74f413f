"""Pre-training: `python -m flm_jax.train --gin_file=gin/experiments/tiny_pretrain.gin --workdir=DIR`.

Resumes from DIR's latest checkpoint when there is one (the model shape then comes from the checkpoint's metadata;
with no --gin_file, DIR/config.gin is reused, so the resumed run is the same run). Writes DIR/config.gin (the
operative gin config, hardware peak included), DIR/metrics.jsonl, DIR/tensorboard/ and DIR/checkpoints/.
"""

from __future__ import annotations

import argparse
import json

import gin
from flm_jax import cli, data, hardware
from flm_jax.config import TeleFLMConfig
from flm_jax.optim import OptimizerConfig
from flm_jax.partitioning import MeshLayout
from flm_jax.paths import as_path
from flm_jax.training.checkpoint import read_config_gin
from flm_jax.training.config import TrainConfig
from flm_jax.training.loop import train


def build_parser() -> argparse.ArgumentParser:
    """The flags of `python -m flm_jax.train` (tests/test_launch.py parses the launch recipes' commands with it)."""
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="output folder; an existing run there is resumed")
    p.add_argument(
        "--until_step",
        type=int,
        default=None,
        help="stop after this step with a checkpoint (a later call continues to TrainConfig.steps)",
    )
    cli.add_distributed_flags(p)
    return p


def main(argv=None) -> None:
    args = cli.parse(build_parser(), argv, load=False)
    workdir = as_path(args.workdir)
    saved = None if args.gin_file else read_config_gin(workdir)
    cli.load_gin(args.gin_file, args.gin_bindings, config_text=saved)
    cli.init_distributed(args)

    # gin is resolved here, once; everything below receives plain config objects.
    data.register_tasks()  # the default tasks plus any registered from gin
    model_cfg, layout = cli.configured(TeleFLMConfig), cli.configured(MeshLayout)
    optimizer_cfg, train_cfg = cli.configured(OptimizerConfig), cli.configured(TrainConfig)
    peak = hardware.peak_flops_per_device()
    operative = (
        gin.operative_config_str() + "\n# The peak FLOP/s of one device that this run's MFU divides by.\n"
        f"peak_flops_per_device.override = {peak!r}\n"
    )
    last = train(
        workdir,
        model_cfg=model_cfg,
        layout=layout,
        optimizer_cfg=optimizer_cfg,
        train_cfg=train_cfg,
        peak_flops=peak,
        until_step=args.until_step,
        config_gin=operative,
    )
    print(json.dumps({k: v for k, v in last.items() if k.startswith(("val_", "loss"))}), flush=True)


if __name__ == "__main__":
    cli.run_tool("train", main)
