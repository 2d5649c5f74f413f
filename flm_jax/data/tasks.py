"""seqio Tasks and Mixtures: the default corpus ('flm_prose', 'flm_code', 'flm_default'), the shipped
instruction set ('flm_instructions') and gin-configurable registration of your own (text files, JSONL files, TFDS
datasets, chat JSONL files, mixtures with rates).

Every pretraining task here has one output feature, 'targets', made by: text -> SentencePiece ids + EOS -> chunks
of at most the sequence length (a long document becomes several examples; nothing is truncated away).
Chat tasks (flm_jax/data/chat.py) have 'targets' (chat tokenizer ids) and 'loss_weights' (1 on answers only);
a conversation is never split. A mixture holds tasks of one kind (seqio requires equal output features).
Registration is idempotent: registering a name again replaces the earlier definition.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping, Sequence

# isort: split  (TensorFlow's settings in flm_jax.data._tf apply before seqio / tfds import it)
import seqio  # noqa: E402  (after _tf)

import gin
from flm_jax.config import ConfigError
from flm_jax.data import chat, corpus
from flm_jax.data._tf import plain_graph_fn, tf
from flm_jax.data.vocab import get_vocabulary

TEXT_KEY = "text"
SHUFFLE_BUFFER_SIZE = 256  # examples (chunks); documents are also fully shuffled at the source
DEFAULT_MIXTURE = "flm_default"
DEFAULT_MIXTURE_RATES = {"flm_prose": 0.7, "flm_code": 0.3}
FilePatterns = str | Sequence[str]

_TEXT_KEYS: dict[str, str] = {}  # task name -> the source feature that holds the document text


class _DropFunctionSourceAdvice(logging.Filter):
    """seqio logs, on every shuffled read of a FunctionDataSource, advice to cache it; our sources shuffle whole
    documents at the source with a seed, so the advice does not apply."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "uncached FunctionDataset" not in str(record.msg)


logging.getLogger("absl").addFilter(_DropFunctionSourceAdvice())


def output_features() -> dict[str, seqio.Feature]:
    return {"targets": seqio.Feature(vocabulary=get_vocabulary(), add_eos=True, dtype=tf.int32, rank=1)}


def split_into_chunks(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None):
    """Splits each example's 'targets' into consecutive chunks of at most sequence_length['targets'] ids."""
    length = (sequence_length or {}).get("targets")
    if not length:
        return dataset

    def chunk(ex):
        starts = tf.range(0, tf.size(ex["targets"]), length)
        return {"targets": tf.RaggedTensor.from_row_starts(ex["targets"], starts)}

    return dataset.map(plain_graph_fn(chunk), num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _preprocessors(text_key: str) -> list[Callable]:
    return [
        functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
        functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False, with_eos=True),
        split_into_chunks,
    ]


def _add_task(name: str, source: seqio.DataSource, text_key: str, shuffle_buffer_size: int) -> str:
    if name in seqio.MixtureRegistry.names():
        raise ValueError(f"{name!r} is already registered as a mixture")
    seqio.TaskRegistry.remove(name)
    chat.remove_source(name)
    seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=_preprocessors(text_key),
        output_features=output_features(),
        shuffle_buffer_size=shuffle_buffer_size,
    )
    _TEXT_KEYS[name] = text_key
    return name


def _shuffled(ds: tf.data.Dataset, n: int, shuffle: bool, seed: int | None) -> tf.data.Dataset:
    # A full shuffle, redrawn each epoch; with a seed the whole sequence of epochs is reproducible.
    return ds.shuffle(max(n, 1), seed=seed, reshuffle_each_iteration=True) if shuffle else ds


def _corpus_dataset_fn(domain: str):
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        texts = tf.constant(corpus.load_texts(domain, split), tf.string)
        # Shuffle indices, not texts: a checkpointed iterator then holds a shuffle buffer of integers (the same
        # order as shuffling the texts with the same seed).
        order = _shuffled(tf.data.Dataset.range(len(texts)), len(texts), shuffle_files, seed)
        return order.map(plain_graph_fn(lambda i: {TEXT_KEY: tf.gather(texts, i)}))

    return dataset_fn


