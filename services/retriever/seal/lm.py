"""The language model SEAL decodes n-grams with: any Hugging Face causal or seq2seq LM in a local folder.

The folder holds the model (safetensors only: nothing is unpickled) and a fast tokenizer; the tokenizer's
ids, without special tokens, are the token ids the FM-index holds, and its offset mapping turns matched
token spans back into character spans of the passage text.

How a query conditions the model:
- causal (GPT-2 style): the sequence is `[bos] query [sep] n-gram`, with bos/sep the tokenizer's
  cls/sep tokens (bos/eos where it has none); the loss of training covers the n-gram only;
- seq2seq (T5/BART style): the encoder reads the query framed as the tokenizer frames a text, the decoder
  starts from the model's `decoder_start_token_id` and emits the n-gram.
`SealLM.example` builds a training example in that same layout, so training and decoding agree.

Queries longer than MAX_QUERY_TOKENS tokens are cut there. Errors are plain: a folder that is missing or
unusable is an `ArtifactError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from services.runtime.model_errors import ArtifactError

MAX_QUERY_TOKENS = 64


class SealLM:
    """A causal or seq2seq LM with its tokenizer, scoring n-grams given a query."""

    def __init__(self, model, tokenizer, model_id: str, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = device
        config = model.config
        self.is_seq2seq = bool(config.is_encoder_decoder)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        if self.vocab_size < len(tokenizer):
            raise ArtifactError(
                f"{model_id}: the model predicts {self.vocab_size} tokens, its tokenizer has {len(tokenizer)}"
            )
        if self.is_seq2seq:
            # The encoder reads the query framed by the tokenizer's special tokens, found from a probe.
            bare = tokenizer("a", add_special_tokens=False)["input_ids"]
            framed = tokenizer("a")["input_ids"]
            cut = next(i for i in range(len(framed)) if framed[i : i + len(bare)] == bare)
            self.source_prefix, self.source_suffix = framed[:cut], framed[cut + len(bare) :]
            self.decoder_start = config.decoder_start_token_id
            if self.decoder_start is None:
                raise ArtifactError(f"{model_id}: a seq2seq model needs decoder_start_token_id in its config")
        else:
            self.bos = _first_id(tokenizer, "cls_token_id", "bos_token_id")
            self.sep = _first_id(tokenizer, "sep_token_id", "eos_token_id")
            if self.bos is None or self.sep is None:
                raise ArtifactError(
                    f"{model_id}: the tokenizer has no cls/bos and sep/eos tokens to frame a query"
                )

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> SealLM:
        """The LM in the folder `path`; ArtifactError when it is missing or unusable."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ArtifactError(
                f"no SEAL language model at {folder} (a folder with config.json); "
                "make one with `ragfleet train seal`"
            )
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
            model = auto.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ArtifactError(f"{folder}: not a loadable language model ({err})") from err
        if not tokenizer.is_fast:
            raise ArtifactError(
                f"{folder}: the tokenizer must be a fast one (offset mappings give the highlights)"
            )
        return cls(model, tokenizer, str(path), device)

    # -- tokens ----------------------------------------------------------------------------

    def encode_query(self, text: str) -> tuple[list[int], list[int]]:
        """The query's token ids (at most MAX_QUERY_TOKENS) and each one's word number."""
        encoding = self.tokenizer(
            text, add_special_tokens=False, truncation=True, max_length=MAX_QUERY_TOKENS
        )
        words = encoding.word_ids()
        return list(encoding["input_ids"]), [w if w is not None else -1 for w in words]

    def encode_passage(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The passage's token ids, as the index holds them, and each token's character span."""
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(encoding["input_ids"]), [tuple(span) for span in encoding["offset_mapping"]]

    def encode_passages(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many passages at once (the fast tokenizer's batch path)."""
        return [
            list(ids)
            for ids in self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        ]

    def example(self, query: Sequence[int], target: Sequence[int]) -> dict[str, list[int]]:
        """A training example: model inputs and labels (-100 where no loss is taken)."""
        query = list(query[:MAX_QUERY_TOKENS])
        if self.is_seq2seq:
            return {
                "input_ids": [*self.source_prefix, *query, *self.source_suffix],
                "labels": list(target),
            }
        prompt = [self.bos, *query, self.sep]
        return {"input_ids": prompt + list(target), "labels": [-100] * len(prompt) + list(target)}

    # -- scores ----------------------------------------------------------------------------

    @torch.inference_mode()
    def _logprobs(
        self, query: Sequence[int], continuations: Sequence[Sequence[int]], last_only: bool = False
    ) -> list[torch.Tensor]:
        """For each continuation c: (len(c) + 1, vocab) log-probabilities of the token at each position
        of c and of the one after it (with `last_only`, (1, vocab): the one after it)."""
        query = list(query[:MAX_QUERY_TOKENS])
        if self.is_seq2seq:
            sources = [[*self.source_prefix, *query, *self.source_suffix]]
            decoded = [[self.decoder_start, *c] for c in continuations]
            ids, mask = _pad(decoded, self.device)
            source, source_mask = _pad(sources * len(decoded), self.device)
            logits = self.model(
                input_ids=source,
                attention_mask=source_mask,
                decoder_input_ids=ids,
                decoder_attention_mask=mask,
            ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            return [logprobs[i, len(c) * last_only : len(c) + 1] for i, c in enumerate(continuations)]
        prompt = [self.bos, *query, self.sep]
        ids, mask = _pad([prompt + list(c) for c in continuations], self.device)
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        # The vocabulary-wide output layer runs on the positions asked for only (the continuations').
        start = len(prompt) - 1
        rows = [
            hidden[i, start + len(c) * last_only : start + len(c) + 1] for i, c in enumerate(continuations)
        ]
        logprobs = torch.log_softmax(self.model.get_output_embeddings()(torch.cat(rows)).float(), dim=-1)
        return list(logprobs.split([len(r) for r in rows]))

    def next_logprobs(self, query: Sequence[int], prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        """(len(prefixes), vocab_size) log-probabilities of the token after each prefix."""
        return torch.cat(self._logprobs(query, prefixes, last_only=True)).cpu().numpy()

    def sequence_logprobs(self, query: Sequence[int], ngrams: Sequence[Sequence[int]]) -> np.ndarray:
        """(len(ngrams),) log-probability of each n-gram given the query."""
        scores = []
        for rows, ngram in zip(self._logprobs(query, ngrams), ngrams, strict=True):
            scores.append(float(rows[torch.arange(len(ngram)), torch.tensor(list(ngram))].sum()))
        return np.array(scores, dtype=np.float64)


def _first_id(tokenizer, *names: str) -> int | None:
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def _pad(sequences: Sequence[Sequence[int]], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0, masked out) and their attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
