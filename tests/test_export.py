"""Hugging Face export and import, checked against the real consumer: transformers loads the llama export offline and
its logits, greedy tokens and tokenizer must match flm_jax's; both layouts import back bit for bit."""

import gzip
import json
import shutil
import types

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from flm_jax import cli
from flm_jax import export as export_mod
from flm_jax import generate as generate_mod
from flm_jax import import_hf as import_mod
from flm_jax.cli import REPO_ROOT
from flm_jax.config import RUNTIME_FIELDS
from flm_jax.growth.checkpoint import grow_checkpoint
from flm_jax.growth.fold import FoldedSource, GrowthRampError, plain_source
from flm_jax.growth.spec import GrowthSpec
from flm_jax.hf.export import export
from flm_jax.hf.importer import HFImportError, import_hf
from flm_jax.hf.layout import EMBED, LAYER_TENSORS
from flm_jax.hf.tokenizer import CHECK_TEXTS, default_tokenizer_path
from flm_jax.hf.weights import INDEX_FILE
from flm_jax.inference.generate import generate
from flm_jax.model import TeleFLM
from flm_jax.training.checkpoint import Checkpointer, make_metadata
from flm_jax.training.checkpoint_reader import CheckpointReader, read_params
from flm_jax.training.config import TrainConfig
from tests.helpers import MODEL, RAMP, SINGLE, assert_trees_equal, restore, run_train

# GQA and a power-of-two input multiplier on top of test_train's μP model (logits x 0.5 / 2.0): folding and
# unfolding powers of two is exact, so the llama round trip can be bitwise.
CONFIG = MODEL.replace(num_key_value_heads=2, input_mult=2.0)
RUN = TrainConfig(steps=2, batch_size=8, seq_len=32, log_every=1, eval_tasks=(), checkpoint_every=2)


def restore_state(workdir, config=CONFIG):
    return restore(workdir, model=config)


def save_copy(workdir, state, **metadata_changes):
    """The trained state saved into another workdir with changed metadata (growth state, model config)."""
    config = CONFIG.replace(**metadata_changes.pop("config", {}))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(int(state["step"]), state, {}, make_metadata(config, **metadata_changes), force=True)
    ckpt.close()


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()


def hf_logits(path, tokens):
    with torch.no_grad():
        return hf_model(path)(torch.tensor(np.asarray(tokens))).logits.numpy()


def flm_logits(params, config, tokens):
    return np.asarray(TeleFLM(config).apply({"params": params}, np.asarray(tokens)))


def safetensors_dict(folder):
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    run_train(workdir, RUN, model=CONFIG)
    state, _, _ = restore_state(workdir)
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 48))
    return types.SimpleNamespace(
        workdir=workdir,
        state=state,
        params=state["params"],
        tokens=tokens,
        logits=flm_logits(state["params"], CONFIG, tokens),
    )


@pytest.fixture(scope="module")
def llama_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama")
    export(run.workdir, out, "llama")
    return out


@pytest.fixture(scope="module")
def teleflm_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("teleflm")
    export(run.workdir, out, "teleflm")
    return out


@pytest.fixture(scope="module")
def sharded_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    export(run.workdir, out, "llama", max_shard_size="200KB", tokenizer="none")
    return out