def _files_dataset_fn(split_to_filepattern: Mapping[str, FilePatterns], document_per: str, text_key: str):
    """Reads sorted, globbed files: each whole file, each line, or each JSONL line's `text_key` is a document."""

    def parse_json(line):
        def get(s):
            return json.loads(s.numpy().decode("utf-8"))[text_key]

        return tf.ensure_shape(tf.py_function(get, [line], tf.string), [])

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        patterns = split_to_filepattern[split]
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
        if not files:
            raise FileNotFoundError(f"no files match {patterns} (split {split!r})")
        ds = _shuffled(tf.data.Dataset.from_tensor_slices(files), len(files), shuffle_files, seed)
        if document_per == "file":
            return ds.map(plain_graph_fn(lambda f: {TEXT_KEY: tf.io.read_file(f)}))
        non_blank = plain_graph_fn(lambda s: tf.strings.length(tf.strings.strip(s)) > 0)
        lines = ds.flat_map(tf.data.TextLineDataset).filter(non_blank)
        if document_per == "line":
            return lines.map(plain_graph_fn(lambda s: {TEXT_KEY: s}))
        return lines.map(plain_graph_fn(lambda s: {TEXT_KEY: parse_json(s)}))

    return dataset_fn


@gin.configurable
def register_text_task(
    name: str,
    split_to_filepattern: Mapping[str, FilePatterns],
    document_per: str = "file",
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
) -> str:
    """A task over plain text files; `document_per` is 'file' (a whole file is a document) or 'line'."""
    if document_per not in ("file", "line"):
        raise ValueError(f"document_per must be 'file' or 'line', got {document_per!r}")
    source = seqio.FunctionDataSource(
        _files_dataset_fn(split_to_filepattern, document_per, TEXT_KEY), splits=tuple(split_to_filepattern)
    )
    return _add_task(name, source, TEXT_KEY, shuffle_buffer_size)


@gin.configurable
def register_jsonl_task(
    name: str,
    split_to_filepattern: Mapping[str, FilePatterns],
    text_key: str = "text",
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
) -> str:
    """A task over JSON-lines files; each line is one document whose text is the field `text_key`."""
    source = seqio.FunctionDataSource(
        _files_dataset_fn(split_to_filepattern, "jsonl", text_key), splits=tuple(split_to_filepattern)
    )
    return _add_task(name, source, TEXT_KEY, shuffle_buffer_size)


@gin.configurable
def register_tfds_task(
    name: str,
    tfds_name: str,
    data_dir: str | None = None,
    text_key: str = "text",
    splits: Sequence[str] | Mapping[str, str] | None = None,
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
) -> str:
    """A task over a prepared TFDS dataset ('name/config:version') in `data_dir`; works offline."""
    source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=data_dir, splits=splits)
    return _add_task(name, source, text_key, shuffle_buffer_size)


@gin.configurable
def register_function_task(
    name: str,
    dataset_fn: Callable,
    splits: Sequence[str] = corpus.SPLITS,
    text_key: str = TEXT_KEY,
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
) -> str:
    """A task over `dataset_fn(split, shuffle_files, seed=None) -> tf.data.Dataset` of {text_key: string}."""
    return _add_task(name, seqio.FunctionDataSource(dataset_fn, splits=tuple(splits)), text_key, shuffle_buffer_size)


@gin.configurable
def register_chat_task(
    name: str,
    split_to_filepattern: Mapping[str, FilePatterns],
    skip_malformed: bool = False,
    shuffle_buffer_size: int = SHUFFLE_BUFFER_SIZE,
) -> str:
    """A supervised fine-tuning task over chat JSONL files ({"messages": [{"role", "content"}, ...]} per line),
    rendered with Tele-FLM's chat template and the chat tokenizer, loss weights on the answers only
    (flm_jax/data/chat.py). A malformed record (bad JSON, role or content, no assistant turn, longer than the
    sequence length) is a ChatFormatError naming file and line; with `skip_malformed` it is skipped and counted
    (logged each time the task is read; `chat.skipped_records(name, split, seq_len)`)."""
    return _add_chat_task(name, split_to_filepattern, skip_malformed, shuffle_buffer_size)


def _add_chat_task(
    name: str, split_to_filepattern: Mapping[str, FilePatterns], skip_malformed: bool, shuffle_buffer_size: int
) -> str:
    if name in seqio.MixtureRegistry.names():
        raise ValueError(f"{name!r} is already registered as a mixture")
    source = chat.ChatSource(name, split_to_filepattern, skip_malformed)
    seqio.TaskRegistry.remove(name)
    _TEXT_KEYS.pop(name, None)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(source.dataset_fn, splits=source.splits),
        preprocessors=[functools.partial(chat.fit_sequence_length, skip_malformed=source.skip_malformed)],
        output_features=chat.output_features(),
        shuffle_buffer_size=shuffle_buffer_size,
    )
    chat.add_source(source)
    return name


