"""flm_jax.data: the embedded corpus, the tokenizer, seqio tasks/mixtures and packed batch iterators.

Importing this package imports TensorFlow (CPU only, GPUs hidden from it) and registers the default tasks
'flm_prose', 'flm_code' and the mixture 'flm_default'. See docs/data.md.
"""

from flm_jax.data import _tf  # noqa: F401  (first: TF log level and GPU hiding)
from flm_jax.data.corpus import DOMAINS, SPLITS, Document, load_documents
from flm_jax.data.pipeline import (
    BatchIterator,
    ValidationSet,
    bits_per_byte,
    packed_dataset,
    validation_set,
)
from flm_jax.data.tasks import (
    DEFAULT_MIXTURE,
    DEFAULT_MIXTURE_RATES,
    register_default_tasks,
    register_function_task,
    register_jsonl_task,
    register_mixture,
    register_tasks,
    register_text_task,
    register_tfds_task,
)
from flm_jax.data.tfds_builder import FlmCorpus, prepare_tfds, tfds_name
from flm_jax.data.vocab import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    TOKENIZER_PATH,
    UNK_ID,
    VOCAB_SIZE,
    get_vocabulary,
    load_sentencepiece,
)

register_default_tasks()

__all__ = [
    "BOS_ID",
    "BatchIterator",
    "DEFAULT_MIXTURE",
    "DEFAULT_MIXTURE_RATES",
    "DOMAINS",
    "Document",
    "EOS_ID",
    "FlmCorpus",
    "PAD_ID",
    "SPLITS",
    "TOKENIZER_PATH",
    "UNK_ID",
    "VOCAB_SIZE",
    "ValidationSet",
    "bits_per_byte",
    "get_vocabulary",
    "load_documents",
    "load_sentencepiece",
    "packed_dataset",
    "prepare_tfds",
    "register_default_tasks",
    "register_function_task",
    "register_jsonl_task",
    "register_mixture",
    "register_tasks",
    "register_text_task",
    "register_tfds_task",
    "tfds_name",
    "validation_set",
]
