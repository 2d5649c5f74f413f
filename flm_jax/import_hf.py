"""Import Hugging Face weights: `python -m flm_jax.import_hf --hf_dir=HF_DIR --workdir=DIR`.

Writes DIR/checkpoints/0 and DIR/config.gin (flm_jax.hf.importer), so `python -m flm_jax.train --workdir=DIR`
continues from it. Runtime settings (TeleFLMConfig.dtype, param_dtype, remat_policy, attention_impl) and the mesh
come from --gin_file/--gin.X; the model's shape and μP fields come from the folder (see docs/export.md).
"""

from __future__ import annotations

import jax

import gin
from flm_jax import cli
from flm_jax.config import RUNTIME_FIELDS
from flm_jax.files import atomic_write_text
from flm_jax.hf.importer import import_hf
from flm_jax.partitioning import MeshLayout
from flm_jax.paths import as_path
from flm_jax.training.checkpoint import CONFIG_GIN, config_gin_with_model


def runtime_bindings() -> dict:
    """The TeleFLMConfig runtime fields that gin binds (the rest of the model comes from the folder)."""
    bound = {}
    for field in RUNTIME_FIELDS:
        try:
            bound[field] = gin.query_parameter(f"TeleFLMConfig.{field}")
        except ValueError:  # not bound: the TeleFLMConfig default
            pass
    return bound


def main(argv=None) -> None:
    p = cli.parser(__doc__.split("\n")[0])
    p.add_argument("--hf_dir", required=True, help="Hugging Face folder (config.json + weights)")
    p.add_argument("--workdir", required=True, help="new flm_jax workdir to write")
    p.add_argument(
        "--use_mup",
        type=cli.boolean,
        default=None,
        help="llama layout: true unfolds μP multipliers, false keeps a plain model (default: what config.json records)",
    )
    p.add_argument("--input_mult", type=float, default=None)
    p.add_argument("--output_mult", type=float, default=None)
    p.add_argument("--mup_scale_factor", type=float, default=None)
    cli.add_distributed_flags(p)
    args = cli.parse(p, argv, reads_data=False)
    cli.init_distributed(args)
    layout = cli.configured(MeshLayout)
    config = import_hf(
        args.hf_dir,
        args.workdir,
        layout,
        runtime_bindings(),
        args.use_mup,
        args.input_mult,
        args.output_mult,
        args.mup_scale_factor,
    )

    if jax.process_index() == 0:
        atomic_write_text(
            as_path(args.workdir) / CONFIG_GIN,
            config_gin_with_model(gin.config_str(), config, f"Imported by flm_jax.import_hf from {args.hf_dir}"),
        )
    print(
        f"Imported {args.hf_dir} into {args.workdir}/checkpoints/0 ({config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}, use_mup={config.use_mup}).",
        flush=True,
    )


if __name__ == "__main__":
    cli.run_tool("import_hf", main)
