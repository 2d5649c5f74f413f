"""The committed SentencePiece tokenizer: ids, training recipe and the seqio vocabulary."""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterable

import sentencepiece as spm

# isort: split  (TensorFlow's settings in flm_jax.data._tf apply before seqio / tfds import it)
import seqio  # noqa: E402

from flm_jax.data import _tf  # noqa: F401  (TF settings before seqio imports it)
from flm_jax.data.corpus import ASSETS_DIR

TOKENIZER_PATH = os.path.join(ASSETS_DIR, "tokenizer.model")
VOCAB_SIZE = 2048  # a multiple of 128
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # Tele-FLM's special ids

# Llama-style BPE: identity normalisation (whitespace kept, so code survives), digits split, byte fallback
# (any UTF-8 text encodes). Trained on whole documents, so pieces may hold newlines (e.g. '):\n'); no dummy
# prefix, so a line start looks the same in training and in encoding. One thread, all sentences in order,
# no sampling: training is deterministic.
TRAINER_OPTIONS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    pad_piece="<pad>",
    bos_piece="<s>",
    eos_piece="</s>",
    unk_piece="<unk>",
    byte_fallback=True,
    character_coverage=0.9999,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    max_sentencepiece_length=16,
    max_sentence_length=1 << 17,  # bytes; longer documents would be skipped silently
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=2,
)


def train_tokenizer(sentences: Iterable[str]) -> bytes:
    """Trains the tokenizer on `sentences` (whole documents); returns the serialized model."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **TRAINER_OPTIONS)
    return model.getvalue()


def load_sentencepiece(path: str = TOKENIZER_PATH) -> spm.SentencePieceProcessor:
    """The tokenizer as a plain SentencePieceProcessor (no TensorFlow involved)."""
    return spm.SentencePieceProcessor(model_file=path)


@functools.cache
def get_vocabulary(path: str = TOKENIZER_PATH) -> seqio.SentencePieceVocabulary:
    """The seqio vocabulary of the tokenizer at `path` (default: the committed one)."""
    return seqio.SentencePieceVocabulary(path)