def test_llama_export_logits_equal_flm_jax_in_transformers(run, llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    assert config["rope_theta"] == CONFIG.rope_theta and config["num_key_value_heads"] == 2
    theirs = hf_logits(llama_dir, run.tokens)
    diff = float(np.abs(theirs - run.logits).max())
    print(f"max |logit diff| flm_jax vs transformers (float32): {diff:.3g}")
    assert diff < 1e-4
    assert np.abs(run.logits).max() > 1e-2  # not trivially zero


def test_teleflm_export_equals_llama_export_after_multipliers(llama_dir, teleflm_dir):
    config = json.loads((teleflm_dir / "config.json").read_text())
    assert config["model_type"] == "TeleFLM" and config["architectures"] == ["TeleFLMForCausalLM"]
    assert {k: config[k] for k in ("use_mup", "input_mult", "output_mult", "mup_scale_factor")} == {
        "use_mup": True,
        "input_mult": 2.0,
        "output_mult": 0.5,
        "mup_scale_factor": 2.0,
    }
    tele, llama = safetensors_dict(teleflm_dir), safetensors_dict(llama_dir)
    assert sorted(tele) == sorted(llama) and len(tele) == 3 + 9 * CONFIG.num_hidden_layers
    assert "model.layers.1.self_attn.o_proj.weight" in tele and "lm_head.weight" in tele
    factors = {"model.embed_tokens.weight": np.float32(2.0), "lm_head.weight": np.float32(0.5 / 2.0)}
    for name, w in tele.items():
        np.testing.assert_array_equal(w * factors.get(name, np.float32(1)), llama[name], err_msg=name)
    assert not np.array_equal(tele["lm_head.weight"], llama["lm_head.weight"])


def test_greedy_generation_identical_in_transformers(run, llama_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir), local_files_only=True)
    prompt = tokenizer("In the beginning God created")["input_ids"]
    ours = generate(run.params, CONFIG, [prompt], 20, eos_id=CONFIG.eos_token_id, kv_cache=True)[0].tolist()
    with torch.no_grad():
        theirs = hf_model(llama_dir).generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    theirs = theirs[0, len(prompt) :].tolist()
    if CONFIG.eos_token_id in ours:  # transformers stops at EOS; flm_jax pads after it
        ours = ours[: ours.index(CONFIG.eos_token_id) + 1]
    print("greedy tokens:", ours)
    assert ours == theirs and len(ours) == 20


