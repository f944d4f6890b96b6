"""The tokens we train are the tokens of the text: prompt ids + answer ids = tokenize(prompt text + answer text),
on a SentencePiece Llama tokenizer with the Zephyr template and a Llama-3-style byte-level one with its template."""

from __future__ import annotations

import pytest

from alignment.data import cut_prompt, truncate_pair
from alignment.data.encoding import adds_bos, render_pair, tokenize_rows
from alignment.data.rows import PreferenceRow
from tests.real_tokenizers import llama3_style, sentencepiece_llama


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return sentencepiece_llama(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def llama3():
    return llama3_style()


def tokenizers(request) -> object:
    return request.getfixturevalue(request.param)


both = pytest.mark.parametrize("tok", ["spm", "llama3"], indirect=True)


@pytest.fixture
def tok(request):
    return request.getfixturevalue(request.param)


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


ROWS = {
    "plain": PreferenceRow("What colour is the sky?", "Blue.", "Green, green, green."),
    "plain, prompt ends in a space": PreferenceRow("Q: sky colour?\nA: ", "Blue.", "Red"),
    "plain, prompt ends in two spaces": PreferenceRow("Answer:  ", "Blue", "no"),
    "plain, system": PreferenceRow("Name a city.", "Paris.", "Paris Paris Paris", system="Be brief."),
    "plain, unicode": PreferenceRow("Écris « café » ", "naïve café 東京 🙂", "cafe"),
    "chat": PreferenceRow([msg("user", "What colour is the sky?")], [msg("assistant", "Blue.")], "Green."),
    "chat, system": PreferenceRow("Name a city.", "Paris.", "London?", system="You are terse."),
    "chat, multi-turn": PreferenceRow(
        [msg("user", "Hi"), msg("assistant", "Hello! How can I help?"), msg("user", "Capital of France? ")],
        "The capital of France is Paris.",
        "I don't know.",
    ),
    "chat, unicode": PreferenceRow("Dis « bonjour » 🙂", "Bonjour ! naïve", "東京"),
}


def whole_text_ids(tokenizer, text: str) -> list[int]:
    """The whole text tokenized at once, BOS in front as the tokenizer puts it (never twice)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if adds_bos(tokenizer) and ids[:1] != [bos] else ids


@both
@pytest.mark.parametrize("name", list(ROWS))
def test_prompt_and_answer_ids_are_the_tokens_of_the_whole_text(tok, name):
    row = ROWS[name]
    chat = name.startswith("chat")
    prompt_text, chosen_text, rejected_text = render_pair(row, tok, chat)
    (pair,) = tokenize_rows([row], tok, chat)
    eos = [] if chat else [tok.eos_token_id]
    for answer_text, answer_ids in ((chosen_text, pair.chosen_ids), (rejected_text, pair.rejected_ids)):
        assert pair.prompt_ids + answer_ids == whole_text_ids(tok, prompt_text + answer_text) + eos
        ids = pair.prompt_ids + answer_ids
        if not prompt_text.startswith(tok.bos_token):  # BOS was put in front as an id, not as text
            assert ids[0] == tok.bos_token_id
            ids = ids[1:]
        assert tok.decode(ids, skip_special_tokens=False) == prompt_text + answer_text + (tok.eos_token if eos else "")


def test_an_answer_does_not_begin_with_a_space_that_is_not_in_the_text(spm):
    row = PreferenceRow([msg("user", "Sky?")], [msg("assistant", "Blue.")], [msg("assistant", "Red.")])
    (pair,) = tokenize_rows([row], spm, True)
    alone = spm("Blue.", add_special_tokens=False)["input_ids"]
    assert spm.convert_ids_to_tokens(alone)[0].startswith("▁")  # what encoding the answer on its own gives
    assert not spm.convert_ids_to_tokens(pair.chosen_ids)[0].startswith("▁")
    assert spm.decode(pair.chosen_ids) == "Blue.</s>\n"


def test_a_token_across_the_boundary_belongs_to_the_answer_and_the_prompt_ids_stay_shared(spm):
    row = PreferenceRow("Q: sky colour?\nA: ", "Blue", "Blue sky")
    (pair,) = tokenize_rows([row], spm, False)
    prompt_alone = whole_text_ids(spm, "Q: sky colour?\nA: ")
    assert spm.convert_ids_to_tokens(prompt_alone)[-1] == "▁"  # the prompt's own last token, a bare space
    assert pair.prompt_ids == prompt_alone[:-1]
    assert spm.convert_ids_to_tokens(pair.chosen_ids)[0] == "▁Blue"
    assert spm.convert_ids_to_tokens(pair.rejected_ids)[0] == "▁Blue"


@both
def test_eos_is_appended_only_when_the_answer_lacks_it(tok):
    row = PreferenceRow("Say hi.", "hi" + tok.eos_token, "bye")
    (pair,) = tokenize_rows([row], tok, False)
    assert pair.chosen_ids.count(tok.eos_token_id) == 1 and pair.chosen_ids[-1] == tok.eos_token_id
    assert pair.rejected_ids.count(tok.eos_token_id) == 1 and pair.rejected_ids[-1] == tok.eos_token_id


# ---- a cut prompt begins as the template begins -----------------------------------------------------------------


def final_run(enc) -> int:
    """Template tokens at the prompt's end: the end of the last user turn and the generation prompt."""
    return len(enc.template) - len(enc.template.rstrip(b"\x01"))


def long_chat_row() -> PreferenceRow:
    turns = [msg("user", "First question about functions and classes in the language reference. " * 6)]
    turns += [msg("assistant", "An answer about the import system and modules. " * 6)]
    turns += [msg("user", "And what does the yield statement do?")]
    return PreferenceRow(turns, "It makes a generator.", "No idea.", system="You are a careful teacher.")


@both
@pytest.mark.parametrize("extra", [1, 7, 20, 45])
def test_a_cut_prompt_keeps_bos_and_the_system_turn_and_its_end(tok, extra):
    row = long_chat_row()
    (enc,) = tokenize_rows([row], tok, True)
    assert len(enc.prompt_ids) > 120
    limit = enc.head + final_run(enc) + extra
    pair = truncate_pair(
        enc.prompt_ids, enc.chosen_ids, enc.rejected_ids, 0,
        max_length=512, max_prompt_length=limit, head=enc.head, template=enc.template,
    )  # fmt: skip
    assert len(pair.prompt_ids) <= limit
    text = tok.decode(pair.prompt_ids, skip_special_tokens=False)
    system_turn = tok.decode(enc.prompt_ids[: enc.head], skip_special_tokens=False)
    assert "You are a careful teacher." in system_turn
    assert text.startswith(system_turn)  # BOS, the system turn and the first header, as the template begins
    assert text.startswith(tok.bos_token)
    rendered = render_pair(row, tok, True)[0]
    assert text.endswith(rendered[-15:])  # the generation prompt, whole
    if extra >= 20:
        assert text.endswith("yield statement do?" + rendered.rsplit("do?", 1)[1])  # and the prompt's end before it


def test_a_cut_never_starts_inside_a_template_marker(spm):
    row = long_chat_row()
    (enc,) = tokenize_rows([row], spm, True)
    markers = ("<|user|>", "<|assistant|>", "<|system|>")
    for limit in range(enc.head + final_run(enc), len(enc.prompt_ids)):
        kept = cut_prompt(enc.prompt_ids, limit, enc.head, enc.template)
        tail = spm.decode(kept[enc.head :], skip_special_tokens=False)
        # the tail starts either inside a message's text or at a whole marker, never in the middle of one
        broken = [m for m in markers if any(tail.startswith(m[i:]) for i in range(1, len(m)))]
        assert not broken, (limit, tail[:20])


def test_a_prompt_whose_template_start_and_end_alone_are_too_long_is_dropped(spm):
    (enc,) = tokenize_rows([long_chat_row()], spm, True)
    final = final_run(enc)
    assert final >= 5  # "</s>\n<|assistant|>\n": several tokens with this tokenizer
    kwargs = {"max_length": 512, "head": enc.head, "template": enc.template}
    too_small = enc.head + final - 1
    assert (
        truncate_pair(enc.prompt_ids, enc.chosen_ids, enc.rejected_ids, 0, max_prompt_length=too_small, **kwargs)
        is None
    )
    pair = truncate_pair(enc.prompt_ids, enc.chosen_ids, enc.rejected_ids, 0, max_prompt_length=too_small + 1, **kwargs)
    assert pair.prompt_ids == enc.prompt_ids[: enc.head] + enc.prompt_ids[-final:]
