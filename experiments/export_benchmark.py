"""Export time and peak host memory against checkpoint size, for a ~110M-parameter model.

    python -m experiments.export_benchmark --out runs/export_benchmark

Writes a randomly initialised μP checkpoint (params + Adam state, saved with flm_jax.training.checkpoint's
one-layer chunks), then runs `python -m flm_jax.export` in fresh processes (llama float32, llama bfloat16, teleflm
float32) and reads each one's peak RSS from its own report. For scale it also measures, in fresh processes, the RSS
of the imports alone and of reading every parameter into memory at once (what a non-streaming export would hold),
and the cost of one-layer reads. Writes OUT/export_benchmark.json. `weights_s` / `peak_rss_before_tokenizer_mib`:
the streamed weights alone; `export_s` / `peak_rss_mib` add the tokenizer step (which imports transformers and
torch).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from flm_jax import cli
from flm_jax.config import TeleFLMConfig

REPO = Path(__file__).resolve().parent.parent

CONFIG = TeleFLMConfig(
    vocab_size=16384,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=2048,
    use_mup=True,
    output_mult=0.5,
    mup_scale_factor=3.0,
    remat_policy="none",
)

RSS_SNIPPET = "from flm_jax.hf.export import peak_rss_mib; print('PEAK_RSS_MIB', peak_rss_mib())"


def write_checkpoint(workdir: Path) -> float:
    import jax

    from flm_jax.optim import OptimizerConfig
    from flm_jax.params import init_params
    from flm_jax.partitioning import MeshLayout, make_mesh
    from flm_jax.training.checkpoint import Checkpointer, make_metadata
    from flm_jax.training.state import StateSpec, init_state

    start = time.time()
    layout = MeshLayout()
    mesh = make_mesh(layout)
    spec = StateSpec.build(CONFIG, OptimizerConfig(), mesh, layout, total_steps=1)
    state = init_state(init_params(CONFIG, mesh, layout, jax.random.key(0)), spec.tx, spec.shardings)
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(0, state, {}, make_metadata(CONFIG), force=True)
    ckpt.close()
    return time.time() - start


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(args: list[str]) -> tuple[float, str]:
    start = time.time()
    out = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return time.time() - start, out.stdout


def peak_from(stdout: str, pattern: str) -> float:
    return float(re.findall(pattern, stdout)[-1])


def layer_read_costs(workdir: Path) -> dict:
    from flm_jax.training.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(workdir)
    path = ("layers", "mlp", "up_proj")
    start = time.time()
    reader.read_layer(path, CONFIG.num_hidden_layers // 2)
    single = time.time() - start
    start = time.time()
    for i in range(CONFIG.num_hidden_layers):
        reader.read_layer(path, i)
    one_by_one = time.time() - start
    start = time.time()
    reader.read(path)
    whole = time.time() - start
    return {
        "array": "layers/mlp/up_proj",
        "one_layer_chunks": reader.layer_chunked(path),
        "one_layer_s": single,
        "all_layers_one_at_a_time_s": one_by_one,
        "whole_array_s": whole,
    }


def main() -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/export_benchmark")
    args = cli.parse(p)
    out = Path(args.out).resolve()
    workdir = out / "workdir"
    made = None if (workdir / "checkpoints").is_dir() else write_checkpoint(workdir)
    params = CONFIG.params_total()
    one_layer = CONFIG.params_per_layer() * 4
    result = {
        "config": CONFIG.to_dict(),
        "params": params,
        "params_float32_mib": params * 4 / 2**20,
        "one_layer_float32_mib": one_layer / 2**20,
        "embedding_float32_mib": CONFIG.params_embedding() * 4 / 2**20,
        "checkpoint_on_disk_mib": dir_bytes(workdir / "checkpoints") / 2**20,
        "checkpoint_write_s": made,
        "cpu_count": os.cpu_count(),
        "layer_reads": layer_read_costs(workdir),
    }
    _, stdout = run(["-c", "import flm_jax.export, flm_jax.training.checkpoint_reader; " + RSS_SNIPPET])
    result["imports_only_peak_rss_mib"] = peak_from(stdout, r"PEAK_RSS_MIB ([0-9.]+)")
    _, stdout = run(["-c", "import flm_jax.export; from transformers import AutoTokenizer; " + RSS_SNIPPET])
    result["imports_with_transformers_peak_rss_mib"] = peak_from(stdout, r"PEAK_RSS_MIB ([0-9.]+)")
    _, stdout = run(
        [
            "-c",
            "from flm_jax.training.checkpoint_reader import CheckpointReader, read_params; "
            f"tree = read_params(CheckpointReader({str(workdir)!r})); " + RSS_SNIPPET,
        ]
    )
    result["all_params_in_memory_peak_rss_mib"] = peak_from(stdout, r"PEAK_RSS_MIB ([0-9.]+)")

    result["exports"] = []
    for fmt, dtype in (("llama", "float32"), ("llama", "bfloat16"), ("teleflm", "float32")):
        hf_dir = out / f"hf_{fmt}_{dtype}"
        wall, stdout = run(
            [
                "-m",
                "flm_jax.export",
                f"--workdir={workdir}",
                f"--out={hf_dir}",
                f"--format={fmt}",
                f"--dtype={dtype}",
                "--overwrite",
            ]
        )
        entry = {
            "format": fmt,
            "dtype": dtype,
            "process_wall_s": wall,
            "export_s": peak_from(stdout, r"done in ([0-9.]+) s"),
            "peak_rss_mib": peak_from(stdout, r"peak RSS +([0-9.]+) MiB"),
            "weights_s": peak_from(stdout, r"head written +([0-9.]+) s"),
            "peak_rss_before_tokenizer_mib": peak_from(stdout, r"head written .* peak RSS +([0-9.]+) MiB"),
            "output_mib": sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) / 2**20,
        }
        result["exports"].append(entry)
        print(json.dumps(entry), flush=True)
    (out / "export_benchmark.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "exports")}, indent=1))


if __name__ == "__main__":
    cli.run_tool("export_benchmark", main)
