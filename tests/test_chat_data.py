"""Tests of the chat (SFT) data: chat tokenizer, template and loss weights, malformed records, packed batches of
'flm_instructions', the committed instruction set, gin registration."""

import json
import logging

import numpy as np
import pytest

import flm_jax.data as data
import gin
from flm_jax.data import build_instructions, chat

SEQ_LEN = 128
SYSTEM, U1, A1, U2, A2 = "Be brief.", "What is 2 + 3?", "5", "Spell cat backwards.", "tac"
TWO_TURNS = {
    "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": U1},
        {"role": "assistant", "content": A1},
        {"role": "user", "content": U2},
        {"role": "assistant", "content": A2},
    ]
}


@pytest.fixture(scope="module")
def sp():
    return data.load_sentencepiece()


@pytest.fixture(scope="module")
def chat_sp():
    return data.load_chat_sentencepiece()


@pytest.fixture(scope="module")
def instruction_batches():
    it = data.BatchIterator(data.INSTRUCTIONS_TASK, "train", batch_size=4, seq_len=SEQ_LEN, seed=3)
    return [next(it) for _ in range(3)]


@pytest.fixture(scope="module")
def instruction_records():
    out = {}
    for split, path in chat.INSTRUCTIONS_FILES.items():
        with open(path, encoding="utf-8") as f:
            out[split] = [json.loads(line) for line in f]
    return out


def _write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_chat_tokenizer_markers_and_unchanged_ids(sp, chat_sp):
    assert data.CHAT_VOCAB_SIZE == chat_sp.vocab_size() == 2050 == data.get_chat_vocabulary().vocab_size
    assert data.required_vocab_size(data.INSTRUCTIONS_TASK) == 2050 and data.required_vocab_size("flm_default") == 2048
    assert (data.USER_MARKER, data.BOT_MARKER) == ("<_user>", "<_bot>")
    assert chat_sp.encode(data.USER_MARKER) == [data.USER_ID] == [2048]
    assert chat_sp.encode(data.BOT_MARKER) == [data.BOT_ID] == [2049]
    x, y = chat_sp.encode("x"), chat_sp.encode("y")
    assert chat_sp.encode(f"x{data.USER_MARKER}y{data.BOT_MARKER}") == [*x, 2048, *y, 2049]  # never split
    assert [chat_sp.id_to_piece(i) for i in range(2048)] == [sp.id_to_piece(i) for i in range(2048)]
    texts = [d.text[:2000] for d in data.load_documents("prose", "validation")[:5]]
    texts += [d.text[:2000] for d in data.load_documents("code", "validation")[:5]]
    texts += ["def f(x):\n\treturn x  # ünïcode 中文 🙂", "<_usr> <bot> _user", "What is 12 + 30?"]
    for text in texts:  # text without markers: the same ids from both tokenizers
        assert chat_sp.encode(text) == sp.encode(text)
    text = f"{data.USER_MARKER}Reverse ünï.{data.BOT_MARKER}ïnü"
    vocab_ids = data.get_chat_vocabulary().encode_tf(text).numpy().tolist()
    assert vocab_ids == chat_sp.encode(text) and chat_sp.decode(vocab_ids) == text


def test_chat_tokenizer_asset_is_a_rebuild():
    with open(data.CHAT_TOKENIZER_PATH, "rb") as f:
        committed = f.read()
    assert build_instructions.chat_tokenizer_bytes() == committed


def test_two_turn_template_and_loss_weights(chat_sp):
    rendered = data.render_chat(TWO_TURNS["messages"])
    ids, weights = rendered.ids, rendered.weights
    # The template string through the chat tokenizer, EOS ids after each answer; the system message is dropped.
    expected = [data.BOS_ID] + chat_sp.encode(f"<_user>{U1}<_bot>{A1}") + [data.EOS_ID]
    expected += chat_sp.encode(f"<_user>{U2}<_bot>{A2}") + [data.EOS_ID]
    assert ids == expected and len(weights) == len(ids) and set(weights) == {0, 1}
    assert ids[:2] == [data.BOS_ID, data.USER_ID] and weights[:2] == [0, 0]
    weighted = [i for i, w in zip(ids, weights) if w == 1]
    assert chat_sp.decode(weighted[: weighted.index(data.EOS_ID)]) == A1
    assert weighted == chat_sp.encode(A1) + [data.EOS_ID] + chat_sp.encode(A2) + [data.EOS_ID]
    unweighted = [i for i, w in zip(ids, weights) if w == 0]
    assert unweighted == [data.BOS_ID, data.USER_ID, *chat_sp.encode(U1), data.BOT_ID] + [
        data.USER_ID,
        *chat_sp.encode(U2),
        data.BOT_ID,
    ]
    assert rendered.targets == ids[1:] and rendered.target_weights == weights[1:]


