"""Preference data: truncation, collation, tokenization and the DataModule (CPU, tiny byte tokenizer).

Tiny tokenizer ids: BOS 1, EOS 2, pad 3, "<|system|>" 4, "<|user|>" 5, "<|assistant|>" 6; printable ASCII
characters are ord(c) - 26 (so "a" = 71), and "\n" = 205.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import alignment.data.module as data_module
from alignment.data import IGNORE_INDEX, PreferenceDataModule, TokenizedPair, collate_pairs, truncate_pair
from alignment.data.encoding import render_pair, tokenize_rows
from alignment.data.module import DEMO_PAIRS, build_pairs
from alignment.data.rows import DataError, PreferenceRow, load_rows
from alignment.hub.tiny import build_tiny_tokenizer
from alignment.hub.tokenizer import load_tokenizer
from tests.helpers import synthetic_pairs, write_jsonl

BOS, EOS, PAD = 1, 2, 3
A, B, C, D = 71, 72, 73, 74
NL = 205


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def encode(rows, tokenizer, use_chat_template):
    """(prompt, chosen, rejected) ids of each row."""
    return [tuple(pair[:3]) for pair in tokenize_rows(rows, tokenizer, use_chat_template)]


# ---- truncate_pair -------------------------------------------------------------------------------------------------


def test_truncate_keeps_a_pair_that_fits():
    pair = truncate_pair([1, 10, 11], [20, 2], [30, 31, 2], 7, max_length=6, max_prompt_length=3)
    assert pair == TokenizedPair([1, 10, 11], [20, 2], [30, 31, 2], 7)


def test_truncate_keeps_the_end_of_a_long_prompt():
    pair = truncate_pair([1, 10, 11, 12, 13], [20, 2], [30, 2], 0, max_length=10, max_prompt_length=3)
    assert pair.prompt_ids == [11, 12, 13]
    assert pair.chosen_ids == [20, 2]
    assert pair.rejected_ids == [30, 2]


def test_truncate_keeps_the_start_of_the_answers():
    pair = truncate_pair([1, 10, 11], [20, 21, 22, 2], [30, 31, 32, 33, 2], 0, max_length=5, max_prompt_length=None)
    assert pair.prompt_ids == [1, 10, 11]
    assert pair.chosen_ids == [20, 21]
    assert pair.rejected_ids == [30, 31]


def test_truncate_cuts_answers_to_the_room_left_by_the_cut_prompt():
    pair = truncate_pair([1, 10, 11, 12, 13], [20, 21, 22, 2], [30, 2], 0, max_length=4, max_prompt_length=2)
    assert pair == TokenizedPair([12, 13], [20, 21], [30, 2], 0)


def test_truncate_without_max_prompt_length_leaves_the_prompt_alone():
    prompt = list(range(10, 20))
    pair = truncate_pair(prompt, [20, 2], [30, 2], 0, max_length=11, max_prompt_length=None)
    assert pair.prompt_ids == prompt
    assert pair.chosen_ids == [20]
    assert pair.rejected_ids == [30]


@pytest.mark.parametrize("max_prompt_length", [None, 4, 5])
def test_truncate_returns_none_when_no_answer_token_fits(max_prompt_length):
    assert (
        truncate_pair([1, 10, 11, 12], [20, 2], [30, 2], 0, max_length=4, max_prompt_length=max_prompt_length) is None
    )


def test_truncate_with_one_token_of_room():
    pair = truncate_pair([1, 10, 11, 12], [20, 2], [30, 2], 0, max_length=5, max_prompt_length=None)
    assert pair == TokenizedPair([1, 10, 11, 12], [20], [30], 0)


def test_truncate_carries_the_index():
    assert truncate_pair([1], [20], [30], 42, max_length=8).index == 42


# ---- collate_pairs -------------------------------------------------------------------------------------------------


def two_pairs() -> list[TokenizedPair]:
    return [
        TokenizedPair([1, 40, 41], [50, 2], [60, 61, 2], 5),
        TokenizedPair([1, 42], [52, 53, 54, 2], [62, 2], 9),
    ]


def test_collate_input_ids_chosen_first_then_rejected_right_padded():
    batch = collate_pairs(two_pairs(), pad_id=PAD, pad_to_multiple_of=8)
    expected = torch.tensor(
        [
            [1, 40, 41, 50, 2, 3, 3, 3],
            [1, 42, 52, 53, 54, 2, 3, 3],
            [1, 40, 41, 60, 61, 2, 3, 3],
            [1, 42, 62, 2, 3, 3, 3, 3],
        ]
    )
    assert batch.input_ids.dtype == torch.long
    assert torch.equal(batch.input_ids, expected)


def test_collate_attention_mask_marks_real_tokens():
    batch = collate_pairs(two_pairs(), pad_id=PAD, pad_to_multiple_of=8)
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
        ]
    )
    assert torch.equal(batch.attention_mask, expected)


def test_collate_labels_are_the_answer_tokens_only():
    batch = collate_pairs(two_pairs(), pad_id=PAD, pad_to_multiple_of=8)
    x = IGNORE_INDEX
    expected = torch.tensor(
        [
            [x, x, x, 50, 2, x, x, x],
            [x, x, 52, 53, 54, 2, x, x],
            [x, x, x, 60, 61, 2, x, x],
            [x, x, 62, 2, x, x, x, x],
        ]
    )
    assert IGNORE_INDEX == -100
    assert torch.equal(batch.labels, expected)


def test_collate_index():
    batch = collate_pairs(two_pairs(), pad_id=PAD)
    assert torch.equal(batch.index, torch.tensor([5, 9]))


def test_collate_without_rounding_pads_to_the_longest_row():
    batch = collate_pairs(two_pairs(), pad_id=0)
    assert batch.input_ids.shape == (4, 6)
    assert batch.input_ids[3].tolist() == [1, 42, 62, 2, 0, 0]


@pytest.mark.parametrize(("multiple", "width"), [(1, 6), (4, 8), (6, 6), (16, 16)])
def test_collate_rounds_the_width_up(multiple, width):
    assert collate_pairs(two_pairs(), pad_id=PAD, pad_to_multiple_of=multiple).input_ids.shape == (4, width)


# ---- render_pair / tokenize_rows -----------------------------------------------------------------------------------


def test_plain_rows_get_bos_before_the_prompt_and_eos_after_the_answers(tokenizer):
    row = PreferenceRow("ab", "c", "dd", source="t.jsonl, line 1")
    assert encode([row], tokenizer, False) == [([BOS, A, B], [C, EOS], [D, D, EOS])]


def test_plain_rows_put_the_system_prompt_before_the_prompt(tokenizer):
    row = PreferenceRow("ab", "c", "d", system="S", source="t.jsonl, line 1")
    assert render_pair(row, tokenizer, use_chat_template=False) == ("S\n\nab", "c", "d")
    ((prompt, _, _),) = encode([row], tokenizer, False)
    assert prompt == [BOS, ord("S") - 26, NL, NL, A, B]


def test_plain_answers_hold_no_bos(tokenizer):
    rows = [PreferenceRow(p, c, r) for p, c, r in [("x", "abc", "cba"), ("long prompt", "y", "zz")]]
    for prompt, chosen, rejected in encode(rows, tokenizer, False):
        assert prompt[0] == BOS and prompt.count(BOS) == 1
        for answer in (chosen, rejected):
            assert BOS not in answer
            assert answer[-1] == EOS and answer.count(EOS) == 1


def test_chat_prompt_ends_with_the_generation_prompt(tokenizer):
    row = PreferenceRow("ab", "c", "d")
    prompt, chosen, rejected = render_pair(row, tokenizer, use_chat_template=True)
    assert prompt == "<|user|>\nab</s>\n<|assistant|>\n"
    assert chosen == "c</s>\n"
    assert rejected == "d</s>\n"


def test_chat_ids_are_literal(tokenizer):
    row = PreferenceRow(user("ab"), assistant("c"), assistant("d"))
    ((prompt, chosen, rejected),) = encode([row], tokenizer, True)
    assert prompt == [BOS, 5, NL, A, B, EOS, NL, 6, NL]
    assert chosen == [C, EOS, NL]
    assert rejected == [D, EOS, NL]


def test_chat_prompt_and_answer_ids_rebuild_the_whole_conversation(tokenizer):
    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}, *user("sort: cab")]
    row = PreferenceRow(messages, assistant("abc"), assistant("bca"))
    ((prompt, chosen, rejected),) = encode([row], tokenizer, True)
    rendered_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(messages + assistant("abc"), tokenize=False)
    assert rendered_prompt.endswith("<|assistant|>\n")
    assert prompt[0] == BOS
    assert tokenizer.decode(prompt[1:]) == rendered_prompt
    assert tokenizer.decode(prompt[1:] + chosen) == whole
    assert tokenizer.decode(rejected) == "bca</s>\n"


def test_chosen_and_rejected_share_the_prompt_ids(tokenizer):
    row = PreferenceRow(user("q"), assistant("a"), assistant("bb"), system="S")
    messages = [{"role": "system", "content": "S"}, *user("q")]
    ((prompt, chosen, rejected),) = encode([row], tokenizer, True)
    for answer, ids in (("a", chosen), ("bb", rejected)):
        whole = tokenizer.apply_chat_template(messages + assistant(answer), tokenize=False)
        assert tokenizer.decode(prompt + ids) == "<s>" + whole


def test_chat_system_field_becomes_the_first_turn(tokenizer):
    row = PreferenceRow("ab", "c", "d", system="be brief")
    prompt, _, _ = render_pair(row, tokenizer, use_chat_template=True)
    assert prompt == "<|system|>\nbe brief</s>\n<|user|>\nab</s>\n<|assistant|>\n"
    ((ids, _, _),) = encode([row], tokenizer, True)
    assert ids[:3] == [BOS, 4, NL]


def test_system_field_and_system_message_together_raise(tokenizer):
    messages = [{"role": "system", "content": "one"}, *user("ab")]
    row = PreferenceRow(messages, assistant("c"), assistant("d"), system="two", source="p.jsonl, line 4")
    with pytest.raises(DataError, match="p.jsonl, line 4.*system"):
        render_pair(row, tokenizer, use_chat_template=True)


def test_chat_rows_without_chat_template_raise_naming_the_row(tokenizer):
    row = PreferenceRow(user("ab"), assistant("c"), assistant("d"), source="chat.jsonl, line 3")
    with pytest.raises(DataError, match="chat.jsonl, line 3"):
        encode([row], tokenizer, False)


# ---- build_pairs ---------------------------------------------------------------------------------------------------


def build(rows, tokenizer, **kwargs):
    options = {"use_chat_template": False, "max_length": 64, "max_prompt_length": None, "split": "train"}
    return build_pairs(rows, tokenizer, **(options | kwargs))


def test_build_pairs_indexes_the_kept_pairs(tokenizer):
    rows = [PreferenceRow("ab", "c", "d"), PreferenceRow("ba", "dd", "cc")]
    assert build(rows, tokenizer) == [
        TokenizedPair([BOS, A, B], [C, EOS], [D, EOS], 0),
        TokenizedPair([BOS, B, A], [D, D, EOS], [C, C, EOS], 1),
    ]


def test_build_pairs_logs_cut_prompts_and_answers(tokenizer, caplog):
    rows = [
        PreferenceRow("abcdef", "a", "b"),  # prompt cut to 4 ids
        PreferenceRow("abcdefgh", "abcdef", "b"),  # prompt and chosen cut
        PreferenceRow("a", "abcdefgh", "b"),  # chosen cut
        PreferenceRow("a", "b", "c"),  # fits
    ]
    with caplog.at_level(logging.INFO, logger="alignment.data.module"):
        pairs = build(rows, tokenizer, max_length=7, max_prompt_length=4)
    assert len(pairs) == 4
    assert [len(p.prompt_ids) for p in pairs] == [4, 4, 2, 2]
    assert [len(p.chosen_ids) for p in pairs] == [2, 3, 5, 2]
    messages = [r.getMessage() for r in caplog.records if r.name == "alignment.data.module"]
    expected = "train: 4 pairs; 2 prompts cut to max_prompt_length=4 (their start and end kept), 2 pairs with answers"
    assert f"{expected} cut to max_length=7" in messages


def test_build_pairs_warns_about_dropped_pairs_naming_the_first(tokenizer, caplog):
    rows = [
        PreferenceRow("a", "b", "c", source="f.jsonl, line 1"),
        PreferenceRow("abcdef", "b", "c", source="f.jsonl, line 2"),
        PreferenceRow("abcdefg", "b", "c", source="f.jsonl, line 3"),
    ]
    with caplog.at_level(logging.INFO, logger="alignment.data.module"):
        pairs = build(rows, tokenizer, max_length=5, split="validation")
    assert len(pairs) == 1 and pairs[0].index == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("validation: dropped 2 pairs")
    assert "max_length=5" in warnings[0]
    assert "first: f.jsonl, line 2" in warnings[0]


def test_build_pairs_warns_about_identical_answers_after_truncation(tokenizer, caplog):
    rows = [PreferenceRow("a", "abcX", "abcY"), PreferenceRow("a", "b", "c")]
    with caplog.at_level(logging.WARNING, logger="alignment.data.module"):
        pairs = build(rows, tokenizer, max_length=5)
    assert pairs[0].chosen_ids == pairs[0].rejected_ids == [A, B, C]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["train: 1 pairs have identical chosen and rejected tokens after truncation"]


def test_build_pairs_quiet_when_nothing_is_wrong(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="alignment.data.module"):
        build([PreferenceRow("a", "b", "c")], tokenizer)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_build_pairs_raises_when_all_are_dropped(tokenizer):
    rows = [PreferenceRow("abcdef", "b", "c", source="f.jsonl, line 1")]
    with pytest.raises(DataError, match="train: no pair fits in max_length=4"):
        build(rows, tokenizer, max_length=4)


# ---- PreferenceDataModule ------------------------------------------------------------------------------------------


def make_module(path, **kwargs) -> PreferenceDataModule:
    module = PreferenceDataModule(str(path) if path is not None else None, **kwargs)
    module.setup("fit")
    return module


def prompts(dataset) -> set[tuple[int, ...]]:
    return {tuple(pair.prompt_ids) for pair in dataset.pairs}


@pytest.fixture
def pairs_file(tmp_path):
    rows = synthetic_pairs(20, seed=0)
    assert len({row["prompt"] for row in rows}) == len(rows)
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_train_loader_yields_padded_preference_batches(pairs_file):
    module = make_module(pairs_file, batch_size=4, val_fraction=0.2)
    batch = next(iter(module.train_dataloader()))
    rows, width = batch.input_ids.shape
    assert rows == 8 and width % 8 == 0
    assert batch.attention_mask.shape == batch.labels.shape == (8, width)
    assert batch.index.shape == (4,)
    assert (batch.input_ids[batch.attention_mask == 0] == module.tokenizer.pad_token_id).all()
    assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()


def test_train_loader_covers_the_train_split(pairs_file):
    module = make_module(pairs_file, batch_size=3, val_fraction=0.2)
    indices = torch.cat([batch.index for batch in module.train_dataloader()]).tolist()
    assert sorted(indices) == list(range(16))


def test_val_fraction_split_is_disjoint_and_complete(pairs_file):
    module = make_module(pairs_file, val_fraction=0.25)
    assert len(module.train_set) == 15 and len(module.val_set) == 5
    assert not prompts(module.train_set) & prompts(module.val_set)
    assert len(prompts(module.train_set) | prompts(module.val_set)) == 20


def test_val_fraction_split_is_seeded(pairs_file):
    first = make_module(pairs_file, val_fraction=0.25, seed=1)
    again = make_module(pairs_file, val_fraction=0.25, seed=1)
    other = make_module(pairs_file, val_fraction=0.25, seed=2)
    assert prompts(first.val_set) == prompts(again.val_set)
    assert prompts(first.val_set) != prompts(other.val_set)


def test_val_path_replaces_the_fraction(pairs_file, tmp_path):
    val_file = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(3, seed=99))
    module = make_module(pairs_file, val_path=str(val_file), val_fraction=0.5)
    assert len(module.train_set) == 20
    assert len(module.val_set) == 3
    assert sum(len(batch.index) for batch in module.val_dataloader()) == 3


def test_val_loader_is_in_order(pairs_file):
    module = make_module(pairs_file, val_fraction=0.25, batch_size=2)
    indices = torch.cat([batch.index for batch in module.val_dataloader()]).tolist()
    assert indices == [0, 1, 2, 3, 4]


def test_val_fraction_zero_gives_no_validation(pairs_file):
    module = make_module(pairs_file, val_fraction=0)
    assert len(module.train_set) == 20
    assert module.val_set is None
    assert len(module.val_dataloader()) == 0


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_val_fraction_out_of_range_raises(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        PreferenceDataModule(val_fraction=fraction)


def test_no_path_uses_the_demo_pairs():
    module = make_module(None, val_fraction=0.1)
    total = len(load_rows(str(DEMO_PAIRS)))
    assert DEMO_PAIRS.name == "demo_pairs.jsonl" and DEMO_PAIRS.parent.name == "assets"
    assert len(module.train_set) + len(module.val_set) == total
    assert len(module.val_set) == round(0.1 * total)


def test_chat_format_rows_work_through_the_module(tmp_path):
    rows = [
        {"prompt": user(f"question {i}"), "chosen": assistant(f"good {i}"), "rejected": assistant(f"bad {i}")}
        for i in range(6)
    ]
    module = make_module(write_jsonl(tmp_path / "chat.jsonl", rows), val_fraction=0, batch_size=2)
    pair = module.train_set[0]
    text = module.tokenizer.decode(pair.prompt_ids + pair.chosen_ids)
    assert text == "<s><|user|>\nquestion 0</s>\n<|assistant|>\ngood 0</s>\n"
    batch = next(iter(module.train_dataloader()))
    assert batch.input_ids.shape[0] == 4 and batch.input_ids.shape[1] % 8 == 0


def test_whole_conversation_rows_work_through_the_module(tmp_path):
    rows = [{"chosen": user(f"q{i}") + assistant("yes"), "rejected": user(f"q{i}") + assistant("no")} for i in range(4)]
    module = make_module(write_jsonl(tmp_path / "conv.jsonl", rows), val_fraction=0)
    pair = module.train_set[2]
    assert module.tokenizer.decode(pair.prompt_ids) == "<s><|user|>\nq2</s>\n<|assistant|>\n"
    assert module.tokenizer.decode(pair.rejected_ids) == "no</s>\n"


def test_use_chat_template_false_on_plain_rows(pairs_file):
    module = make_module(pairs_file, val_fraction=0, use_chat_template=False)
    pair = module.train_set[0]
    assert pair.prompt_ids[0] == BOS and 5 not in pair.prompt_ids
    assert pair.chosen_ids[-1] == EOS


def test_chat_template_requested_without_one_raises(pairs_file, monkeypatch):
    def no_template(*args, **kwargs):
        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = None
        return tokenizer

    monkeypatch.setattr(data_module, "load_tokenizer", no_template)
    with pytest.raises(DataError, match="use_chat_template"):
        make_module(pairs_file, use_chat_template=True)


def test_no_template_falls_back_to_plain_text(pairs_file, monkeypatch):
    def no_template(*args, **kwargs):
        tokenizer = build_tiny_tokenizer()
        tokenizer.chat_template = None
        return tokenizer

    monkeypatch.setattr(data_module, "load_tokenizer", no_template)
    module = make_module(pairs_file, val_fraction=0)
    assert all(pair.chosen_ids[-1] == EOS and 6 not in pair.prompt_ids for pair in module.train_set.pairs)


def test_setup_twice_keeps_the_sets(pairs_file):
    module = make_module(pairs_file)
    train_set = module.train_set
    module.setup("validate")
    assert module.train_set is train_set


def test_shuffled_train_loader_is_reproducible(pairs_file):
    first = next(iter(make_module(pairs_file, batch_size=4, seed=3).train_dataloader())).index
    again = next(iter(make_module(pairs_file, batch_size=4, seed=3).train_dataloader())).index
    assert torch.equal(first, again)
    assert not torch.equal(first, torch.arange(4))


def test_a_chat_template_that_rejects_a_conversation_names_the_row(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}x"
    )
    row = PreferenceRow([{"role": "assistant", "content": "hi"}], "a", "b", source="pairs.jsonl, line 4")
    with pytest.raises(DataError, match=r"pairs.jsonl, line 4: .*chat template.*first turn must be user"):
        render_pair(row, strict, use_chat_template=True)


def test_val_split_on_a_local_file_falls_back_to_a_held_out_fraction(tmp_path, caplog):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(20, seed=0))
    with caplog.at_level(logging.WARNING, logger="alignment.data.module"):
        module = PreferenceDataModule(str(pairs), val_split="test_prefs", val_fraction=0.25, max_length=64)
    assert "val_split 'test_prefs' ignored" in caplog.text
    module.setup()
    assert (len(module.train_set), len(module.val_set)) == (15, 5)  # not the training file read twice
