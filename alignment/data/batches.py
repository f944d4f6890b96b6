"""Token ids to batches: the items of each method's data (pairs; single answers for SFT; labelled answers with a
mismatched KL answer for KTO), their truncation, and the padded batches they collate to. Pure functions."""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from alignment.logprobs import IGNORE_INDEX

DataKind = Literal["pairs", "sequences", "unpaired"]  # DPO/ORPO, SFT, KTO
Split = Literal["train", "validation"]


class TokenizedPair(NamedTuple):
    prompt_ids: list[int]
    chosen_ids: list[int]  # the answer only; the full chosen sequence is prompt_ids + chosen_ids
    rejected_ids: list[int]
    index: int  # position of the pair in its split

    @property
    def answers(self) -> tuple[list[int], ...]:
        return self.chosen_ids, self.rejected_ids


class TokenizedSequence(NamedTuple):
    """One prompt and one answer (SFT)."""

    prompt_ids: list[int]
    completion_ids: list[int]  # the answer only; the full sequence is prompt_ids + completion_ids
    index: int  # position in its split

    @property
    def answers(self) -> tuple[list[int], ...]:
        return (self.completion_ids,)


class TokenizedUnpaired(NamedTuple):
    """One prompt, its answer and its label (KTO), with another row's answer to the same prompt: the mismatched
    (prompt, completion) pair whose log-ratio estimates the KL reference point (Ethayarajh et al. 2024, sec. 4.1)."""

    prompt_ids: list[int]
    completion_ids: list[int]  # the rest of tokenize(prompt text + completion text)
    kl_completion_ids: list[int]  # the rest of tokenize(prompt text + another row's completion text)
    index: int  # position in its split
    desirable: bool  # the label: true for a desirable completion

    @property
    def answers(self) -> tuple[list[int], ...]:
        return self.completion_ids, self.kl_completion_ids


class PreferenceBatch(NamedTuple):
    input_ids: Tensor  # (2B, T) chosen rows first, then rejected rows, right-padded
    attention_mask: Tensor  # (2B, T) 1 on real tokens
    labels: Tensor  # (2B, T) = input_ids on answer tokens, IGNORE_INDEX on prompt and padding
    index: Tensor  # (B,) position of each pair in its split


class SequenceBatch(NamedTuple):
    input_ids: Tensor  # (B, T) prompt + answer, right-padded
    attention_mask: Tensor  # (B, T) 1 on real tokens
    labels: Tensor  # (B, T) = input_ids on answer tokens, IGNORE_INDEX on prompt and padding
    index: Tensor  # (B,) position of each row in its split


class UnpairedBatch(NamedTuple):
    input_ids: Tensor  # (2B, T) completion rows first, then the KL rows (prompt + another row's completion)
    attention_mask: Tensor  # (2B, T) 1 on real tokens
    labels: Tensor  # (2B, T) = input_ids on answer tokens, IGNORE_INDEX on prompt and padding
    index: Tensor  # (B,) position of each row in its split
    desirable: Tensor  # (B,) bool, the rows' labels


# ---- pure functions on ids ---------------------------------------------------------------------------------------


def truncate_pair(
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    index: int,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    head: int = 0,
    template: bytes = b"",
) -> TokenizedPair | None:
    """Fit a pair into max_length: the answers keep their START; a prompt over max_prompt_length keeps its first
    `head` tokens and its END (see `cut_prompt`). None when no answer token would be left, or the prompt cannot be
    cut to max_prompt_length."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = cut_prompt(prompt_ids, max_prompt_length, head, template)
        if prompt_ids is None:
            return None
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    return TokenizedPair(prompt_ids, chosen_ids[:room], rejected_ids[:room], index)


def cut_prompt(prompt_ids: list[int], limit: int, head: int = 0, template: bytes = b"") -> list[int] | None:
    """At most `limit` tokens: the first `head` (BOS, system turn: a cut prompt still begins as the template
    begins), then the prompt's end. `template[i]` is 1 where the chat template wrote token i: the end never starts
    inside a run of such tokens (a marker like `<|user|>` may be several tokens), and keeps the final run (the
    generation prompt) whole. None when the head and that final run alone do not fit."""
    final_run = 0
    while final_run < len(template) - head and template[len(template) - 1 - final_run]:
        final_run += 1
    if head + final_run > limit:
        return None
    start = len(prompt_ids) - (limit - head)
    while head < start < len(template) and template[start] and template[start - 1]:
        start += 1
    return prompt_ids[:head] + prompt_ids[start:]


def collate_pairs(pairs: list[TokenizedPair], *, pad_id: int, pad_to_multiple_of: int = 1) -> PreferenceBatch:
    """Stack B pairs into one (2B, T) batch: chosen rows, then rejected rows, right-padded."""
    sequences = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lengths = [len(p.prompt_ids) for p in pairs] * 2
    index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return PreferenceBatch(*_padded(sequences, prompt_lengths, pad_id, pad_to_multiple_of), index)


def collate_sequences(rows: list[TokenizedSequence], *, pad_id: int, pad_to_multiple_of: int = 1) -> SequenceBatch:
    """Stack B prompt + answer rows into one (B, T) batch, right-padded; labels on the answers."""
    sequences = [r.prompt_ids + r.completion_ids for r in rows]
    index = torch.tensor([r.index for r in rows], dtype=torch.long)
    return SequenceBatch(*_padded(sequences, [len(r.prompt_ids) for r in rows], pad_id, pad_to_multiple_of), index)


def collate_unpaired(rows: list[TokenizedUnpaired], *, pad_id: int, pad_to_multiple_of: int = 1) -> UnpairedBatch:
    """Stack B labelled rows into one (2B, T) batch: the completion rows, then the KL rows, right-padded."""
    sequences = [r.prompt_ids + r.completion_ids for r in rows] + [r.prompt_ids + r.kl_completion_ids for r in rows]
    prompt_lengths = [len(r.prompt_ids) for r in rows] * 2
    index = torch.tensor([r.index for r in rows], dtype=torch.long)
    desirable = torch.tensor([r.desirable for r in rows], dtype=torch.bool)
    return UnpairedBatch(*_padded(sequences, prompt_lengths, pad_id, pad_to_multiple_of), index, desirable)


def _padded(
    sequences: list[list[int]], prompt_lengths: list[int], pad_id: int, pad_to_multiple_of: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels), each (R, T): right-padded, labels only after each prompt."""
    width = max(len(s) for s in sequences)
    width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        ids = torch.tensor(sequence, dtype=torch.long)
        input_ids[row, : len(sequence)] = ids
        attention_mask[row, : len(sequence)] = 1
        labels[row, prompt_length : len(sequence)] = ids[prompt_length:]
    return input_ids, attention_mask, labels


def pair_length(pair: TokenizedPair | TokenizedSequence | TokenizedUnpaired) -> int:
    """Width of the pair's longer row: what it costs in a padded batch."""
    return len(pair.prompt_ids) + max(len(answer) for answer in pair.answers)


def pairs_digest(pairs: Sequence[TokenizedPair | TokenizedSequence | TokenizedUnpaired]) -> str:
    """sha256 of the token ids of every pair (and KTO's labels), in order: covers the data, tokenizer, chat
    template and truncation."""
    digest = hashlib.sha256()
    for pair in pairs:
        for part in (pair.prompt_ids, *pair.answers):
            digest.update(len(part).to_bytes(4, "little"))
            digest.update(array("q", part).tobytes())
        if isinstance(pair, TokenizedUnpaired):
            digest.update(bytes([pair.desirable]))
    return digest.hexdigest()
