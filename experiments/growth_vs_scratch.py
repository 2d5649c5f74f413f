"""Does growing pay? The three-stage grown schedule against training the final model from scratch.

    python experiments/growth_vs_scratch.py --out DIR [--quick]
    (or python -m experiments.growth_vs_scratch ...)

Both runs train on the embedded corpus's one training stream for the same steps (the same batch at the same step:
the same data and tokens per step) and are evaluated on one validation set (prose and code, one sequence length).
The learning rate is tuned on the first stage's small model (a short sweep) and used for every stage and for the
scratch run: μP carries it across widths (the scratch model has the grown model's base shape, so the same μP
multipliers). The grown schedule follows the Tele-FLM series' ratios in miniature (hidden x1.25 then x2 with
head_dim fixed, FFN x1.25 then x3.6, layers 2 -> 3 -> 5) with the shipped growth recipe (gin/growth/), and spends
most of its steps in the small first stage, as FLM-101B spent 245B of its 312B tokens at 16B: its small model
trains long enough to be useful (its loss has flattened) before it grows, and the whole schedule costs about a
fifth of the scratch run's FLOPs. --quick: 900 + 300 + 190 steps (8 minutes on a 2-core CPU); the full setting
doubles every stage.

Writes DIR/growth_vs_scratch.json (`scratch_final_loss`, `grown_final_loss`, `scratch_flops`, `grown_flops`,
`compute_saving`, both curves) and DIR/growth_vs_scratch.png (validation loss against training FLOPs and against
wall time). compute_saving = scratch FLOPs / the FLOPs the grown schedule needed to reach the scratch run's final
validation loss; if it never got there, the FLOPs the scratch run needed to reach the grown schedule's final loss /
all the grown schedule's FLOPs (the compute ratio at the loss both reached; below 1 when growing cost more).
"""

import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python experiments/growth_vs_scratch.py): the repository is the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gin  # noqa: E402
from flm_jax import cli  # noqa: E402
from flm_jax.cli import REPO_ROOT  # noqa: E402
from flm_jax.growth import GrowthSpec  # noqa: E402
from flm_jax.growth.harness import (  # noqa: E402
    Recipe,
    Stage,
    compute_saving,
    experiment_data,
    experiment_flags,
    run_schedule,
)
from flm_jax.optim import OptimizerConfig  # noqa: E402
from flm_jax.training.short_runs import proxy_config  # noqa: E402

HEAD_DIM = 24
# Stage shapes: (hidden, layers); FFN in proxy_config's ratio for stage 1, then grown by the paper's factors.
SHAPES = ((96, 2), (120, 3), (240, 5))
FFN_GROWTH = (1.25, 3.6)
LR_CANDIDATES = (1e-3, 3e-3, 1e-2)
SETTINGS = {
    # the grown schedule's stage steps (the scratch run trains their sum: the same tokens), seq_len, batch, eval
    # batches per domain, eval every, lr sweep steps
    "quick": dict(stages=(900, 300, 190), seq_len=64, batch=8, evals=4, every=50, sweep=150, lrs=LR_CANDIDATES),
    "full": dict(stages=(1800, 600, 380), seq_len=64, batch=8, evals=8, every=100, sweep=300, lrs=LR_CANDIDATES),
    # Seconds: every code path once (the tests run it); its numbers mean nothing.
    "smoke": dict(stages=(6, 4, 4), seq_len=32, batch=2, evals=1, every=3, sweep=4, lrs=LR_CANDIDATES[1:2]),
}
# The default growth recipe, as gin/growth/ holds it (experiments/growth_ablations.py chose it): the operator fields
# are read from this file; the learning rate after growth is the miniature schedule's (a 10-step rewarm).
RECIPE_GIN = "gin/growth/tiny_52b_to_102b.gin"
RECIPE_FIELDS = ("mode", "msg_form", "layer_strategy", "distance_prefer", "new_moments", "readout")
RECIPE = Recipe(lr_policy="rewarm", warmup_steps=10)


def shipped_recipe() -> dict:
    """The GrowthSpec fields of RECIPE_GIN that make the recipe (not the sizes)."""
    gin.clear_config()
    gin.parse_config_file(str(REPO_ROOT / RECIPE_GIN))
    spec = GrowthSpec()
    gin.clear_config()
    return {k: getattr(spec, k) for k in RECIPE_FIELDS}


def stage_specs(ramp_steps: int) -> list[GrowthSpec]:
    first = proxy_config(SHAPES[0][0], SHAPES[0][0], SHAPES[0][1], HEAD_DIM, 64)
    ffn = first.intermediate_size
    specs, recipe = [], shipped_recipe()
    for (hidden, layers), factor in zip(SHAPES[1:], FFN_GROWTH):
        ffn = int(round(ffn * factor / 8)) * 8
        specs.append(
            GrowthSpec(
                hidden_size=hidden,
                num_attention_heads=hidden // HEAD_DIM,
                intermediate_size=ffn,
                num_hidden_layers=layers,
                ramp_steps=ramp_steps,
                **recipe,
            )
        )
    return specs