@gin.configurable
def register_mixture(name: str, tasks_and_rates: Mapping[str, float] | Sequence[tuple[str, float]]) -> str:
    """A mixture sampling registered tasks (or mixtures) in proportion to the given rates."""
    pairs = list(tasks_and_rates.items()) if isinstance(tasks_and_rates, Mapping) else list(tasks_and_rates)
    if not pairs or any(rate < 0 for _, rate in pairs) or sum(rate for _, rate in pairs) <= 0:
        raise ValueError(f"mixture {name!r} needs non-negative rates with a positive sum, got {pairs}")
    if name in seqio.TaskRegistry.names():
        raise ValueError(f"{name!r} is already registered as a task")
    seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in pairs])
    return name


@gin.configurable
def register_default_tasks(mixture_rates: Mapping[str, float] = DEFAULT_MIXTURE_RATES) -> list[str]:
    """'flm_prose' and 'flm_code' over the embedded corpus and the chat task 'flm_instructions' over the shipped
    instruction set (added once; they never change), and the mixture 'flm_default' of the corpus tasks
    (re-registered on every call, so gin-bound rates take effect). Returns the pretraining names and the mixture's."""
    for domain in corpus.DOMAINS:
        if f"flm_{domain}" not in seqio.TaskRegistry.names():
            source = seqio.FunctionDataSource(_corpus_dataset_fn(domain), splits=corpus.READ_SPLITS)
            _add_task(f"flm_{domain}", source, TEXT_KEY, SHUFFLE_BUFFER_SIZE)
    if chat.INSTRUCTIONS_TASK not in seqio.TaskRegistry.names():
        _add_chat_task(chat.INSTRUCTIONS_TASK, chat.INSTRUCTIONS_FILES, False, SHUFFLE_BUFFER_SIZE)
    return [f"flm_{d}" for d in corpus.DOMAINS] + [register_mixture(DEFAULT_MIXTURE, mixture_rates)]


@gin.configurable
def register_tasks(registrations: Sequence[str] = ()) -> list[str]:
    """Call after parsing gin: (re)registers the defaults with their gin rates; `registrations` holds gin calls
    such as `@my_docs/register_jsonl_task()`, which gin evaluates, in order, when this function is called."""
    return register_default_tasks() + list(registrations)


def task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`; a ConfigError naming the registered ones when there is none."""
    if name not in seqio.TaskRegistry.names() and name not in seqio.MixtureRegistry.names():
        raise ConfigError(
            f"{name!r} is neither a registered task nor a mixture; registered: "
            f"{sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())}. Use one of them, or "
            "register it in a gin file (register_tasks.registrations, docs/data.md)."
        )
    return seqio.get_mixture_or_task(name)


def required_vocab_size(name: str) -> int:
    """The vocabulary size a model needs for task or mixture `name`: 2048 (VOCAB_SIZE) for the pretraining tasks,
    2050 (CHAT_VOCAB_SIZE) for chat tasks. A smaller model vocabulary would index its embedding out of range."""
    return int(task_or_mixture(name).output_features["targets"].vocabulary.vocab_size)


def task_text_key(name: str) -> str:
    """The source feature holding the document text of a task registered by this module."""
    if name not in _TEXT_KEYS:
        raise KeyError(f"{name!r} was not registered by flm_jax.data (its text field is unknown)")
    return _TEXT_KEYS[name]


def source_text_stats(name: str, split: str, seq_len: int | None = None) -> tuple[int, int]:
    """(documents, UTF-8 bytes of their text) in the raw source of task `name`, read in order, once. For a chat
    task: (conversations that go into batches at `seq_len`, UTF-8 bytes of their answers, the weighted text)."""
    source = chat.chat_source(name)
    if source is not None:
        return source.text_stats(split, seq_len)
    ds = seqio.get_mixture_or_task(name).source.get_dataset(split=split, shuffle=False)
    key = task_text_key(name)
    byte_length = plain_graph_fn(lambda ex: tf.strings.length(ex[key], unit="BYTE"))
    lengths = ds.map(byte_length, num_parallel_calls=tf.data.AUTOTUNE)
    count = plain_graph_fn(lambda acc, n: (acc[0] + 1, acc[1] + tf.cast(n, tf.int64)))
    docs, total = lengths.reduce((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), count)
    return int(docs), int(total)
