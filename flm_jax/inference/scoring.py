"""Log-likelihood scoring of continuations: what multiple-choice evaluation and the lm-eval adapter ask a model.

    score_continuations(params, config, [(context_ids, continuation_ids), ...])
        -> [Score(logprob=sum of log p(continuation | context), greedy=is the continuation the argmax path)]

Context ids should start the way training rows do (BOS first; `with_bos` adds it). A request longer than the model's
max_position_embeddings keeps its last tokens (the continuation whole, the context cut from the left). Requests are
scored in batches padded to a multiple of `length_multiple`, so a whole evaluation compiles a handful of shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flm_jax.config import ConfigError, TeleFLMConfig
from flm_jax.model import TeleFLM


class Score(NamedTuple):
    logprob: float  # sum of the continuation tokens' log-probabilities (nats)
    greedy: bool  # every continuation token is the argmax given what precedes it


@functools.partial(jax.jit, static_argnames=("config",))
def _score_batch(params, inputs_bt, targets_bt, weights_bt, *, config: TeleFLMConfig):
    logits_btv = TeleFLM(config).apply({"params": params}, inputs_bt).astype(jnp.float32)
    logprobs_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    target_bt = jnp.take_along_axis(logprobs_btv, targets_bt[..., None], axis=-1)[..., 0]
    hit_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
    return (target_bt * weights_bt).sum(-1), jnp.all(hit_bt | (weights_bt == 0), axis=-1)


def with_bos(ids: Sequence[int], config: TeleFLMConfig) -> list[int]:
    return [config.bos_token_id, *ids]


def score_continuations(
    params,
    config: TeleFLMConfig,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    length_multiple: int = 64,
) -> list[Score]:
    """Scores of (context ids, continuation ids) pairs, in order (see the module docstring)."""
    limit = config.max_position_embeddings
    rows = []
    for context, continuation in requests:
        if not continuation:
            raise ConfigError("a scoring request needs a non-empty continuation")
        if not context:
            raise ConfigError(
                "a scoring request needs a context (at least BOS): see flm_jax.inference.scoring.with_bos"
            )
        if len(continuation) > limit:
            raise ConfigError(f"a continuation of {len(continuation)} tokens exceeds max_position_embeddings={limit}")
        tokens = [*context, *continuation][-(limit + 1) :]
        rows.append((tokens[:-1], tokens[1:], len(continuation)))
    scores: list[Score] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = min(-(-max(len(r[0]) for r in chunk) // length_multiple) * length_multiple, limit)
        inputs = np.full((batch_size, length), config.pad_token_id, np.int32)
        targets = np.zeros_like(inputs)
        weights = np.zeros(inputs.shape, np.float32)
        for i, (row_inputs, row_targets, n) in enumerate(chunk):
            inputs[i, : len(row_inputs)], targets[i, : len(row_targets)] = row_inputs, row_targets
            weights[i, len(row_targets) - n : len(row_targets)] = 1.0
        logprob, greedy = _score_batch(params, inputs, targets, weights, config=config)
        scores += [Score(float(lp), bool(g)) for lp, g in zip(np.asarray(logprob)[: len(chunk)], np.asarray(greedy))]
    return scores
