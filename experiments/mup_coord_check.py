"""μP coordinate check: activation RMS per layer after a few Adam steps, across widths, under μP and SP.

    python -m experiments.mup_coord_check --out DIR

Writes DIR/coord_check.json and DIR/coord_check.png. `mup_max_ratio` / `sp_max_ratio`: over every recorded
activation (embedding, each layer's attention output, MLP output and residual stream, logits), the largest
max(r, 1/r) with r = RMS at the widest width / RMS at the narrowest, on the RMS averaged over --seeds (default 3);
`max_ratio_per_seed` repeats the check on each seed alone (the spread). Only activations count (the layer-selection
distance that the model also sows is not a coordinate size). Under μP activations stay O(1) as width grows (ratio
near 1); under standard parametrisation the Adam updates make them grow with width.
"""

import json
import os
from pathlib import Path

from flm_jax import cli
from flm_jax.optim import OptimizerConfig
from flm_jax.training.short_runs import draw_batches, proxy_config, run

WIDTHS = (128, 256, 512, 1024)  # an 8x range


def max_ratios(wide: dict[str, list[float]], narrow: dict[str, list[float]]) -> dict[str, float]:
    """max(r, 1/r) of r = RMS at the widest width / RMS at the narrowest, per activation (and layer)."""
    ratios = {}
    for key, values in wide.items():
        for layer, value in enumerate(values):
            r = value / narrow[key][layer]
            ratios[f"{key}[{layer}]" if len(values) > 1 else key] = max(r, 1 / r)
    return ratios


def coord_check(steps: int, lr: float, seeds: int) -> dict:
    batches = draw_batches("flm_default", "train", steps + 1, batch_size=4, seq_len=64, seed=1)
    optimizer = OptimizerConfig(peak_learning_rate=lr, warmup_steps=0, schedule="constant", weight_decay=0.0)
    results = {}
    for name, mup in (("mup", True), ("sp", False)):
        per_width, seed_runs = {}, {}
        for width in WIDTHS:
            cfg = proxy_config(width, WIDTHS[0], num_layers=2, head_dim=32, seq_len=64, mup=mup)
            runs = [
                run(cfg, optimizer, batches[:steps], probe=batches[-1], seed=s).activation_rms for s in range(seeds)
            ]
            seed_runs[width] = runs
            per_width[width] = {
                k: [sum(r[k][i] for r in runs) / seeds for i in range(len(runs[0][k]))] for k in runs[0]
            }
            print(
                f"{name} width {width}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in per_width[width].items()),
                flush=True,
            )
        ratios = max_ratios(per_width[WIDTHS[-1]], per_width[WIDTHS[0]])
        per_seed = [
            max(max_ratios(wide, narrow).values()) for wide, narrow in zip(seed_runs[WIDTHS[-1]], seed_runs[WIDTHS[0]])
        ]
        results[name] = {
            "rms": {str(w): v for w, v in per_width.items()},
            "ratios": ratios,
            "max_ratio": max(ratios.values()),
            "max_ratio_per_seed": per_seed,  # the spread: the same check on each seed alone
        }
    return {
        "widths": list(WIDTHS),
        "steps": steps,
        "learning_rate": lr,
        "seeds": seeds,
        "mup_max_ratio": results["mup"]["max_ratio"],
        "sp_max_ratio": results["sp"]["max_ratio"],
        "mup": results["mup"],
        "sp": results["sp"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(result["mup"]["rms"][str(result["widths"][0])])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, name in zip(axes, ("mup", "sp")):
        for key in keys:
            layers = len(result[name]["rms"][str(result["widths"][0])][key])
            for layer in range(layers):
                ys = [result[name]["rms"][str(w)][key][layer] for w in result["widths"]]
                ax.plot(result["widths"], ys, marker="o", label=f"{key}" + (f"[{layer}]" if layers > 1 else ""))
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="width (hidden size)",
            title=f"{name.upper()}: max ratio {result[name]['max_ratio']:.2f} after {result['steps']} Adam steps",
        )
    axes[0].set_ylabel("activation RMS")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seeds", type=int, default=3)
    args = cli.parse(p)
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)
    result = coord_check(args.steps, args.lr, args.seeds)
    (out / "coord_check.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "coord_check.png")
    print(json.dumps({k: result[k] for k in ("mup_max_ratio", "sp_max_ratio")}))


if __name__ == "__main__":
    cli.run_tool("mup_coord_check", main)