def tune_learning_rate(s: dict, train_batch, eval_batches) -> tuple[float, dict[float, float]]:
    """The best peak learning rate of the first stage's model after a short run (μP: it transfers)."""
    small = proxy_config(SHAPES[0][0], SHAPES[0][0], SHAPES[0][1], HEAD_DIM, s["seq_len"])
    losses = {}
    for lr in s["lrs"]:
        optimizer = OptimizerConfig(peak_learning_rate=lr, warmup_steps=20)
        curve, _ = run_schedule(small, [Stage(s["sweep"])], optimizer, train_batch, eval_batches, s["sweep"])
        losses[lr] = curve.final_loss
        print(f"lr sweep: peak {lr:g} -> val loss {curve.final_loss:.4f}", flush=True)
    return min(losses, key=losses.get), losses


def compare(s: dict) -> dict:
    steps = sum(s["stages"])
    train_batch, eval_batches = experiment_data(s["batch"], s["seq_len"], steps, s["evals"])
    lr, sweep = tune_learning_rate(s, train_batch, eval_batches)
    optimizer = OptimizerConfig(peak_learning_rate=lr, warmup_steps=20)
    small = proxy_config(SHAPES[0][0], SHAPES[0][0], SHAPES[0][1], HEAD_DIM, s["seq_len"])
    specs = stage_specs(ramp_steps=max(s["stages"][2] // 10, 1))
    stages = [Stage(s["stages"][0])] + [Stage(n, spec) for n, spec in zip(s["stages"][1:], specs)]
    print("grown schedule:", flush=True)
    grown, final = run_schedule(small, stages, optimizer, train_batch, eval_batches, s["every"], 0, RECIPE, log=print)
    # The scratch run trains the grown schedule's final shape (same base shape, so the same μP multipliers).
    target = final["config"].replace(rms_norm_eps=small.rms_norm_eps, rms_norm_scale=1.0)
    print(f"scratch: {target.params_total() / 1e6:.2f}M parameters", flush=True)
    scratch, _ = run_schedule(target, [Stage(steps)], optimizer, train_batch, eval_batches, s["every"], 0)
    saving = compute_saving(scratch, grown)
    return {
        "setting": s,
        "peak_learning_rate": lr,
        "lr_sweep": {str(k): v for k, v in sweep.items()},
        "scratch_final_loss": scratch.final_loss,
        "grown_final_loss": grown.final_loss,
        "scratch_flops": scratch.flops[-1],
        "grown_flops": grown.flops[-1],
        "scratch_seconds": scratch.seconds[-1],
        "grown_seconds": grown.seconds[-1],
        **saving,
        "stage_params": [g["source_params"] for g in grown.growths] + [target.params_total()],
        "growths": grown.growths,
        "scratch": {k: v for k, v in scratch.to_dict().items() if k != "train_loss"},
        "grown": {k: v for k, v in grown.to_dict().items() if k != "train_loss"},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, label in ((axes[0], "flops", "training FLOPs"), (axes[1], "seconds", "wall time (s)")):
        for name, color in (("scratch", "tab:red"), ("grown", "tab:blue")):
            curve = result[name]
            ax.plot(curve[key], curve["val_loss"], marker=".", color=color, label=name)
        for g in result["growths"]:
            i = result["grown"]["steps"].index(g["step"])
            ax.axvline(result["grown"][key][i], color="tab:blue", linestyle=":", alpha=0.6)
        ax.axhline(result["scratch_final_loss"], color="tab:red", linestyle="--", alpha=0.4)
        ax.set(xlabel=label, ylim=(None, result["grown"]["val_loss"][0] * 0.3 + result["grown_final_loss"] * 0.7))
    axes[0].set(ylabel="validation loss (nats/token)")
    axes[0].set_title(f"compute saving {result['compute_saving']:.2f}x (dotted: growth)", fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = experiment_flags(__doc__.split("\n")[0])
    started = time.time()
    result = compare(SETTINGS[args.setting])
    result["wall_seconds"] = time.time() - started
    (args.out / "growth_vs_scratch.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "growth_vs_scratch.png")
    keys = ("scratch_final_loss", "grown_final_loss", "scratch_flops", "grown_flops", "compute_saving")
    print(json.dumps({k: result[k] for k in keys + ("grown_reached_scratch_loss", "wall_seconds")}), flush=True)


if __name__ == "__main__":
    cli.run_tool("growth_vs_scratch", main)
