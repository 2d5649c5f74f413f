"""An lm-evaluation-harness model backed by flm_jax: `lm_eval ... --model flm_jax --model_args workdir=DIR`.

Importing this module registers the model name `flm_jax` with lm-eval (`python -m flm_jax.lm_eval` does it).
model_args: exactly one of `workdir=DIR` (a checkpoint: the latest, or `step=N`) and `hf_dir=DIR` (a Hugging Face
folder), then optionally `batch_size` (rows per compiled batch; lm-eval's --batch_size when not given here; `auto`
means 8), `max_gen_toks` (generate_until's default budget, 256), `tokenizer` (a SentencePiece model; default
flm_jax's) and `seed` (sampling, when a task asks for it). Everything runs through the library:
inference.loading.load_model, inference.scoring.score_continuations and inference.generate.generate.

Tokenization follows lm-eval's causal-model convention (lm_eval.api.model.TemplateLM, which this class extends):
a context's trailing whitespace moves to the continuation, then context + continuation is encoded whole and split
after the context's own tokens. Encoding whole is what the model saw in training (a document is encoded in one
piece) and is what lm-eval's Hugging Face backend does, so scores compare with published ones. Contexts get BOS
first (training rows start with BOS); an empty context is BOS alone. SentencePiece never emits BOS from text.

loglikelihood_rolling uses lm-eval's own windows (get_rolling_token_windows + make_disjoint_window, context_len=1)
with max_seq_len = max_position_embeddings and BOS as the prefix: the first window starts with BOS, later windows
are mid-document slices of the full model length (as in lm-eval's other backends).

generate_until: requests are grouped by their gen_kwargs (normalised by lm-eval: `until`, `max_gen_toks` and its
aliases, `do_sample`, `temperature`, `top_k`, `top_p`), greedy unless do_sample/temperature ask to sample. A batch
decodes until EOS or max_gen_toks (the decoder cannot stop on a string), then each text is cut at its first stop
string. Prompts keep BOS and their last max_position_embeddings - max_gen_toks tokens.
"""

from __future__ import annotations

import inspect
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import sentencepiece as spm
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from flm_jax.config import ConfigError
from flm_jax.hf.tokenizer import default_tokenizer_path
from flm_jax.inference.generate import generate
from flm_jax.inference.loading import load_model
from flm_jax.inference.scoring import Score, score_continuations, with_bos
from flm_jax.params import count_params

MODEL_NAME = "flm_jax"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256


