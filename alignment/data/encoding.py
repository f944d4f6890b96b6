"""Preference rows → token ids: the text of each pair rendered once, then tokenized as whole sequences.

The ids we train are the tokens of the text. A chosen sequence is tokenized as prompt text + chosen text at once,
and split where its tokens part from the prompt's own; encoding an answer on its own would start it as a new text
(SentencePiece tokenizers put a `▁` in front of its first word, a space that is not in the text).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import NamedTuple

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from alignment.data.rows import PreferenceRow
from alignment.errors import DataError

log = logging.getLogger(__name__)


class EncodedPair(NamedTuple):
    """A pair's token ids before truncation, with what truncating its prompt must respect."""

    prompt_ids: list[int]  # shared by both answers: the prompt's own ids, up to where either answer's part from them
    chosen_ids: list[int]  # the rest of tokenize(prompt text + chosen text)
    rejected_ids: list[int]
    head: int  # prompt tokens a cut keeps at its start: BOS, the system turn, the first user turn's header
    template: bytes  # per prompt token: 1 where the chat template wrote it, 0 inside a message's text


# ---- text ---------------------------------------------------------------------------------------------------------


def _as_messages(part: str | list[dict[str, str]], role: str) -> list[dict[str, str]]:
    return [{"role": role, "content": part}] if isinstance(part, str) else list(part)


def prompt_messages(row: PreferenceRow) -> list[dict[str, str]]:
    """The row's prompt as chat messages, its system field as the first turn."""
    messages = _as_messages(row.prompt, "user")
    if row.system:
        if messages and messages[0]["role"] == "system":
            raise DataError(f"{row.source}: the row has both a system field and a system message in its prompt")
        messages = [{"role": "system", "content": row.system}] + messages
    return messages


