"""The tiny offline model: a seeded random 2-layer Llama and a byte-level tokenizer, built locally, no download."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from alignment.files import cache_dir, share_like_plain_writes

TINY = "tiny"  # base name of the offline model: a 2-layer Llama with random weights and a byte tokenizer
TINY_VERSION = 1  # bump when the tiny model or tokenizer changes, so cached copies are rebuilt

_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (one byte = one token): any text, no download, exact lengths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[4:]})
    # like Llama's tokenizer: BOS in front of plain encodes (the data pipeline relies on seeing that)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(root: Path | None = None) -> Path:
    """Write (once) a seeded random 2-layer Llama and its tokenizer to the cache; return the directory."""
    target = (root or cache_dir()) / f"tiny-llama-v{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    # write aside, then rename: concurrent processes (DDP ranks, parallel tests) never see half a model
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar for a 0.3 MB file would stand before a mistake's one line
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    share_like_plain_writes(staging)  # mkdtemp and safetensors write in private
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target