def test_exported_tokenizer_matches_sentencepiece(llama_dir):
    from transformers import AutoTokenizer

    from flm_jax.data import TOKENIZER_PATH, load_sentencepiece

    assert default_tokenizer_path().resolve() == REPO_ROOT.joinpath(TOKENIZER_PATH).resolve()
    tokenizer = AutoTokenizer.from_pretrained(str(llama_dir), local_files_only=True)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    sp = load_sentencepiece()
    texts = list(CHECK_TEXTS)
    for domain in ("prose", "code"):
        with gzip.open(REPO_ROOT / f"flm_jax/data/assets/{domain}.jsonl.gz", "rt", encoding="utf-8") as f:
            docs = [r["text"] for r in map(json.loads, f) if r["split"] == "validation"]
        texts += [d[:3000] for d in docs[:15]]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text[:80]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def as_bin_folder(folder, out):
    """The same model with its weights in pytorch_model.bin (tensors only: loadable with weights_only=True)."""
    out.mkdir()
    shutil.copy(folder / "config.json", out)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as st:
        torch.save({k: st.get_tensor(k) for k in st.keys()}, out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize("source", ["llama", "teleflm", "teleflm_bin"])
def test_round_trip_is_bitwise_identical(run, sharded_dir, teleflm_dir, tmp_path, source):
    # The llama side reads a sharded folder; teleflm_bin reads pytorch_model.bin through weights-only loading.
    folder = {
        "llama": sharded_dir,
        "teleflm": teleflm_dir,
        "teleflm_bin": as_bin_folder(teleflm_dir, tmp_path / "bin"),
    }[source]
    workdir = tmp_path / "work"
    config = import_hf(folder, workdir, SINGLE)
    runtime = {k: getattr(CONFIG, k) for k in RUNTIME_FIELDS}  # not in a Hugging Face folder
    assert config.replace(**runtime) == CONFIG
    state, data_state, meta = restore_state(workdir, config)
    assert_trees_equal(run.params, state["params"])
    assert int(state["step"]) == 0 and data_state == {}
    assert all(not np.any(np.asarray(x)) for x in jax.tree_util.tree_leaves(state["opt_state"]))
    assert meta["model_config"]["output_mult"] == 0.5 and meta["imported_from"]["format"] == source.split("_")[0]
    if source == "llama":  # training continues from the import (fresh data stream, fresh Adam state)
        last = run_train(workdir, TrainConfig(steps=1, batch_size=8, seq_len=32, eval_tasks=()), model=config)
        assert np.isfinite(last["loss"])
        assert Checkpointer(workdir).latest_step() == 1


def test_sharded_export_writes_an_index_and_loads(run, sharded_dir):
    index = json.loads((sharded_dir / INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((sharded_dir / f).is_file() for f in files)
    assert len(index["weight_map"]) == 3 + 9 * CONFIG.num_hidden_layers
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in safetensors_dict(sharded_dir).values())
    assert np.abs(hf_logits(sharded_dir, run.tokens) - run.logits).max() < 1e-4


def test_bfloat16_export_is_the_rounded_float32_export(run, llama_dir, tmp_path):
    export(run.workdir, tmp_path, "llama", dtype="bfloat16", tokenizer="none")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    with (
        safe_open(str(tmp_path / "model.safetensors"), framework="pt") as bf,
        safe_open(str(llama_dir / "model.safetensors"), framework="pt") as f32,
    ):
        for name in f32.keys():
            assert bf.get_tensor(name).dtype == torch.bfloat16
            assert torch.equal(bf.get_tensor(name), f32.get_tensor(name).to(torch.bfloat16)), name


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", r"missing: model\.layers\.1\.mlp\.up_proj\.weight"),
        ("shape", r"wrong shape: model\.layers\.0\.self_attn\.k_proj\.weight \[16, 64\] \(expected \[32, 64\]\)"),
        ("unexpected", r"unexpected: model\.layers\.0\.self_attn\.q_proj\.bias"),
    ],
)
def test_import_names_missing_and_misshapen_tensors(llama_dir, tmp_path, damage, message):
    broken = tmp_path / "hf"
    broken.mkdir()
    shutil.copy(llama_dir / "config.json", broken)
    tensors = safetensors_dict(llama_dir)
    if damage == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif damage == "shape":
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    else:
        tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(HFImportError, match=message):
        import_hf(broken, tmp_path / "work", SINGLE)
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_export_reads_stacked_arrays_one_layer_at_a_time(run, tmp_path, monkeypatch):
    reader = CheckpointReader(run.workdir)
    stacked = ["self_attn/q_proj", "mlp/down_proj", "input_layernorm/scale"]
    assert all(reader.layer_chunked(("layers",) + tuple(p.split("/"))) for p in stacked)
    whole_reads, lines = [], []
    original = CheckpointReader.read
    monkeypatch.setattr(CheckpointReader, "read", lambda self, path: whole_reads.append(path) or original(self, path))
    summary = export(run.workdir, tmp_path, "teleflm", tokenizer="none", progress=lines.append)
    assert sorted(whole_reads) == [("embed_tokens",), ("lm_head",), ("norm", "scale")]
    assert sum("layer" in line and "written" in line for line in lines) == CONFIG.num_hidden_layers
    assert summary["peak_rss_mib"] > 0 and summary["files"] == ["model.safetensors"]