def render_pair(row: PreferenceRow, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> tuple[str, ...]:
    """(prompt, chosen, rejected) as text; the prompt is rendered once, so both answers share its boundary."""
    if not use_chat_template:
        if not isinstance(row.prompt, str):
            raise DataError(
                f"{row.source}: rows are chat messages but no chat template is used "
                "(the tokenizer has none, or --data.use_chat_template false)"
            )
        prompt = f"{row.system}\n\n{row.prompt}" if row.system else row.prompt
        return prompt, row.chosen, row.rejected  # EOS is appended to the answers as an id, not as text
    messages = prompt_messages(row)
    prompt = _apply_template(tokenizer, messages, row.source, add_generation_prompt=True)
    _check_rendered(prompt, messages, row.source)
    answers = []
    for answer in (row.chosen, row.rejected):
        full = _apply_template(tokenizer, messages + _as_messages(answer, "assistant"), row.source)
        if not full.startswith(prompt):
            raise DataError(
                f"{row.source}: the chat template renders the prompt differently inside the whole conversation, "
                "so the prompt/answer boundary cannot be found; try --data.use_chat_template false"
            )
        answers.append(full[len(prompt) :])
    return prompt, answers[0], answers[1]


def _apply_template(tokenizer: PreTrainedTokenizerBase, messages: list, source: str, **kwargs) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as err:  # templates raise their own errors, e.g. roles that do not alternate
        raise DataError(f"{source}: the tokenizer's chat template rejects this conversation: {err}") from err


def _check_rendered(prompt: str, messages: list[dict[str, str]], source: str) -> None:
    """A template that leaves a message out (e.g. a role it does not know) must not train on a prompt it dropped."""
    for number, message in enumerate(messages, 1):
        if message["content"].strip() not in prompt:
            raise DataError(
                f"{source}: the chat template leaves out prompt message {number} (role {message['role']!r}); "
                "check the roles, or use --data.use_chat_template false"
            )


def _content_spans(prompt: str, messages: list[dict[str, str]] | None) -> tuple[list[tuple[int, int]], int]:
    """Character spans of the messages' text inside the rendered prompt, and where the first non-system text
    starts. Plain prompts are all text."""
    if messages is None:
        return [(0, len(prompt))], 0
    spans, cursor, first = [], 0, None
    for message in messages:
        text = message["content"].strip()
        start = prompt.find(text, cursor) if text else -1
        if start < 0:
            continue
        spans.append((start, start + len(text)))
        cursor = start + len(text)
        if first is None and message["role"] != "system":
            first = start
    return spans, len(prompt) if first is None else first


def cut_row(row: PreferenceRow, max_length: int) -> PreferenceRow:
    """The row with text that no truncation to `max_length` tokens can keep left out before tokenizing it: a few
    hundred MB in one row would otherwise cost GBs and minutes, for 192 tokens kept.

    An answer keeps its start (truncation keeps an answer's first tokens), the system field and each prompt message
    their start and end (a prompt keeps its first `head` tokens and its end), each part `bound` characters: at most
    `CHARS_PER_TOKEN` characters a token on average, so that the part still holds `max_length` tokens and `MARGIN`
    more, where the cut's own effect on tokenization (a word split in two) stays. `tokenize_rows` checks that the
    cut text holds that many tokens, and tokenizes the whole text of a row where it does not."""
    bound = CHARS_PER_TOKEN * (max_length + MARGIN)

    def ends(text: str) -> str:
        return text if len(text) <= 2 * bound else text[:bound] + text[-bound:]

    def start(text: str) -> str:
        return text[:bound]

    cut = dataclasses.replace(
        row, prompt=_cut_text(row.prompt, ends), chosen=_cut_text(row.chosen, start),
        rejected=_cut_text(row.rejected, start), system=ends(row.system) if row.system else row.system,
    )  # fmt: skip
    return row if cut == row else cut


CHARS_PER_TOKEN = 64  # far more than any tokenizer's average over a long text (English: about 4)
MARGIN = 16  # tokens past the last one a truncation may keep, between it and a cut


def _cut_text(part: str | list[dict[str, str]], cut: Callable[[str], str]) -> str | list[dict[str, str]]:
    if isinstance(part, str):
        return cut(part)
    return [m | {"content": cut(m["content"])} if isinstance(m.get("content"), str) else m for m in part]


def _holds_what_is_kept(pair: EncodedPair, row: PreferenceRow, cut: PreferenceRow, max_length: int) -> bool:
    """Whether each part of a cut row still has `max_length` + `MARGIN` tokens past its cut (see `cut_row`)."""
    need = max_length + MARGIN
    answers = [(ids, a != b) for ids, a, b in ((pair.chosen_ids, row.chosen, cut.chosen),
                                                (pair.rejected_ids, row.rejected, cut.rejected))]  # fmt: skip
    prompt_cut = row.prompt != cut.prompt or row.system != cut.system
    return all(len(ids) >= need for ids, was_cut in answers if was_cut) and (
        not prompt_cut or len(pair.prompt_ids) >= 2 * need
    )


# ---- ids ----------------------------------------------------------------------------------------------------------


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _prompt_layout(
    offsets: list[tuple[int, int]] | None, n_ids: int, spans: list[tuple[int, int]], first_text: int, bos: int
) -> tuple[int, bytes]:
    """(head, template mask) of a prompt's ids from each token's character offsets; `bos` ids were put in front."""
    if offsets is None:  # a slow tokenizer gives no offsets: only BOS is known to be template
        return bos, bytes([1] * bos + [0] * (n_ids - bos))
    mask, head, k = bytearray([1] * bos), None, 0
    for position, (start, end) in enumerate(offsets, bos):
        while k < len(spans) and spans[k][1] <= start:  # spans and offsets both run left to right
            k += 1
        mask.append(0 if k < len(spans) and end > spans[k][0] else 1)
        if head is None and end > first_text:
            head = position
    return (n_ids if head is None else head), bytes(mask)


def tokenize_rows(
    rows: list[PreferenceRow],
    tokenizer: PreTrainedTokenizerBase,
    use_chat_template: bool,
    desc: str = "tokenizing",
    layout_over: int | None = 0,
    max_length: int | None = None,
) -> list[EncodedPair]:
    """Token ids of each pair, before truncation (see `EncodedPair`).

    Each answer's ids are the tail of tokenize(prompt text + answer text), so prompt ids + answer ids are the tokens
    of the whole text. Where a token spans the boundary (a prompt ending in a space that the answer's first word
    takes, as `▁Blue`), the prompt keeps the ids it shares with both answers and that token belongs to the answer:
    the model learns the token it would really emit there (TRL's DPO splits at the same place). BOS goes in front
    when the tokenizer would add it and the text lacks it; EOS ends plain answers unless they end with it already
    (a chat template writes its own end of turn). `head` and `template` are worked out for prompts longer than
    `layout_over` tokens only (the ones truncation will cut; None: for none), the others get 0 and b"".
    With `max_length`, text that no truncation to it can keep is left out first (`cut_row`): the ids a truncation
    to `max_length` keeps are those of the whole text.
    """
    if max_length is not None:
        cut = [cut_row(row, max_length) for row in rows]
        encoded = tokenize_rows(cut, tokenizer, use_chat_template, desc, layout_over)
        for i, (row, short) in enumerate(zip(rows, cut, strict=True)):
            if short is not row and not _holds_what_is_kept(encoded[i], row, short, max_length):
                (encoded[i],) = tokenize_rows([row], tokenizer, use_chat_template, desc, layout_over)
        return encoded
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    eos = [] if use_chat_template else [tokenizer.eos_token_id]
    offsets_ok = getattr(tokenizer, "is_fast", False)
    encoded: list[EncodedPair] = []
    merged: list[str] = []
    chunk = 1024
    with tqdm(total=len(rows), desc=desc, unit="pairs", disable=len(rows) <= chunk) as progress:
        for start in range(0, len(rows), chunk):
            batch = rows[start : start + chunk]
            texts = [render_pair(row, tokenizer, use_chat_template) for row in batch]
            prompts = tokenizer([t[0] for t in texts], add_special_tokens=False, return_offsets_mapping=offsets_ok)
            chosen = tokenizer([t[0] + t[1] for t in texts], add_special_tokens=False)["input_ids"]
            if all(t[2] == t[1] for t in texts):  # single answers (SFT) come as pairs of one answer twice
                rejected = chosen
            else:
                rejected = tokenizer([t[0] + t[2] for t in texts], add_special_tokens=False)["input_ids"]
            for i, row in enumerate(batch):
                front = bos if bos and prompts["input_ids"][i][:1] != bos else []
                prompt, whole_chosen, whole_rejected = (
                    front + ids for ids in (prompts["input_ids"][i], chosen[i], rejected[i])
                )
                shared = min(common_prefix(prompt, whole_chosen), common_prefix(prompt, whole_rejected))
                if shared < len(prompt):
                    merged.append(row.source)
                head, template = 0, b""
                if layout_over is not None and len(prompt) > layout_over:
                    messages = prompt_messages(row) if use_chat_template else None
                    spans, first_text = _content_spans(texts[i][0], messages)
                    offsets = prompts["offset_mapping"][i] if offsets_ok else None
                    head, template = _prompt_layout(offsets, len(prompt), spans, first_text, len(front))
                answers = [_end_with(ids[shared:], eos) for ids in (whole_chosen, whole_rejected)]
                encoded.append(EncodedPair(prompt[:shared], answers[0], answers[1], min(head, shared), template))
            progress.update(len(batch))
    if merged:
        log.info(
            "%s: in %d pairs a token spans the end of the prompt and the start of an answer; it is trained as the "
            "answer's first token (first: %s)", desc, len(merged), merged[0],
        )  # fmt: skip
    return encoded


def _end_with(ids: list[int], eos: list[int]) -> list[int]:
    return ids + eos if eos and ids[-len(eos) :] != eos else ids


def prompt_ids(
    rows: list[PreferenceRow], tokenizer: PreTrainedTokenizerBase, use_chat_template: bool
) -> list[list[int]]:
    """The prompts' ids as training renders them (chat template, BOS, system turn), to generate from."""
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for row in rows:
        ids = tokenizer(render_pair(row, tokenizer, use_chat_template)[0], add_special_tokens=False)["input_ids"]
        out.append(ids if not bos or ids[:1] == bos else bos + ids)
    return out
