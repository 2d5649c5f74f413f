"""TeleFLMConfig validation, the released sizes through `flm_jax.plan`, and every shipped gin file."""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import gin
from flm_jax import hugepages
from flm_jax.cli import REPO_ROOT
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.optim import OptimizerConfig
from flm_jax.params import boxed_abstract_params, count_params
from flm_jax.partitioning import MeshLayout
from flm_jax.planning import make_plan
from flm_jax.topology import parse_slice
from flm_jax.training.config import TrainConfig
from tests.helpers import MODEL, run_module


def run_plan(*args):
    return run_module("flm_jax.plan", *args, timeout=120)


@pytest.mark.parametrize("model, expected, tolerance", [("52b", 52.85e9, 0.005), ("1t", 1.084e12, 0.01)])
def test_plan_json_matches_released_parameter_counts(model, expected, tolerance):
    out = run_plan(f"--gin_file=gin/models/{model}.gin", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert abs(plan["params_total"] - expected) / expected < tolerance, plan["params_total"]
    assert plan["params_total"] == plan["params_formula"]  # eval_shape of the model agrees with the formula


def test_plan_on_a_pod_mesh_splits_memory_and_says_whether_it_fits():
    gin.parse_config_files_and_bindings(
        [str(REPO_ROOT / "gin/models/1t.gin"), str(REPO_ROOT / "gin/meshes/h100_1024.gin")], []
    )
    plan = make_plan(TeleFLMConfig(), MeshLayout())
    assert plan["num_devices"] == 1024 and plan["mesh"] == {"data": 1, "fsdp": 128, "tensor": 8}
    # Every matrix is split 1024 ways; only norm gains (replicated) keep the per-device count above total/1024.
    assert plan["params_total"] / 1024 < plan["params_per_device"] < plan["params_total"] / 1024 * 1.01
    assert plan["bytes_per_device"]["optimizer"] == 8 * plan["params_per_device"]
    assert plan["fits"] is True and plan["total_gib_per_device"] < 79
    tight = make_plan(TeleFLMConfig(), MeshLayout(), batch_size=1024)  # 8 sequences per device, no microbatching
    assert tight["bytes_per_device"]["saved_layers"] == 8 * plan["bytes_per_device"]["saved_layers"]
    assert tight["fits"] is False


def test_bad_config_fails_at_startup_naming_the_field():
    with pytest.raises(ConfigError, match=r"hidden_size=100 is not divisible by num_attention_heads=3"):
        MODEL.replace(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ConfigError, match=r"num_attention_heads=8 is not divisible by num_key_value_heads=3"):
        MODEL.replace(hidden_size=512, num_attention_heads=8, num_key_value_heads=3)
    with pytest.raises(ConfigError, match=r"remat_policy='sometimes'"):
        MODEL.replace(remat_policy="sometimes")
    out = run_plan("--gin_file=gin/models/52b.gin", "--gin.TeleFLMConfig.num_attention_heads=60")
    assert out.returncode != 0
    assert "hidden_size=8192 is not divisible by num_attention_heads=60" in out.stderr
    out = run_plan(
        "--gin_file=gin/models/52b.gin",
        "--gin_file=gin/meshes/h100_1024.gin",
        "--gin.TeleFLMConfig.num_attention_heads=4",
        "--gin.TeleFLMConfig.num_key_value_heads=4",
    )  # 4 heads cannot split 8 ways
    assert out.returncode != 0
    assert re.search(r"logical axis '(kv_)?heads', size 4\).*TeleFLMConfig\.num_\w+_heads a multiple of 8", out.stderr)


def test_counts_and_flops():
    cfg = TeleFLMConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    assert count_params(boxed_abstract_params(cfg)) == cfg.params_total()
    matmul = cfg.params_total() - 100 * 64 - (2 * 3 + 1) * 64
    assert cfg.flops_per_token(32) == 6 * matmul + 12 * 3 * 4 * 16 * 32


GROWTH_SOURCES = {  # growth gin -> ([source model gin, earlier growth gins...], target model gin or None)
    "52b_to_102b.gin": (["gin/models/52b.gin"], "gin/models/102b.gin"),
    "102b_to_1t.gin": (["gin/models/102b.gin"], "gin/models/1t.gin"),
    "tiny_52b_to_102b.gin": (["gin/experiments/tiny_pretrain.gin"], None),
    "tiny_102b_to_1t.gin": (["gin/experiments/tiny_pretrain.gin", "gin/growth/tiny_52b_to_102b.gin"], None),
}
GIN_FILES = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "gin").rglob("*.gin"))


