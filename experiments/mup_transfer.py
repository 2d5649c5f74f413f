"""μP learning-rate transfer: sweep the learning rate at several widths under μP and under standard
parametrisation, on the embedded corpus, and see whether the best learning rate moves with width.

    python -m experiments.mup_transfer --out DIR [--quick]
    python -m experiments.mup_transfer --out DIR --gin_file=gin/sweeps/mup_transfer_full.gin \
        [--task_index=I --num_tasks=N]   # a cluster array job: each task runs every N-th run ...
    python -m experiments.mup_transfer --out DIR --gin_file=gin/sweeps/mup_transfer_full.gin --merge  # ... then

Writes DIR/transfer.json (`lr_grid`, `mup_best_lr`, `sp_best_lr`: width -> best learning rate, the eval losses,
and `mup_max_shift_steps` / `sp_max_shift_steps`: how many grid steps the best lr moves across widths) and
DIR/transfer.png.
"""

import dataclasses
import json
import math
import os
from pathlib import Path

import gin
from flm_jax import cli
from flm_jax.optim import OptimizerConfig
from flm_jax.training.short_runs import draw_batches, proxy_config, run


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TransferSweep:
    widths: tuple[int, ...] = (128, 256, 512, 1024)
    lr_exponents: tuple[int, ...] = (-13, -12, -11, -10, -9, -8, -7, -6, -5)  # lr = 2**e
    steps: int = 500
    batch_size: int = 16
    seq_len: int = 256
    num_layers: int = 4
    head_dim: int = 32
    warmup_steps: int = 50
    eval_batches: int = 16


QUICK = TransferSweep(
    widths=(64, 128, 256),
    lr_exponents=(-9, -8, -7, -6, -5),
    steps=100,
    batch_size=8,
    seq_len=128,
    num_layers=2,
    warmup_steps=6,
    eval_batches=4,
)


def runs_of(sweep: TransferSweep) -> list[tuple[str, int, int]]:
    return [(p, w, e) for p in ("mup", "sp") for w in sweep.widths for e in sweep.lr_exponents]


def execute(sweep: TransferSweep, task_index: int, num_tasks: int) -> list[dict]:
    train = draw_batches("flm_default", "train", sweep.steps, sweep.batch_size, sweep.seq_len, seed=0)
    held_out = draw_batches("flm_default", "validation", sweep.eval_batches, sweep.batch_size, sweep.seq_len, seed=0)
    records = []
    for i, (param, width, exponent) in enumerate(runs_of(sweep)):
        if i % num_tasks != task_index:
            continue
        cfg = proxy_config(width, sweep.widths[0], sweep.num_layers, sweep.head_dim, sweep.seq_len, param == "mup")
        opt = OptimizerConfig(
            peak_learning_rate=2.0**exponent, warmup_steps=sweep.warmup_steps, schedule="cosine", weight_decay=0.0
        )
        result = run(cfg, opt, train, held_out)
        records.append(
            {
                "param": param,
                "width": width,
                "lr": 2.0**exponent,
                "eval_loss": result.eval_loss,
                "seconds": result.seconds,
            }
        )
        print(
            f"{param:3} width {width:5} lr 2^{exponent:<3} eval loss {result.eval_loss:.4f} ({result.seconds:.0f}s)",
            flush=True,
        )
    return records


def summarise(sweep: TransferSweep, records: list[dict]) -> dict:
    grid = [2.0**e for e in sweep.lr_exponents]
    out = {"lr_grid": grid, "widths": list(sweep.widths), "sweep": dataclasses.asdict(sweep), "runs": records}
    for param in ("mup", "sp"):
        best, losses = {}, {}
        for width in sweep.widths:
            row = {r["lr"]: r["eval_loss"] for r in records if r["param"] == param and r["width"] == width}
            losses[str(width)] = [row[lr] for lr in grid]
            best[str(width)] = min(grid, key=lambda lr: row[lr])
        steps = [round(math.log2(best[str(w)])) for w in sweep.widths]
        out[f"{param}_best_lr"] = best
        out[f"{param}_eval_loss"] = losses
        out[f"{param}_max_shift_steps"] = max(steps) - min(steps)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, param in zip(axes, ("mup", "sp")):
        for width in result["widths"]:
            ys = [y if math.isfinite(y) else float("nan") for y in result[f"{param}_eval_loss"][str(width)]]
            ax.plot(result["lr_grid"], ys, marker="o", label=f"width {width}")
        ax.set(
            xscale="log",
            xlabel="peak learning rate",
            title=f"{param.upper()}: best lr moves {result[f'{param}_max_shift_steps']} grid step(s)",
        )
    axes[0].set_ylabel("validation loss")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="3 widths x 6 learning rates, ~10 minutes on 2 CPU cores")
    p.add_argument("--task_index", type=int, default=0)
    p.add_argument("--num_tasks", type=int, default=1)
    p.add_argument("--merge", action="store_true", help="combine the part files of an array job")
    args = cli.parse(p)
    sweep = QUICK if args.quick else TransferSweep()
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)
    if args.merge:
        records = [r for f in sorted(out.glob("part-*.json")) for r in json.loads(f.read_text())]
    else:
        records = execute(sweep, args.task_index, args.num_tasks)
        if args.num_tasks > 1:
            (out / f"part-{args.task_index:05d}.json").write_text(json.dumps(records))
            return
    result = summarise(sweep, records)
    (out / "transfer.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "transfer.png")
    print(
        json.dumps({k: result[k] for k in ("mup_best_lr", "sp_best_lr", "mup_max_shift_steps", "sp_max_shift_steps")})
    )


if __name__ == "__main__":
    cli.run_tool("mup_transfer", main)
