"""Growth ablations: which recipe grows a trained model best, over several seeds.

    python experiments/growth_ablations.py --out DIR [--quick] [--seeds N]
    (or python -m experiments.growth_ablations ...)

One small model (per seed) is trained once; every recipe grows that same checkpoint into the same target (hidden,
heads and FFN x2, so duplication is possible; layers 4 -> 6, so the layer strategies differ) and trains it for the
same steps on the same data. A recipe changes one thing against the base recipe (MSG, sublayer ramp form, evenly
spaced new layers, new entries' nu = the mean old nu, the stage's own warmup): the layer-selection strategy (stack,
interleave, distance), the operator family (MSG's block ramp form, exact zero padding, duplication with zero-sum
noise), the ramp length, the optimizer state (new nu 0, or all of Adam's state reset) or the learning rate after
growth (MSG's rewind to the peak, or the run's decayed rate going on). Every run is evaluated on one validation set
(prose and code) at one sequence length.

Writes DIR/growth_ablations.json (per recipe and seed: final validation loss, the loss jump right after growth; per
recipe: mean and spread), DIR/growth_ablations.md (the table) and DIR/growth_ablations.png. The differences between
recipes mean something only where they exceed the spread between seeds, which the table states.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python experiments/growth_ablations.py): the repository is the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flm_jax import cli  # noqa: E402
from flm_jax.growth import GrowthSpec  # noqa: E402
from flm_jax.growth.harness import (  # noqa: E402
    Recipe,
    Stage,
    experiment_data,
    experiment_flags,
    mean_and_spread,
    run_schedule,
)
from flm_jax.optim import OptimizerConfig  # noqa: E402
from flm_jax.training.short_runs import proxy_config  # noqa: E402

# (source width, source layers, head_dim, seq_len, batch, source steps, grown steps, ramp steps, eval batches)
SETTINGS = {
    "quick": dict(width=64, layers=4, head_dim=32, seq_len=64, batch=8, steps1=200, steps2=100, ramp=10, evals=2),
    "full": dict(width=64, layers=4, head_dim=32, seq_len=64, batch=8, steps1=300, steps2=150, ramp=20, evals=4),
    # Seconds: every code path once (the tests run it); its numbers mean nothing.
    "smoke": dict(width=32, layers=2, head_dim=16, seq_len=32, batch=4, steps1=8, steps2=8, ramp=4, evals=1),
}
PEAK_LR = 3e-3  # the tiny model's tuned rate (gin/experiments/tiny_pretrain.gin); μP carries it to the grown model


def recipes(ramp: int) -> dict[str, tuple[dict, Recipe]]:
    """name -> (GrowthSpec fields over the base recipe's, Recipe)."""
    base = Recipe()
    return {
        "base (msg sublayer, even, mean nu, rewarm)": ({}, base),
        "layers: stack": ({"layer_strategy": "stack"}, base),
        "layers: interleave": ({"layer_strategy": "interleave"}, base),
        "layers: distance": ({"layer_strategy": "distance"}, base),
        "operator: msg block form": ({"msg_form": "block"}, base),
        "operator: exact zero padding": ({"mode": "exact"}, base),
        "operator: duplication + noise": (
            {
                "mode": "exact",
                "hidden_method": "duplicate",
                "heads_method": "duplicate",
                "ffn_method": "duplicate",
                "duplicate_noise": 2e-3,
            },
            base,
        ),
        f"ramp: {ramp // 4} steps": ({"ramp_steps": max(ramp // 4, 1)}, base),
        f"ramp: {ramp * 4} steps": ({"ramp_steps": ramp * 4}, base),
        "optimizer: new nu 0": ({}, dataclasses.replace(base, opt_policy="copied_zero")),
        "optimizer: reset": ({}, dataclasses.replace(base, opt_policy="reset")),
        "lr: rewind to peak": ({}, dataclasses.replace(base, lr_policy="rewind")),
        "lr: continue decayed": ({}, dataclasses.replace(base, lr_policy="continue")),
        # The two changes that won alone (a first run of this table), together: the shipped default.
        "combined: distance + new nu 0": (
            {"layer_strategy": "distance"},
            dataclasses.replace(base, opt_policy="copied_zero"),
        ),
    }


def ablate(setting: dict, seeds: int, only: list[str] = ()) -> dict:
    """Every recipe (or those whose names contain a word of `only`; the base recipe always runs) on `seeds` seeds."""
    s = setting
    small = proxy_config(s["width"], s["width"], s["layers"], s["head_dim"], s["seq_len"])
    target = dict(
        hidden_size=2 * small.hidden_size,
        num_attention_heads=2 * small.num_attention_heads,
        intermediate_size=2 * small.intermediate_size,
        num_hidden_layers=small.num_hidden_layers * 3 // 2,
        mode="msg",
        layer_strategy="even",
        ramp_steps=s["ramp"],
    )
    total = s["steps1"] + s["steps2"]
    # One schedule over both stages: the rate the small model trains with is the scratch run's, whatever follows.
    optimizer = OptimizerConfig(peak_learning_rate=PEAK_LR, warmup_steps=20, schedule="cosine", decay_steps=total - 20)
    chosen = {
        name: recipe
        for i, (name, recipe) in enumerate(recipes(s["ramp"]).items())
        if i == 0 or not only or any(word in name for word in only)
    }
    table = {name: {"final": [], "jump": [], "seconds": []} for name in chosen}
    every = min(25, s["steps2"])
    curves = {}
    for seed in range(seeds):
        train_batch, eval_batches = experiment_data(s["batch"], s["seq_len"], total, s["evals"], seed)
        _, trained = run_schedule(small, [Stage(s["steps1"])], optimizer, train_batch, eval_batches, every, seed)
        print(f"seed {seed}: small model {trained['curve'].final_loss:.4f} at step {s['steps1']}", flush=True)
        for name, (fields, recipe) in chosen.items():
            started = time.time()
            spec = GrowthSpec(**{**target, **fields}, seed=seed)
            curve, _ = run_schedule(
                small, [Stage(s["steps2"], spec)], optimizer, train_batch, eval_batches, every, seed, recipe, trained
            )
            row = table[name]
            row["final"].append(curve.final_loss)
            row["jump"].append(curve.growths[0]["jump"])
            row["seconds"].append(time.time() - started)
            if seed == 0:
                curves[name] = {"steps": curve.steps, "val_loss": curve.val_loss}
            print(f"  {name}: final {curve.final_loss:.4f}, jump {curve.growths[0]['jump']:+.4f}", flush=True)
    summary, base = {}, next(iter(table.values()))
    for name, row in table.items():
        final, final_spread = mean_and_spread(row["final"])
        jump, jump_spread = mean_and_spread(row["jump"])
        # Paired with the base recipe on the same seed (the same small model and data): what the recipe changes.
        gain, gain_spread = mean_and_spread([a - b for a, b in zip(row["final"], base["final"])])
        summary[name] = {
            "final_loss": final,
            "final_loss_std": final_spread,
            "vs_base": gain,
            "vs_base_std": gain_spread,
            "jump": jump,
            "jump_std": jump_spread,
            "per_seed": row,
        }
    best = min(summary, key=lambda n: summary[n]["final_loss"])
    return {"setting": setting, "seeds": seeds, "peak_lr": PEAK_LR, "recipes": summary, "best": best, "curves": curves}


def markdown(result: dict) -> str:
    lines = [
        f"Growth ablations ({result['seeds']} seeds; mean ± standard deviation between seeds). 'vs base' is the"
        " difference to the base recipe on the same seed (same small model, same data), the measure of what a recipe"
        " changes; the spread of the final loss itself is mostly the seeds' common part.",
        "",
        "| recipe | final val loss | vs base (same seed) | loss jump after growth |",
        "|---|---|---|---|",
    ]
    for name, r in sorted(result["recipes"].items(), key=lambda kv: kv[1]["final_loss"]):
        lines.append(
            f"| {name} | {r['final_loss']:.4f} ± {r['final_loss_std']:.4f} | "
            f"{r['vs_base']:+.4f} ± {r['vs_base_std']:.4f} | {r['jump']:+.4f} ± {r['jump_std']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(14, 5))
    items = sorted(result["recipes"].items(), key=lambda kv: kv[1]["vs_base"])
    bars.barh(
        [n for n, _ in items],
        [r["vs_base"] for _, r in items],
        xerr=[r["vs_base_std"] for _, r in items],
        color=["tab:green" if r["vs_base"] < 0 else "tab:red" for _, r in items],
    )
    bars.axvline(0, color="black", lw=0.8)
    bars.set(xlabel="final validation loss - base recipe's, same seed (mean ± std over seeds)")
    bars.invert_yaxis()
    bars.tick_params(axis="y", labelsize=8)
    grown_from = result["setting"]["steps1"]
    for name, curve in result["curves"].items():
        points = [(s, v) for s, v in zip(curve["steps"], curve["val_loss"]) if s >= grown_from]
        lines.plot(*zip(*points), label=name, lw=1)
    lines.set(xlabel="step", ylabel="validation loss", title=f"after growth at step {grown_from} (seed 0)")
    lines.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    def add_flags(p):
        p.add_argument("--seeds", type=int, default=3, help="seeds per recipe")
        p.add_argument("--only", default="", help="comma-separated words: run the recipes whose names contain one")

    args = experiment_flags(__doc__.split("\n")[0], add_flags)
    started = time.time()
    result = ablate(SETTINGS[args.setting], 1 if args.smoke else args.seeds, [w for w in args.only.split(",") if w])
    result["wall_seconds"] = time.time() - started
    (args.out / "growth_ablations.json").write_text(json.dumps(result, indent=1))
    (args.out / "growth_ablations.md").write_text(markdown(result))
    plot(result, args.out / "growth_ablations.png")
    print(markdown(result))
    print(f"best: {result['best']}; {result['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    cli.run_tool("growth_ablations", main)
