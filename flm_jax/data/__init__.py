"""flm_jax.data: the embedded corpus, the tokenizer, seqio tasks/mixtures and packed batch iterators.

Importing this package imports TensorFlow (CPU only, GPUs hidden from it) and registers the default tasks
'flm_prose', 'flm_code', the mixture 'flm_default' and the chat task 'flm_instructions'. See docs/data.md.
"""

from flm_jax.data import _tf  # noqa: F401  (first: TF log level and GPU hiding)
from flm_jax.data.chat import (
    INSTRUCTIONS_FILES,
    INSTRUCTIONS_TASK,
    ChatFormatError,
    parse_chat_line,
    render_chat,
    skipped_records,
)
from flm_jax.data.corpus import DOMAINS, SPLITS, Document, load_documents
from flm_jax.data.pipeline import (
    BatchIterator,
    ValidationSet,
    bits_per_byte,
    first_validation_batches,
    packed_dataset,
    validation_set,
)
from flm_jax.data.sharded import ShardedBatches, ShardedSpec
from flm_jax.data.tasks import (
    DEFAULT_MIXTURE,
    DEFAULT_MIXTURE_RATES,
    register_chat_task,
    register_default_tasks,
    register_function_task,
    register_jsonl_task,
    register_mixture,
    register_tasks,
    register_text_task,
    register_tfds_task,
    required_vocab_size,
)
from flm_jax.data.tfds_builder import FlmCorpus, prepare_tfds, tfds_name
from flm_jax.data.vocab import (
    BOS_ID,
    BOT_ID,
    BOT_MARKER,
    CHAT_TOKENIZER_PATH,
    CHAT_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    TOKENIZER_PATH,
    UNK_ID,
    USER_ID,
    USER_MARKER,
    VOCAB_SIZE,
    get_chat_vocabulary,
    get_vocabulary,
    load_chat_sentencepiece,
    load_sentencepiece,
)

register_default_tasks()

__all__ = [
    "BOS_ID",
    "BOT_ID",
    "BOT_MARKER",
    "BatchIterator",
    "CHAT_TOKENIZER_PATH",
    "CHAT_VOCAB_SIZE",
    "ChatFormatError",
    "DEFAULT_MIXTURE",
    "DEFAULT_MIXTURE_RATES",
    "DOMAINS",
    "Document",
    "EOS_ID",
    "FlmCorpus",
    "INSTRUCTIONS_TASK",
    "PAD_ID",
    "SPLITS",
    "ShardedBatches",
    "ShardedSpec",
    "TOKENIZER_PATH",
    "UNK_ID",
    "USER_ID",
    "USER_MARKER",
    "VOCAB_SIZE",
    "ValidationSet",
    "bits_per_byte",
    "first_validation_batches",
    "get_chat_vocabulary",
    "get_vocabulary",
    "load_chat_sentencepiece",
    "load_documents",
    "load_sentencepiece",
    "packed_dataset",
    "prepare_tfds",
    "register_chat_task",
    "register_default_tasks",
    "register_function_task",
    "register_jsonl_task",
    "register_mixture",
    "register_tasks",
    "register_text_task",
    "register_tfds_task",
    "render_chat",
    "parse_chat_line",
    "INSTRUCTIONS_FILES",
    "required_vocab_size",
    "skipped_records",
    "tfds_name",
    "validation_set",
]
