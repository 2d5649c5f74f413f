"""Fine-tuning runs start from another workdir's parameters (TrainConfig.init_from): pretrained, grown, mid-ramp."""

import json
import shutil

import numpy as np
import pytest

from flm_jax.cli import REPO_ROOT
from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.growth.fold import GrowthRampError
from flm_jax.model import TeleFLM
from flm_jax.partitioning import make_mesh
from flm_jax.training.checkpoint import Checkpointer
from flm_jax.training.config import TrainConfig
from flm_jax.training.init_from import source_params
from tests.helpers import MODEL, MODEL_FLAGS, SINGLE, metrics, restore, run_module, run_train

LEGACY = REPO_ROOT / "tests/fixtures/legacy_grown_workdir"
TOKENS = np.arange(3, 35, dtype=np.int32).reshape(2, 16)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrained")
    run_train(workdir, TrainConfig(steps=2, batch_size=8, seq_len=32, eval_tasks=()))
    return workdir


def logits(config, params):
    return np.asarray(TeleFLM(config).apply({"params": params}, TOKENS))


def test_a_larger_vocabulary_keeps_every_old_logit(pretrained):
    bigger = MODEL.replace(vocab_size=2176)  # room for chat markers, a multiple of 128
    config, params, provenance = source_params(pretrained, bigger, make_mesh(SINGLE), SINGLE)
    assert config == bigger and provenance["initialized_from"]["step"] == 2
    source = restore(pretrained)[0]["params"]
    new = logits(config, params)
    np.testing.assert_array_equal(new[..., :2048], logits(MODEL, source))
    assert not new[..., 2048:].any()  # new tokens' head columns start at zero


def test_fine_tuning_starts_at_step_0_with_a_fresh_optimizer_and_resumes(pretrained, tmp_path):
    run = TrainConfig(
        steps=3, batch_size=8, seq_len=32, eval_tasks=(), log_every=1, init_from=str(pretrained), checkpoint_every=2
    )
    bigger = MODEL.replace(vocab_size=2176)
    run_train(tmp_path, run, model=bigger, until_step=2)
    run_train(tmp_path, run, model=bigger)  # resumes from its own checkpoint, not from the source
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]
    ckpt = Checkpointer(tmp_path)
    assert ckpt.metadata(3)["initialized_from"] == {"workdir": str(pretrained), "step": 2}
    ckpt.close()
    state = restore(tmp_path, model=bigger)[0]
    assert int(state["step"]) == 3


def test_a_grown_checkpoint_at_mask_0_is_folded_and_one_mid_ramp_is_refused(tmp_path):
    """The legacy fixture is an MSG-grown model at mask 0 (d 16 -> 32): fine-tuning starts from the function it
    computes, the source's; the same checkpoint half-way through its ramp is refused with the reason."""
    grown = json.loads((LEGACY / "checkpoints/2/metadata/metadata").read_text())["model_config"]
    config = TeleFLMConfig.from_dict(grown)
    folded, _, _ = source_params(LEGACY, config, make_mesh(SINGLE), SINGLE)
    assert folded.rms_norm_scale == pytest.approx(0.5**0.5) and folded.rms_norm_eps == pytest.approx(0.5e-5)
    ramping = tmp_path / "ramping"
    shutil.copytree(LEGACY, ramping)
    meta_path = ramping / "checkpoints/2/metadata/metadata"
    meta = json.loads(meta_path.read_text())
    meta["growth"]["start_step"] = 0  # step 2 of a 4-step ramp: mask 0.5
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(GrowthRampError, match=r"middle of a growth mask ramp \(mask 0.5\)"):
        source_params(ramping, config, make_mesh(SINGLE), SINGLE)


def test_another_architecture_is_refused_naming_the_fields(pretrained):
    with pytest.raises(ConfigError, match=r"hidden_size: checkpoint 64 vs config 128"):
        source_params(pretrained, MODEL.replace(hidden_size=128), make_mesh(SINGLE), SINGLE)
    with pytest.raises(ConfigError, match=r"vocab_size: checkpoint 2048 vs config 1024"):
        source_params(pretrained, MODEL.replace(vocab_size=1024), make_mesh(SINGLE), SINGLE)
    with pytest.raises(FileNotFoundError, match="has no checkpoints/"):
        source_params(pretrained / "nowhere", MODEL, make_mesh(SINGLE), SINGLE)


def test_the_sft_gin_file_fine_tunes_a_workdir_into_a_chat_model_that_chats_and_is_scored(tmp_path):
    """gin/sft/tiny_sft.gin end to end on a small model: fine-tune from a pretrained workdir on flm_instructions,
    then `generate --chat` and `evaluate` exact match, whose accuracy is checked on references made from the
    model's own greedy answers (one right, one wrong)."""
    source_model = MODEL.replace(max_position_embeddings=128)  # the instruction records need 128 positions
    run_train(tmp_path / "pre", TrainConfig(steps=1, batch_size=8, seq_len=32, eval_tasks=()), model=source_model)
    shape = [f for f in MODEL_FLAGS if "max_position_embeddings" not in f and "vocab_size" not in f]
    out = run_module(
        "flm_jax.train",
        "--gin_file=gin/sft/tiny_sft.gin",
        f"--workdir={tmp_path / 'sft'}",
        *shape,
        "--gin.TeleFLMConfig.max_position_embeddings=128",
        f"--gin.TrainConfig.init_from='{tmp_path / 'pre'}'",
        "--gin.TrainConfig.steps=2",
        "--gin.TrainConfig.log_every=1",
        env={"XLA_FLAGS": ""},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    logged = metrics(tmp_path / "sft")
    assert [m["step"] for m in logged] == [1, 2] and np.isfinite(logged[-1]["val_loss/flm_instructions"])
    assert Checkpointer(tmp_path / "sft").metadata(2)["model_config"]["vocab_size"] == 2176

    from flm_jax import evaluate as evaluate_mod

    questions = ["What is 2 + 3?", "Copy this word: shepherd"]
    argv = [f"--workdir={tmp_path / 'sft'}", "--chat", "--json", "--max_new_tokens=48"]  # as exact_match
    out = run_module("flm_jax.generate", *argv, *[f"--prompt={q}" for q in questions], env={"XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    answers = [json.loads(line)["text"] for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 2
    chat = tmp_path / "chat.jsonl"
    references = [answers[0], answers[1] + " (not what the model says)"]
    chat.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r}]}) + "\n"
            for q, r in zip(questions, references)
        )
    )
    evaluate_mod.main(
        [
            f"--workdir={tmp_path / 'sft'}",
            f"--out={tmp_path / 'e.json'}",
            f"--chat_file={chat}",
            "--mixture=flm_instructions",
            "--seq_len=128",
            "--batch_size=32",
        ]
    )
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["exact_match"][str(chat)]["count"] == 2
    assert result["exact_match"][str(chat)]["accuracy"] == 0.5
    assert result["domains"]["flm_instructions"]["bytes"] > 0