@pytest.mark.parametrize("path", GIN_FILES)
def test_every_shipped_gin_file_parses_and_builds_abstractly(path):
    folder = Path(path).parts[1]
    if folder == "models":
        gin.parse_config_file(str(REPO_ROOT / path))
        if Path(path).name == "base.gin":  # numerics every size shares; the shape comes from a model file
            with pytest.raises(RuntimeError, match="Required bindings for `TeleFLMConfig`"):
                TeleFLMConfig()
            return
        abstract = boxed_abstract_params(TeleFLMConfig())  # jax.eval_shape: no memory
        assert count_params(abstract) == TeleFLMConfig().params_total()
    elif folder == "meshes":
        if Path(path).name == "rules.gin":  # included by every mesh file
            gin.parse_config_file(str(REPO_ROOT / path))
            assert dict(MeshLayout().rules)["embed"] == ("fsdp",)
            return
        gin.parse_config_files_and_bindings([str(REPO_ROOT / "gin/models/52b.gin"), str(REPO_ROOT / path)], [])
        layout = MeshLayout()
        devices = layout.num_devices or (8 if -1 in layout.mesh_shape.values() else None)
        plan = make_plan(TeleFLMConfig(), layout, devices)
        assert plan["params_per_device"] * plan["num_devices"] >= plan["params_total"]
    elif folder == "experiments":  # a whole run's config: model, mesh, training and optimizer settings
        gin.parse_config_file(str(REPO_ROOT / path))
        cfg, run = TeleFLMConfig(), TrainConfig()
        assert OptimizerConfig().peak_learning_rate > 0 and run.seq_len <= cfg.max_position_embeddings
        plan = make_plan(
            cfg, MeshLayout(), batch_size=run.batch_size, seq_len=run.seq_len, num_microbatches=run.num_microbatches
        )
        assert plan["params_total"] == cfg.params_total()
    elif folder == "sft":  # a fine-tuning run: the model holds the data's vocabulary and starts from a workdir
        from flm_jax import data

        gin.parse_config_file(str(REPO_ROOT / path))
        cfg, run = TeleFLMConfig(), TrainConfig()
        assert run.init_from and cfg.vocab_size >= data.required_vocab_size(run.mixture)
        assert OptimizerConfig().schedule == "linear" and run.seq_len <= cfg.max_position_embeddings
    elif folder == "growth":  # the source model grows into the target shape, planned abstractly
        from flm_jax.growth import GrowthSpec, target_config

        (source, *earlier), target = GROWTH_SOURCES[Path(path).name]
        gin.parse_config_file(str(REPO_ROOT / source))
        src = TeleFLMConfig()
        for growth in earlier:  # a chain of stages: each grows the previous result
            gin.clear_config()
            gin.parse_config_file(str(REPO_ROOT / growth))
            src = target_config(src, GrowthSpec())
        gin.clear_config()
        gin.parse_config_file(str(REPO_ROOT / path))
        grown = target_config(src, GrowthSpec())
        if target:
            gin.clear_config()
            gin.parse_config_file(str(REPO_ROOT / target))
            for field in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers", "vocab_size"):
                assert getattr(grown, field) == getattr(TeleFLMConfig(), field), field
        assert grown.head_dim == src.head_dim
        plan = make_plan(grown, MeshLayout())
        assert plan["params_total"] == grown.params_total() > src.params_total()
    elif folder == "schedules":  # every stage's files exist and the growth chain is valid from stage 1's model
        from flm_jax.growth import GrowthSpec, target_config
        from flm_jax.growth.schedule import stages

        if len(Path(path).parts) > 3:  # a stage's own training settings (checked below with its schedule)
            gin.parse_config_file(str(REPO_ROOT / path))
            assert TrainConfig().steps > 0 and OptimizerConfig().peak_learning_rate > 0
            return
        gin.parse_config_file(str(REPO_ROOT / path))
        plan = stages()
        assert [s["steps"] for s in plan] == sorted({s["steps"] for s in plan})  # the step count runs on
        gin.clear_config()
        for f in plan[0]["gin_files"]:
            gin.parse_config_file(str(REPO_ROOT / f))
        config = TeleFLMConfig()
        for stage in plan[1:]:
            gin.clear_config()
            gin.parse_config_file(str(REPO_ROOT / stage["growth"]))
            config = target_config(config, GrowthSpec())
            gin.clear_config()
            for f in stage["gin_files"]:  # the stage trains the grown model with these settings
                gin.parse_config_file(str(REPO_ROOT / f))
            assert TrainConfig().seq_len <= config.max_position_embeddings
        assert config.params_total() > 10 * 4_000_000
    elif folder == "sweeps":  # configs of the experiment scripts that define their configurables
        scripts = {"mup_transfer_full.gin": "mup_transfer", "loss_prediction_full.gin": "loss_prediction"}
        script = scripts[Path(path).name]
        module = importlib.import_module(f"experiments.{script}")
        gin.parse_config_file(str(REPO_ROOT / path))
        sweep = {"mup_transfer": "TransferSweep", "loss_prediction": "PredictionSweep"}[script]
        assert getattr(module, sweep)() != module.QUICK  # the file's values took effect
    else:
        pytest.fail(f"no abstract build check for gin/{folder}/: add one to this test")
    jax.clear_caches()


