"""The base's tokenizer, wherever the base comes from: shared by the data (tokenizing rows) and the model layers."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alignment.errors import ModelLoadError
from alignment.hub import resolve_base


def load_tokenizer(base: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    source = resolve_base(base, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    except OSError as err:
        raise ModelLoadError(f"cannot load the tokenizer of {base!r}: {err}") from err
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