def _batch_size(value: Any) -> int:
    """lm-eval passes --batch_size as text; `auto` / `auto:N` (a Hugging Face backend search) means the default."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"batch_size must be a positive integer or auto, got {value!r}") from None
    if size < 1:
        raise ConfigError(f"batch_size must be a positive integer or auto, got {value!r}")
    return size


@register_model(MODEL_NAME)
class FlmJaxLM(TemplateLM):
    """lm-eval's LM interface over an flm_jax model (see the module docstring)."""

    def __init__(
        self,
        workdir: str | None = None,
        hf_dir: str | None = None,
        step: int | None = None,
        batch_size: int | str | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        tokenizer: str | None = None,
        seed: int = 0,
        device: str | None = None,  # lm-eval's --device: JAX places the model on its default backend instead
        max_batch_size: int | None = None,  # lm-eval's --max_batch_size (for batch_size=auto): unused
    ) -> None:
        super().__init__()
        if (workdir is None) == (hf_dir is None):
            raise ConfigError("give exactly one of model_args workdir=DIR (a checkpoint) and hf_dir=DIR (Hugging Face)")
        # lm-eval turns model_args text that looks like a number into one: paths go back to text.
        workdir, hf_dir = (None if d is None else str(d) for d in (workdir, hf_dir))
        step = None if step is None else int(step)
        config, params = load_model(workdir=workdir, hf_dir=hf_dir, step=step)
        self.config = config
        self.params = jax.device_put(params)  # once, not at every batch
        tokenizer_path = Path(str(tokenizer)) if tokenizer else default_tokenizer_path()
        if not tokenizer_path.is_file():
            raise FileNotFoundError(f"tokenizer {tokenizer_path} not found: pass tokenizer=PATH (SentencePiece)")
        self.tokenizer_path = tokenizer_path
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        if self.sp.get_piece_size() > config.vocab_size:
            raise ConfigError(
                f"tokenizer {tokenizer_path} has {self.sp.get_piece_size()} pieces but the model's vocab_size is "
                f"{config.vocab_size}: pass the model's tokenizer (tokenizer=PATH)"
            )
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._info = {
            "flm_jax_source": str(workdir if workdir is not None else hf_dir),
            "flm_jax_step": step,
            "model_num_parameters": count_params(params),
        }

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None):
        """model_args win over the harness's own settings (its --batch_size defaults to 1 and would otherwise
        clash with a batch_size given in model_args)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        known = list(inspect.signature(cls).parameters)
        unknown = sorted(set(arg_dict) - set(known))
        if unknown:
            raise ConfigError(f"unknown flm_jax model_args {unknown}; known: {', '.join(known)}")
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- what TemplateLM needs --------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.config.bos_token_id  # an empty context is BOS alone, as a training row starts

    @property
    def max_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer_path)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """SentencePiece ids of the text, never BOS (the scoring and generation paths add it)."""
        return self.sp.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def get_model_info(self) -> dict[str, Any]:
        return dict(self._info)

    # --- scoring ----------------------------------------------------------------------------------------------

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool, desc: str) -> list[Score]:
        """score_continuations over (context, continuation) id pairs, longest first so that a batch's rows have
        similar lengths (little padding, few compiled shapes); results in the given order."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        scores: list[Score | None] = [None] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=disable_tqdm):
            chunk = order[start : start + self.batch_size]
            batch = score_continuations(self.params, self.config, [pairs[i] for i in chunk], self.batch_size)
            for i, score in zip(chunk, batch):
                scores[i] = score
        return scores  # type: ignore[return-value]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """TemplateLM.loglikelihood tokenizes ((context, continuation), context ids, continuation ids); BOS is put
        in front of every context that does not already start with it (an empty context arrives as [BOS])."""
        bos = self.config.bos_token_id
        pairs = [
            (list(ctx) if ctx[:1] == [bos] else with_bos(ctx, self.config), list(cont)) for _, ctx, cont in requests
        ]
        scores = self._score(pairs, disable_tqdm, "flm_jax loglikelihood")
        out = []
        for (key, _, _), score in zip(requests, scores):
            answer = (score.logprob, score.greedy)
            self.cache_hook.add_partial("loglikelihood", key, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((list(context), list(continuation)))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, score in zip(owners, self._score(windows, disable_tqdm, "flm_jax loglikelihood_rolling")):
            totals[i] += score.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        out: list[str | None] = [None] * len(requests)
        batch_index = 0
        bar = tqdm(total=len(requests), desc="flm_jax generate_until", disable=disable_tqdm)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            # EOS stops decoding at the token level; SentencePiece decodes it to '', so no EOS stop string.
            until = handle_stop_sequences(kwargs.pop("until", None), eos=None)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample"):
                temperature = float(kwargs.get("temperature", 1.0))  # sampling with no temperature: 1, as in HF
            else:
                temperature = 0.0
            top_k, top_p = int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0)
            room = self.max_length - max_gen_toks
            if room < 2:
                raise ConfigError(
                    f"max_gen_toks={max_gen_toks} leaves no room for a prompt within max_position_embeddings="
                    f"{self.max_length}: lower max_gen_toks (model_args or the task's generation_kwargs)"
                )
            prompts = {i: with_bos(self.tok_encode(requests[i].args[0])[-(room - 1) :], self.config) for i in indices}
            indices = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                new_bn = generate(
                    self.params,
                    self.config,
                    [prompts[i] for i in chunk],
                    max_gen_toks,
                    temperature,
                    self.seed + batch_index,
                    self.eot_token_id,
                    top_k=top_k,
                    top_p=top_p,
                    kv_cache=True,
                )
                batch_index += 1
                for i, ids in zip(chunk, new_bn.tolist()):
                    if self.eot_token_id in ids:
                        ids = ids[: ids.index(self.eot_token_id)]
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]
