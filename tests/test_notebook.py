"""notebooks/inspect_pytrees.ipynb runs headless and produces the right numbers; read_train_state opens a checkpoint
with no gin config and no mesh."""

import json
import math
import os

import jax
import nbformat
import numpy as np
from nbclient import NotebookClient

import gin
from flm_jax.cli import REPO_ROOT
from flm_jax.growth import GrowthSpec, target_config
from flm_jax.inspection import adam_moments, leaf_table
from flm_jax.training.checkpoint_reader import CheckpointReader, param_logical_axes, read_params, read_train_state
from flm_jax.training.config import TrainConfig
from tests.helpers import MODEL, assert_trees_equal, restore, run_train

NOTEBOOK = REPO_ROOT / "notebooks" / "inspect_pytrees.ipynb"


def test_read_train_state_opens_a_checkpoint_with_no_gin_and_no_mesh(tmp_path):
    run_train(tmp_path, TrainConfig(steps=2, batch_size=8, seq_len=32, eval_tasks=(), checkpoint_every=1))
    saved, _, _ = restore(tmp_path)  # what training saved, restored the way train() resumes it
    gin.clear_config()
    gin.parse_config('MeshLayout.mesh_shape = {"fsdp": 2, "tensor": 4}')  # a mesh bound in the process: ignored
    config, state, metadata = read_train_state(tmp_path)
    assert config == MODEL and metadata["model_config"] == MODEL.to_dict() and int(state["step"]) == 2
    assert_trees_equal(state["params"], saved["params"])
    assert_trees_equal(state["opt_state"], saved["opt_state"])
    assert_trees_equal(state["params"], read_params(CheckpointReader(tmp_path)))  # tensorstore, not orbax
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert all(x.sharding == device for x in jax.tree_util.tree_leaves(state))
    _, first, _ = read_train_state(tmp_path, step=1)
    assert int(first["step"]) == 1 and int(adam_moments(first["opt_state"])["count"]) == 1
    assert not np.array_equal(first["params"]["lm_head"], state["params"]["lm_head"])

    rows = {r["path"]: r for r in leaf_table(state["params"], param_logical_axes(config))}
    q = rows["layers/self_attn/q_proj"]
    assert q["logical_axes"] == ("layers", "embed", "heads", "head_dim") and q["shape"] == (2, 64, 4, 16)
    assert q["sharding"] == f"single device {jax.devices()[0]}" and q["dtype"] == "float32"
    np.testing.assert_allclose(rows["lm_head"]["l2_norm"], np.linalg.norm(state["params"]["lm_head"]), rtol=1e-6)


def test_the_notebook_runs_headless_on_a_tiny_run_it_trains_itself(tmp_path):
    results = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "FLM_JAX_WORKDIR"}
    env.update(FLM_JAX_NOTEBOOK_RESULTS=str(results), TMPDIR=str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if a cell fails

    out = json.loads(results.read_text())
    spec = GrowthSpec(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_hidden_layers=3, mode="msg")
    target = target_config(MODEL, spec)
    assert out["step"] == 6 and out["params_total"] == MODEL.params_total()
    assert out["grown_params"] == out["grown_config_params_total"] == target.params_total() == 1_016_704
    assert sorted(new for _, new in out["layer_order"]) == [False, False, True]
    # Growth keeps every old entry of the parameters and of both moments, except μP's readout, which is scaled by
    # the width ratio (the moments by its inverse and inverse square).
    ratio = target.mup_scale_factor / MODEL.mup_scale_factor
    for kind, scale in (("params", ratio), ("mu", 1 / ratio), ("nu", 1 / ratio**2)):
        entries = out["old_entries"][kind]
        assert len(entries) == 12 and entries.pop("lm_head") == f"scaled x{scale:.4g}", kind
        assert set(entries.values()) == {"kept"}, (kind, entries)

    first, second = out["stages"]
    assert first["steps"] == [1, 2, 3, 4, 5, 6] and second["steps"] == [7, 8, 9, 10, 11, 12]
    assert second["growth_step"] == 6 and second["max_abs_dlogit"] < 1e-4
    assert all(math.isfinite(x) for x in first["losses"] + second["losses"])
    assert second["losses"][-1] < first["losses"][0]

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the loss curves
    assert sum("treescope" in o.get("data", {}).get("text/html", "") for o in outputs) >= 4  # the trees