def test_growth_masks_mid_ramp_are_refused_and_masks_at_0_are_folded(run, tmp_path, capsys):
    save_copy(tmp_path / "ramp", run.state, growth=dict(RAMP, mask=0.2))  # step 2 of a 10-step ramp: m = 0.2
    with pytest.raises(SystemExit) as exit_info:
        cli.run_tool(
            "export",
            lambda: export_mod.main(
                [f"--workdir={tmp_path / 'ramp'}", f"--out={tmp_path / 'out'}", "--tokenizer=none"]
            ),
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "middle of a growth mask ramp (mask 0.2)" in err and "Traceback" not in err

    def fake(growth):
        return types.SimpleNamespace(metadata={"growth": growth} if growth else {}, step=2, config=CONFIG)

    plain = fake(None)
    assert plain_source(plain) is plain  # no growth: the checkpoint as stored
    over = fake(dict(RAMP, ramp_steps=2))
    assert plain_source(over) is over  # m = clip((2 - 0) / 2, 0, 1) = 1: the plain grown model as stored
    assert isinstance(plain_source(fake(dict(RAMP, start_step=2))), FoldedSource)  # m = 0: folded
    with pytest.raises(GrowthRampError, match=r"mask 0.2\)"):
        plain_source(fake(RAMP))


def test_rms_norm_scale_is_folded_into_the_norm_gains(run, tmp_path):
    config = CONFIG.replace(rms_norm_scale=0.5)
    save_copy(tmp_path / "scaled", run.state, config={"rms_norm_scale": 0.5})
    export(tmp_path / "scaled", tmp_path / "hf", "llama", tokenizer="none")
    ours = flm_logits(run.params, config, run.tokens)
    assert np.abs(hf_logits(tmp_path / "hf", run.tokens) - ours).max() < 1e-4
    assert np.abs(ours - run.logits).max() > 1e-3  # the scale matters


def test_command_lines_import_plain_llama_and_generate(run, llama_dir, tmp_path, capsys):
    import_mod.main([f"--hf_dir={llama_dir}", f"--workdir={tmp_path}", "--use_mup=false"])
    assert "use_mup=False" in capsys.readouterr().out
    # config.gin holds the imported model (train continues from it with no --gin_file).
    config_gin = (tmp_path / "config.gin").read_text()
    assert "TeleFLMConfig.num_key_value_heads = 2" in config_gin and "TeleFLMConfig.use_mup = False" in config_gin
    reader = CheckpointReader(tmp_path)
    assert reader.step == 0 and not reader.config.use_mup
    # The plain model holds the folded weights and computes the same function as the μP original.
    assert np.abs(flm_logits(read_params(reader), reader.config, run.tokens) - run.logits).max() < 1e-5
    generate_mod.main(
        [f"--workdir={run.workdir}", "--prompt=In the beginning", "--max_new_tokens=8", "--temperature=0.8"]
    )
    assert capsys.readouterr().out.startswith("In the beginning")
    # --json, two prompts in one batch, KV cache against the full-recompute reference.
    outputs = []
    for kv_cache in ("true", "false"):
        generate_mod.main(
            [
                f"--workdir={run.workdir}",
                "--prompt=In the beginning",
                "--prompt=def f(x):",
                "--max_new_tokens=6",
                "--json",
                f"--kv_cache={kv_cache}",
            ]
        )
        outputs.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert outputs[0] == outputs[1] and [r["prompt"] for r in outputs[0]] == ["In the beginning", "def f(x):"]
    assert all(0 < len(r["new_token_ids"]) <= 6 and isinstance(r["text"], str) for r in outputs[0])


def test_grown_checkpoint_at_mask_0_exports_to_the_sources_logits(run, llama_dir, tmp_path):
    """MSG growth (hidden, heads, FFN, layers) at mask 0, folded by flm_jax.growth.fold: transformers computes the
    source model's logits from the bigger exported model."""
    spec = GrowthSpec(hidden_size=96, num_attention_heads=6, intermediate_size=160, num_hidden_layers=3, mode="msg")
    grow_checkpoint(run.workdir, tmp_path / "grown", spec, SINGLE)
    export(tmp_path / "grown", tmp_path / "hf", "llama", tokenizer="none")
    grown = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (grown["hidden_size"], grown["num_hidden_layers"]) == (96, 3)
    np.testing.assert_allclose(
        hf_logits(tmp_path / "hf", run.tokens), hf_logits(llama_dir, run.tokens), atol=1e-4 * np.abs(run.logits).max()
    )


def test_evaluate_scores_a_workdir_and_its_hugging_face_export_alike(run, llama_dir, tmp_path, capsys):
    from flm_jax import data
    from flm_jax import evaluate as evaluate_mod

    text = tmp_path / "psalm.txt"
    text.write_text("The LORD is my shepherd; I shall not want.\nÉvangile, 中文 and 🤖 bytes.\n", encoding="utf-8")
    items = [
        {"question": "In the beginning God created the", "choices": ["heaven", "zebra", "xylophone"], "answer": 0},
        {"question": "def f(x):\n    return", "choices": ["x", "Moses said", "LORD"], "answer": "x"},
        {"question": "And God said, Let there be", "choices": ["light", "import os"], "answer": 0},
    ]
    choices = tmp_path / "mc.jsonl"
    choices.write_text("".join(json.dumps(item) + "\n" for item in items))
    flags = [f"--text_file={text}", f"--choices_file={choices}", "--batch_size=32", "--seq_len=64"]
    evaluate_mod.main([f"--workdir={run.workdir}", f"--out={tmp_path / 'a.json'}", *flags])
    evaluate_mod.main([f"--hf_dir={llama_dir}", f"--out={tmp_path / 'b.json'}", *flags])
    capsys.readouterr()
    a, b = (json.loads((tmp_path / f"{x}.json").read_text()) for x in "ab")
    scores = [*a["domains"].values(), a["total"], *a["files"].values()]
    for score in scores:
        assert score["bpb"] == pytest.approx(score["loss"] * score["tokens"] / (np.log(2) * score["bytes"]), rel=1e-9)
    assert sorted(a["domains"]) == ["flm_code", "flm_prose"]
    assert a["files"][str(text)]["bytes"] == len(text.read_bytes())
    for domain in ("prose", "code"):
        texts = [d.text for d in data.load_documents(domain, "validation")]
        assert a["domains"][f"flm_{domain}"]["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    for key in ("domains", "files"):  # the export, imported back, scores the same
        for name, score in a[key].items():
            assert abs(score["loss"] - b[key][name]["loss"]) < 1e-4, name
    # Multiple choice against log-likelihoods summed here from one forward pass per choice.
    sp = data.load_sentencepiece()
    right = 0
    for item in items:
        totals = []
        for choice in item["choices"]:
            context, continuation = [CONFIG.bos_token_id, *sp.encode(item["question"])], sp.encode(" " + choice)
            tokens = np.asarray([context + continuation])
            logits = flm_logits(run.params, CONFIG, tokens[:, :-1])[0].astype(np.float64)
            log_probs = (
                logits
                - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
                - logits.max(-1, keepdims=True)
            )
            targets = tokens[0, 1:]
            totals.append(sum(log_probs[i, targets[i]] for i in range(len(context) - 1, len(targets))))
        answer = item["answer"] if isinstance(item["answer"], int) else item["choices"].index(item["answer"])
        right += int(np.argmax(totals) == answer)
    mc = a["multiple_choice"][str(choices)]
    assert mc["count"] == 3 and mc["accuracy"] == pytest.approx(right / 3)


@pytest.mark.parametrize(
    "tensor, flm_shape, idx, elements_read",
    [
        (LAYER_TENSORS[1], (8, 4, 3), (slice(2, 6), slice(None), slice(None)), 48),  # q_proj: hidden cut (fsdp)
        (LAYER_TENSORS[1], (8, 4, 3), (slice(None), slice(1, 3), slice(None)), 48),  # q_proj: heads cut (tensor)
        # head_dim cut too: all rows (heads x head_dim) of the hidden columns 4:8 are read, then cut
        (LAYER_TENSORS[1], (8, 4, 3), (slice(4, 8), slice(0, 2), slice(1, 2)), 48),
        (LAYER_TENSORS[4], (4, 3, 8), (slice(2, 4), slice(None), slice(0, 4)), 24),  # o_proj: heads and hidden cut
        (EMBED, (10, 8), (slice(5, 10), slice(0, 4)), 20),  # no transpose: the block itself
    ],
)
def test_an_imported_block_reads_only_its_rows_and_columns(tensor, flm_shape, idx, elements_read):
    full = np.arange(np.prod(flm_shape), dtype=np.float32).reshape(flm_shape)
    hf = tensor.to_hf(full)
    reads = []

    def read(index):
        reads.append(hf[index].size)
        return hf[index]

    np.testing.assert_array_equal(tensor.block_from_hf(read, flm_shape, idx), full[idx])
    assert reads == [elements_read]
