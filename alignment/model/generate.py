"""Greedy or sampled answers of a model to prompts given as token ids: shared by `compare` and the samples that
training logs to W&B."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignment.errors import ConfigError


@dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int = 128
    do_sample: bool = False  # greedy when False: the same answer on every run
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.0  # 1.0: none

    def applied(self) -> dict[str, Any]:
        """The settings that shaped the answers: temperature and top-p only when sampling."""
        settings = asdict(self)
        if not self.do_sample:
            del settings["temperature"], settings["top_p"]
        return settings

    def generate_kwargs(self) -> dict[str, Any]:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        kwargs["repetition_penalty"] = self.repetition_penalty
        if self.do_sample:
            if self.temperature <= 0 or not 0 < self.top_p <= 1:
                raise ConfigError(f"--temperature must be > 0 and --top-p in (0, 1], got {self.temperature}, "
                                  f"{self.top_p}")  # fmt: skip
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        else:  # unset, so that a model's own generation_config cannot switch sampling warnings on
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    prompts: list[list[int]],
    *,
    pad_id: int,
    stop_ids: set[int],
    decode: DecodeOptions,
    batch_size: int = 8,
    progress: tqdm | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt's answer, cut before the first stop (end-of-sequence or pad) token.

    Prompts are left-padded so that every answer starts right after its own prompt.
    """
    kwargs = decode.generate_kwargs()
    device = next(model.parameters()).device
    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)  # (b, T)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad_id, **kwargs)
        for row in output[:, width:].tolist():  # (b, new tokens)
            cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
            answers.append(row[:cut])
        if progress is not None:
            progress.update(1)
    return answers


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id, tokenizer.pad_token_id}
    return {i for i in ids if i is not None}