def test_a_plan_without_a_model_stops_with_the_fix_and_no_traceback():
    out = run_plan("--gin_file=gin/meshes/h100_1024.gin")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "plan: Required bindings for `TeleFLMConfig`" in out.stderr and "gin/models/tiny.gin" in out.stderr
    out = run_plan("--gin_file=gin/models/missing.gin")
    assert out.returncode == 2 and "gin file 'gin/models/missing.gin' not found" in out.stderr


def test_tools_that_never_read_data_parse_run_configs_without_tensorflow():
    """plan, export and import_hf parse a whole experiment config (TrainConfig, data registration) without
    importing TensorFlow; flm_jax.cli's list of data configurables is flm_jax.data's."""
    code = (
        "import sys; from flm_jax import cli, export, import_hf, plan; "
        "cli.load_gin(['gin/experiments/tiny_pretrain.gin'], ['register_tasks.registrations = ()'], "
        "reads_data=False); print(sorted(m for m in sys.modules if m.startswith('tensorflow')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    import flm_jax.data.tasks as tasks
    from flm_jax.cli import DATA_CONFIGURABLES

    registered = {name for name in dir(tasks) if name.startswith("register_")}
    assert set(DATA_CONFIGURABLES) == registered


def test_tpu_slice_names_give_chips_torus_and_hosts():
    assert parse_slice("v5p-2048").shape == (8, 8, 16)  # v5p names count TensorCores: 1024 chips
    assert (parse_slice("v5p-128").num_chips, parse_slice("v5p-128").num_hosts) == (64, 16)
    assert parse_slice("v5e-256").topology_name == "v5e:16x16" and parse_slice("v5e-256").chip.hbm_gib == 16.0
    assert parse_slice("v5litepod-16").num_chips == 16
    assert parse_slice("v6e-8").host_bounds == (2, 4, 1)  # one host of 8 chips
    assert parse_slice("v5p:4x4x4").num_chips == 64
    with pytest.raises(ConfigError, match=r"standard slices are v5p-8, v5p-16"):
        parse_slice("v5p-100")
    with pytest.raises(ConfigError, match=r"Unknown TPU slice 'h100-8'"):
        parse_slice("h100-8")
    with pytest.raises(ConfigError, match=r"3-dimensional"):
        parse_slice("v5p:4x4")


def test_plan_compile_needs_a_slice():
    out = run_plan("--gin_file=gin/models/tiny.gin", "--gin_file=gin/meshes/fsdp_tp.gin", "--compile")
    assert out.returncode == 2 and "names no TPU slice: pass --topology" in out.stderr, out.stderr


def test_command_lines_restart_with_huge_pages_unless_the_tunable_is_set(monkeypatch):
    """`python -m flm_jax.<tool>` re-executes itself with glibc.malloc.hugetlb=1 where THP is on madvise
    (flm_jax/hugepages.py); a tunable the user set is kept as it is."""
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    expected = "glibc.malloc.hugetlb=1" if hugepages.wanted() else ""
    assert run_module("flm_jax.hugepages").stdout.strip() == expected
    kept = run_module("flm_jax.hugepages", env={"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert kept.stdout.strip() == "glibc.malloc.hugetlb=0"
