"""Loss prediction from μP proxies (the Tele-FLM / μScaling recipe): train several narrow proxies with the same
hyperparameters and tokens, fit L(x) = a·x^b + c (x = non-embedding parameters, or training FLOPs), predict a
wider model's loss at the same token budget, then train that model and compare.

    python -m experiments.loss_prediction --out DIR [--quick] [--x=params|flops] [--gin_file=gin/sweeps/...]

Writes DIR/prediction.json (`predicted_loss`, `actual_loss`, `relative_error`, the fit and every run) and
DIR/prediction.png.
"""

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit

import gin
from flm_jax import cli
from flm_jax.optim import OptimizerConfig
from flm_jax.training.short_runs import draw_batches, proxy_config, run


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PredictionSweep:
    proxy_widths: tuple[int, ...] = (128, 192, 256, 384, 512)
    target_width: int = 1024
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    num_layers: int = 4
    head_dim: int = 32
    learning_rate: float = 2.0**-8  # μP: one learning rate for every width (experiments/mup_transfer.py)
    warmup_steps: int = 100
    eval_batches: int = 16


QUICK = PredictionSweep(
    proxy_widths=(64, 96, 128, 160, 192),
    target_width=320,
    steps=150,
    batch_size=8,
    seq_len=128,
    num_layers=2,
    warmup_steps=15,
    eval_batches=8,
)


def power_law(x, a, b, c):
    return a * np.power(x, b) + c


def main() -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="5 proxies (d=64..192) -> d=320, a few minutes on a CPU")
    p.add_argument("--x", choices=("params", "flops"), default="params")
    args = cli.parse(p)
    sweep = QUICK if args.quick else PredictionSweep()
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)

    train = draw_batches("flm_default", "train", sweep.steps, sweep.batch_size, sweep.seq_len, seed=0)
    held_out = draw_batches("flm_default", "validation", sweep.eval_batches, sweep.batch_size, sweep.seq_len, seed=0)
    base_width = sweep.proxy_widths[0]
    optimizer = OptimizerConfig(
        peak_learning_rate=sweep.learning_rate, warmup_steps=sweep.warmup_steps, schedule="cosine", weight_decay=0.0
    )
    tokens = sweep.steps * sweep.batch_size * sweep.seq_len

    def measure(width):
        cfg = proxy_config(width, base_width, sweep.num_layers, sweep.head_dim, sweep.seq_len)
        x = cfg.params_non_embedding() if args.x == "params" else cfg.flops_per_token(sweep.seq_len) * tokens
        result = run(cfg, optimizer, train, held_out)
        print(
            f"width {width:5}  {args.x} {x:.3e}  eval loss {result.eval_loss:.4f}  ({result.seconds:.0f}s)", flush=True
        )
        return {"width": width, "x": float(x), "eval_loss": result.eval_loss, "seconds": result.seconds}

    proxies = [measure(w) for w in sweep.proxy_widths]
    xs = np.array([r["x"] for r in proxies])
    ys = np.array([r["eval_loss"] for r in proxies])
    scale = xs[0]  # fit in units of the smallest proxy, for conditioning
    (a, b, c), _ = curve_fit(
        power_law,
        xs / scale,
        ys,
        p0=(ys[0] - ys[-1] + 0.5, -0.5, ys[-1] - 0.5),
        bounds=([0.0, -5.0, 0.0], [np.inf, 0.0, np.inf]),
        maxfev=20000,
    )
    target = measure(sweep.target_width)
    predicted = float(power_law(target["x"] / scale, a, b, c))
    actual = target["eval_loss"]
    result = {
        "x_kind": args.x,
        "tokens": tokens,
        "fit": {"a": a, "b": b, "c": c, "x_unit": scale, "formula": "L = a * (x / x_unit)^b + c"},
        "proxies": proxies,
        "target": target,
        "predicted_loss": predicted,
        "actual_loss": actual,
        "relative_error": abs(predicted - actual) / actual,
        "sweep": dataclasses.asdict(sweep),
    }
    (out / "prediction.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "prediction.png")
    print(json.dumps({k: result[k] for k in ("predicted_loss", "actual_loss", "relative_error")}))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit, unit = result["fit"], result["fit"]["x_unit"]
    xs = np.geomspace(result["proxies"][0]["x"], result["target"]["x"] * 1.2, 100)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        xs,
        power_law(xs / unit, fit["a"], fit["b"], fit["c"]),
        "--",
        color="gray",
        label=f"fit a·x^{fit['b']:.2f} + {fit['c']:.2f}",
    )
    ax.plot([r["x"] for r in result["proxies"]], [r["eval_loss"] for r in result["proxies"]], "o", label="proxies")
    ax.plot(result["target"]["x"], result["predicted_loss"], "x", ms=10, label="predicted")
    ax.plot(result["target"]["x"], result["actual_loss"], "*", ms=12, label="actual")
    ax.set(
        xscale="log",
        xlabel=result["x_kind"],
        ylabel="validation loss",
        title=f"relative error {result['relative_error']:.2%}",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    cli.run_tool("loss_prediction", main)