def test_two_turn_record_packed(tmp_path, chat_sp):
    path = _write_jsonl(tmp_path / "two.jsonl", [TWO_TURNS, TWO_TURNS])
    name = data.register_chat_task("test_chat_two", {"train": path})
    rendered = data.render_chat(TWO_TURNS["messages"])
    n = len(rendered.targets)
    val = data.validation_set(name, batch_size=1, seq_len=2 * n + 3, split="train")
    (batch,) = val.batches
    row = {k: v[0] for k, v in batch.items()}
    assert row["targets"].tolist() == rendered.targets * 2 + [0, 0, 0]
    assert row["inputs"].tolist() == (rendered.ids[:-1]) * 2 + [0, 0, 0]
    assert row["loss_weights"].tolist() == rendered.target_weights * 2 + [0, 0, 0]
    assert row["segment_ids"].tolist() == [1] * n + [2] * n + [0, 0, 0]
    assert row["positions"].tolist() == list(range(n)) * 2 + [0, 0, 0]
    weighted = row["targets"][row["loss_weights"] == 1].tolist()
    assert chat_sp.decode(weighted) == (A1 + A2) * 2 and weighted.count(data.EOS_ID) == 4
    assert (val.num_documents, val.num_bytes, val.num_tokens) == (2, 2 * len(A1 + A2), len(weighted))


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
LONG = {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": "word " * 40}]}
MALFORMED = {
    "bad_json": '{"messages": [',
    "bad_messages": {"turns": []},
    "missing_role": {"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]},
    "unknown_role": {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "bad_content": {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
    "marker_in_content": {"messages": [{"role": "user", "content": "a<_bot>b"}, {"role": "assistant", "content": "x"}]},
    "no_assistant": {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
    "bad_order": {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "hi"}]},
    "too_long": LONG,
}


@pytest.mark.parametrize("reason", list(MALFORMED))
def test_malformed_record_names_file_and_line(tmp_path, reason):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", MALFORMED[reason], GOOD])  # the bad record: line 3
    name = data.register_chat_task("test_chat_bad", {"train": path})
    with pytest.raises(data.ChatFormatError, match=f"^{path}:3: {reason}: ") as e:
        data.packed_dataset(name, "train", 32, shuffle=False, num_epochs=1)
    assert (e.value.path, e.value.line, e.value.reason) == (path, 3, reason)


def test_a_direct_seqio_read_never_truncates(tmp_path):
    import seqio

    from flm_jax.data._tf import tf

    name = data.register_chat_task("test_chat_direct", {"train": _write_jsonl(tmp_path / "long.jsonl", [LONG])})
    lengths = {"targets": 8, "loss_weights": 8}  # seqio would trim the record to 8 ids; the task's guard refuses
    ds = seqio.get_mixture_or_task(name).get_dataset(lengths, split="train", shuffle=False, use_cached=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="longer than the sequence length 8"):
        next(ds.as_numpy_iterator())


def test_skip_malformed_counts_and_reports(tmp_path, caplog):
    lines = [GOOD, *MALFORMED.values(), GOOD, MALFORMED["bad_json"]]
    path = _write_jsonl(tmp_path / "mixed.jsonl", lines)
    name = data.register_chat_task("test_chat_skip", {"validation": path}, skip_malformed=True)
    expected = {reason: 1 for reason in chat.REASONS}
    expected["bad_json"] = 2
    assert data.skipped_records(name, "validation", 32) == expected
    assert "too_long" not in data.skipped_records(name, "validation", 1000)
    with caplog.at_level(logging.WARNING, logger="flm_jax.data.chat"):
        val = data.validation_set(name, batch_size=2, seq_len=32)
    assert "skipped 10 malformed records" in caplog.text and "'too_long': 1" in caplog.text
    assert (val.num_documents, val.num_bytes) == (2, 2 * len("hello"))
    targets = np.concatenate([b["targets"] for b in val.batches])
    assert int((targets == data.EOS_ID).sum()) == 2 and data.USER_ID in targets


def test_instruction_batches_have_the_pretraining_format(instruction_batches, instruction_records):
    rendered = {}
    for record in instruction_records["train"]:
        r = data.render_chat(record["messages"])
        rendered[tuple(r.targets)] = r.target_weights
    segments = 0
    for batch in instruction_batches:
        assert sorted(batch) == ["inputs", "loss_weights", "positions", "segment_ids", "targets"]
        assert all(v.shape == (4, SEQ_LEN) for v in batch.values())
        assert batch["loss_weights"].dtype == np.float32 and batch["targets"].dtype == np.int32
        for row in range(4):
            seg, pos = batch["segment_ids"][row], batch["positions"][row]
            tgt, inp, w = batch["targets"][row], batch["inputs"][row], batch["loss_weights"][row]
            assert not np.any((seg == 0) & ((tgt != 0) | (inp != 0) | (w != 0) | (pos != 0)))
            for s in range(1, seg.max() + 1):
                (where,) = np.nonzero(seg == s)
                assert where.tolist() == list(range(where[0], where[-1] + 1))
                assert pos[where].tolist() == list(range(len(where)))  # restarting per record
                assert inp[where[0]] == data.BOS_ID and inp[where[1:]].tolist() == tgt[where[:-1]].tolist()
                key = tuple(tgt[where].tolist())
                assert key in rendered, "a packed segment is one whole record"
                assert w[where].tolist() == rendered[key]  # weights only on the answers (and their EOS)
                assert tgt[where][-1] == data.EOS_ID and w[where][-1] == 1
                segments += 1
    assert segments > 12  # several records per row


def test_instruction_validation_set(instruction_records):
    records = instruction_records["validation"]
    val = data.validation_set(data.INSTRUCTIONS_TASK, batch_size=16, seq_len=SEQ_LEN)
    answers = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert val.num_documents == len(records) == 200
    assert val.num_bytes == sum(len(a.encode("utf-8")) for a in answers)
    chat_sp = data.load_chat_sentencepiece()
    assert val.num_tokens == sum(len(chat_sp.encode(a)) + 1 for a in answers)


def test_committed_instructions_equal_a_rebuild(instruction_records):
    for split, raw in build_instructions.instruction_files().items():
        with open(chat.INSTRUCTIONS_FILES[split], "rb") as f:
            assert f.read() == raw, f"{split}: run python -m flm_jax.data.build_instructions"
    train, validation = instruction_records["train"], instruction_records["validation"]
    assert (len(train), len(validation)) == (2000, 200)
    keys = [build_instructions.conversation_key(r) for r in train + validation]
    assert len(set(keys)) == len(keys)  # unique, so validation is held out
    roles = [[m["role"] for m in r["messages"]] for r in train]
    assert sum(r.count("assistant") > 1 for r in roles) > 100 and sum("system" in r for r in roles) > 100
    assert build_instructions.check_lengths(train + validation) <= SEQ_LEN


def test_noisy_variant():
    records = build_instructions.build_records()["validation"]
    noisy = build_instructions.noisy_records(records, fraction=0.5, seed=1)
    assert noisy == build_instructions.noisy_records(records, fraction=0.5, seed=1)
    changed = [(a, b) for a, b in zip(records, noisy) if a != b]
    assert len(changed) == 100 and {b["noise"] for _, b in changed} == {"wrong", "off_format"}
    for a, b in changed:
        answers = [
            (x["content"], y["content"]) for x, y in zip(a["messages"], b["messages"]) if x["role"] == "assistant"
        ]
        assert all(x != y for x, y in answers)
    assert records == build_instructions.build_records()["validation"]  # the input is not modified


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()
    data.register_default_tasks()


def test_gin_registration_of_a_chat_task(tmp_path, clean_gin):
    path = _write_jsonl(tmp_path / "chat.jsonl", [GOOD, LONG, TWO_TURNS])
    gin.parse_config(f"""
      my_chat/register_chat_task.name = 'test_gin_chat'
      my_chat/register_chat_task.split_to_filepattern = {{'train': '{tmp_path}/*.jsonl'}}
      my_chat/register_chat_task.skip_malformed = True
      register_mixture.name = 'test_gin_chat_mix'
      register_mixture.tasks_and_rates = [('flm_instructions', 1.0), ('test_gin_chat', 1.0)]
      register_tasks.registrations = [@my_chat/register_chat_task(), @register_mixture()]
    """)
    assert data.register_tasks()[-2:] == ["test_gin_chat", "test_gin_chat_mix"]
    assert data.skipped_records("test_gin_chat", "train", 16) == {"too_long": 2}
    batch = next(data.BatchIterator("test_gin_chat_mix", "train", batch_size=2, seq_len=SEQ_LEN, seed=0))
    assert batch["targets"].shape == (2, SEQ_LEN) and 0 < batch["loss_weights"].sum() < (batch["targets"] > 0).sum()
    assert chat.chat_source("test_gin_chat").read("train").records[0].path == path
