"""Loading and checking preference rows: file types, row formats, column mapping and the errors users see."""

from __future__ import annotations

import json
import logging
import re
import socket
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from alignment.data.rows import DataError, PreferenceRow, load_rows

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is 2 + 2?"}
GOOD = {"role": "assistant", "content": "4"}
BAD = {"role": "assistant", "content": "5"}
PAIR = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}


def write_jsonl(tmp_path: Path, records: list[Any], name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_lines(tmp_path: Path, lines: list[str], name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def error_of(path: Path, **kwargs: Any) -> str:
    with pytest.raises(DataError) as info:
        load_rows(str(path), **kwargs)
    return str(info.value)


# ---- row formats -----------------------------------------------------------------------------------------------


def test_plain_strings_with_line_numbers_counting_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [json.dumps(PAIR), "", "   ", json.dumps({**PAIR, "system": "Be brief."})])
    rows = load_rows(str(path))
    assert rows[0] == PreferenceRow("What is 2 + 2?", "4", "5", None, f"{path}, line 1")
    assert rows[1].system == "Be brief."
    assert rows[1].source == f"{path}, line 4"


def test_chat_messages_keep_a_leading_system_message_in_the_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}])
    (row,) = load_rows(str(path))
    assert row.prompt == [SYSTEM, USER]
    assert row.chosen == [GOOD]
    assert row.rejected == [BAD]


def test_string_prompt_with_message_answers_becomes_a_user_message(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"prompt": USER["content"], "chosen": [GOOD], "rejected": "5"}])
    (row,) = load_rows(str(path))
    assert row.prompt == [USER]
    assert row.rejected == [BAD]  # a string answer next to messages becomes one assistant message


def test_extra_message_keys_are_dropped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [{"prompt": [{**USER, "name": "x"}], "chosen": [GOOD], "rejected": [BAD]}])
    assert load_rows(str(path))[0].prompt == [USER]


def test_ultrafeedback_style_conversations_are_split_at_the_shared_prefix(tmp_path: Path) -> None:
    record = {"prompt": "the conversations carry it", "chosen": [SYSTEM, USER, GOOD]}
    record["rejected"] = [SYSTEM, USER, BAD]
    (row,) = load_rows(str(write_jsonl(tmp_path, [record])))
    assert row.prompt == [SYSTEM, USER]
    assert row.chosen == [GOOD]
    assert row.rejected == [BAD]


def test_split_without_a_prompt_column(tmp_path: Path) -> None:
    (row,) = load_rows(str(write_jsonl(tmp_path, [{"chosen": [USER, GOOD], "rejected": [USER, BAD]}])))
    assert (row.prompt, row.chosen, row.rejected) == ([USER], [GOOD], [BAD])


def test_split_stops_before_the_last_assistant_turn(tmp_path: Path) -> None:
    follow_up = {"role": "user", "content": "And 3 + 3?"}
    six = {"role": "assistant", "content": "6"}
    record = {"chosen": [USER, GOOD, follow_up, six], "rejected": [USER, GOOD, follow_up, six]}
    (row,) = load_rows(str(write_jsonl(tmp_path, [record])))
    assert row.prompt == [USER, GOOD, follow_up]
    assert row.chosen == row.rejected == [six]


def test_answers_with_multiple_assistant_turns_keep_them(tmp_path: Path) -> None:
    more = {"role": "assistant", "content": "Four."}
    (row,) = load_rows(str(write_jsonl(tmp_path, [{"chosen": [USER, GOOD, more], "rejected": [USER, BAD]}])))
    assert (row.prompt, row.chosen, row.rejected) == ([USER], [GOOD, more], [BAD])


def test_the_prompt_column_is_kept_when_the_answers_share_only_assistant_turns(tmp_path: Path) -> None:
    # the answers are several assistant turns that share their first: that turn continues the prompt column's
    # conversation, it does not replace it
    shared, more_good, more_bad = (
        GOOD,
        {"role": "assistant", "content": "Yes."},
        {"role": "assistant", "content": "No."},
    )
    record = {"prompt": "What is 2 + 2?", "chosen": [shared, more_good], "rejected": [shared, more_bad]}
    (row,) = load_rows(str(write_jsonl(tmp_path, [record])))
    assert row.prompt == [USER, shared]
    assert (row.chosen, row.rejected) == ([more_good], [more_bad])


def test_the_conversation_is_the_prompt_when_it_holds_the_user_turn(tmp_path: Path) -> None:
    record = {"prompt": "What is 2 + 2? ", "chosen": [USER, GOOD], "rejected": [USER, BAD]}  # ultrafeedback
    (row,) = load_rows(str(write_jsonl(tmp_path, [record])))
    assert row.prompt == [USER]


@pytest.mark.parametrize("field", ["prompt", "chosen"])
def test_an_unknown_role_names_the_row_field_and_message(tmp_path: Path, field: str) -> None:
    record = {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}
    record[field] = [{"role": "human" if field == "prompt" else "gpt", "content": "hi"}]
    with pytest.raises(DataError, match=rf"line 1: field '{field}', message 1: unknown role '(human|gpt)'"):
        load_rows(str(write_jsonl(tmp_path, [record])))


def test_empty_prompt_string_is_allowed(tmp_path: Path) -> None:
    records = [{**PAIR, "prompt": ""}, {"prompt": "", "chosen": [GOOD], "rejected": [BAD]}]
    rows = load_rows(str(write_jsonl(tmp_path, records)))
    assert rows[0].prompt == ""
    assert rows[1].prompt == []  # no prompt at all, rather than an empty user turn


# ---- file types ------------------------------------------------------------------------------------------------


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([PAIR, {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]), encoding="utf-8")
    rows = load_rows(str(path))
    assert [r.source for r in rows] == [f"{path}, row 1", f"{path}, row 2"]
    assert rows[1].chosen == [GOOD]


def test_parquet_file_with_messages(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    frame = pd.DataFrame([{"prompt": "q", "chosen": [USER, GOOD], "rejected": [USER, BAD]}] * 3)
    frame.to_parquet(path)
    rows = load_rows(str(path))
    assert len(rows) == 3
    assert (rows[2].prompt, rows[2].chosen, rows[2].source) == ([USER], [GOOD], f"{path}, row 3")


def test_csv_file(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    pd.DataFrame([PAIR, {**PAIR, "prompt": ""}]).to_csv(path, index=False)
    rows = load_rows(str(path))
    assert rows[0] == PreferenceRow("What is 2 + 2?", "4", "5", None, f"{path}, row 1")
    assert rows[1].prompt == ""


def test_saved_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([PAIR, PAIR]).save_to_disk(str(tmp_path / "saved"))
    rows = load_rows(str(tmp_path / "saved"))
    assert [r.source for r in rows] == [f"{tmp_path / 'saved'}, row 1", f"{tmp_path / 'saved'}, row 2"]


# ---- column mapping and limit ----------------------------------------------------------------------------------


def test_column_mapping(tmp_path: Path) -> None:
    record = {"system": "Be brief.", "question": "What is 2 + 2?", "good": "4", "bad": "5"}
    path = write_jsonl(tmp_path, [record, {**record, "system": "  "}])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad", "system": "system"}
    rows = load_rows(str(path), columns=columns)
    assert rows[0] == PreferenceRow("What is 2 + 2?", "4", "5", "Be brief.", f"{path}, line 1")
    assert rows[1].system is None  # a blank system prompt means none


def test_unknown_field_in_column_mapping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [PAIR])
    message = error_of(path, columns={"question": "prompt"})
    assert "unknown field in column mapping" in message
    assert "'question'" in message and "prompt, chosen, rejected, system" in message


def test_mapped_column_that_is_absent(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [PAIR])
    message = error_of(path, columns={"prompt": "question"})
    assert message.startswith(f"{path}, line 1: missing field 'prompt' (column 'question')")
    assert "prompt, chosen, rejected" in message  # the columns that are there


def test_system_is_optional_unless_mapped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path, [PAIR])
    assert load_rows(str(path))[0].system is None
    message = error_of(path, columns={"system": "system"})
    assert f"{path}, line 1: missing field 'system'" in message


def test_limit_keeps_the_first_rows(tmp_path: Path) -> None:
    records = [{**PAIR, "chosen": str(i)} for i in range(10)]
    jsonl = write_jsonl(tmp_path, [*records[:3], "not checked past the limit"])
    assert [r.chosen for r in load_rows(str(jsonl), limit=2)] == ["0", "1"]
    parquet = tmp_path / "pairs.parquet"
    pd.DataFrame(records).to_parquet(parquet)
    assert [r.chosen for r in load_rows(str(parquet), limit=4)] == ["0", "1", "2", "3"]
    with pytest.raises(ValueError, match="limit"):
        load_rows(str(jsonl), limit=0)


# ---- errors ----------------------------------------------------------------------------------------------------


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [json.dumps(PAIR), "", '{"prompt": "a", "chosen": '])
    assert error_of(path).startswith(f"{path}, line 3: malformed JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = write_lines(tmp_path, [json.dumps(PAIR), json.dumps(["a", "b", "c"])])
    assert error_of(path) == f"{path}, line 2: expected a JSON object with the pair's fields, got list"


def test_jsonl_line_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(PAIR).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    assert error_of(path).startswith(f"{path}, line 2: not UTF-8 text")


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"prompt": "q", "rejected": "5"}, "missing field 'chosen'; the columns present are: prompt, rejected"),
        ({"chosen": "4", "rejected": "5"}, "missing field 'prompt'"),
        ({**PAIR, "chosen": 4}, "field 'chosen' must be a string or a list of {role, content} messages, got int"),
        ({**PAIR, "rejected": None}, "field 'rejected' must be a string or a list of {role, content} messages"),
        ({**PAIR, "prompt": {"text": "q"}}, "field 'prompt' must be a string or a list"),
        ({**PAIR, "chosen": [GOOD, "4"]}, "field 'chosen', message 2: expected an object with string 'role' and"),
        ({**PAIR, "rejected": [{"role": "assistant", "content": None}]}, "field 'rejected', message 1: expected"),
        ({**PAIR, "prompt": [{"content": "q"}]}, "field 'prompt', message 1: expected an object with string 'role'"),
        ({**PAIR, "system": ["Be brief."]}, "field 'system' must be a string, got list"),
        ({**PAIR, "chosen": "  \n"}, "field 'chosen' is empty"),
        ({**PAIR, "rejected": [{"role": "assistant", "content": " "}]}, "field 'rejected' is empty"),
        ({"chosen": [USER, {**GOOD, "content": ""}], "rejected": [USER, BAD]}, "field 'chosen' is empty"),
        ({"chosen": [USER, GOOD], "rejected": [{**USER, "content": "hi"}, BAD]}, "field 'chosen' holds a 'user'"),
    ],
    ids=[
        "missing-chosen",
        "missing-prompt",
        "wrong-type",
        "null",
        "object",
        "message-not-dict",
        "content-null",
        "role-missing",
        "system-type",
        "blank-string",
        "blank-messages",
        "blank-after-split",
        "no-shared-prompt",
    ],
)
def test_bad_row_names_file_line_and_field(tmp_path: Path, record: dict[str, Any], expected: str) -> None:
    path = write_jsonl(tmp_path, [PAIR, PAIR, record])
    message = error_of(path)
    assert message.startswith(f"{path}, line 3: ")
    assert expected in message


def test_bad_row_in_parquet_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "pairs.parquet"
    pd.DataFrame([PAIR, {**PAIR, "chosen": ""}]).to_parquet(path)
    assert error_of(path) == f"{path}, row 2: field 'chosen' is empty"


def test_missing_column_in_csv_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    pd.DataFrame([{"question": "q", "chosen": "4", "rejected": "5"}]).to_csv(path, index=False)
    assert error_of(path).startswith(f"{path}, row 1: missing field 'prompt'; the columns present are: question")


@pytest.mark.parametrize(
    ("name", "content"),
    [("blank.jsonl", "\n  \n\n"), ("empty.jsonl", ""), ("empty.json", "[]"), ("head.csv", "prompt,chosen,rejected\n")],
)
def test_empty_dataset(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert error_of(path) == f"{path} has no rows"


def test_json_that_is_not_a_list_of_objects(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"data": [PAIR]}), encoding="utf-8")
    assert "expected a top-level JSON list of objects, got dict" in error_of(path)
    path.write_text(json.dumps([PAIR, "x"]), encoding="utf-8")
    assert error_of(path).startswith(f"{path}, row 2: expected a JSON object")
    path.write_text("[{", encoding="utf-8")
    assert error_of(path).startswith(f"{path}: malformed JSON")


def test_unsupported_extension_lists_the_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text("hello", encoding="utf-8")
    assert error_of(path) == f"{path}: unsupported file type '.txt'; supported: .jsonl, .json, .parquet, .csv"


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    assert error_of(path) == f"{path}: no such file"


def test_directory_that_is_not_a_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # keep the user's cache clean
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("nothing here", encoding="utf-8")
    assert error_of(tmp_path / "notes").startswith(f"{tmp_path / 'notes'}: cannot read this directory as a dataset")


def test_unknown_hub_name_offline_fails_at_once_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[Any] = []

    def connect(sock: socket.socket, address: Any) -> None:  # no retries: not one connection is tried
        attempts.append(address)
        raise OSError("network unreachable")

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(DataError) as info:
        load_rows("no-such-org/no-such-dataset", split="train")
    assert attempts == []
    message = str(info.value)
    assert "'no-such-org/no-such-dataset'" in message
    assert "neither a local file nor a dataset in the local datasets cache" in message
    assert "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE" in message
    assert "--data.path FILE" in message
    assert re.search(r"Reason: \w+", message)


# ---- warnings --------------------------------------------------------------------------------------------------


def test_identical_chosen_and_rejected_are_kept_with_one_warning(tmp_path: Path, caplog: Any) -> None:
    same = {**PAIR, "rejected": "4"}
    same_messages = {"prompt": "q", "chosen": [USER, GOOD], "rejected": [USER, GOOD]}
    path = write_jsonl(tmp_path, [PAIR, same, same_messages])
    with caplog.at_level(logging.WARNING, logger="alignment.data.rows"):
        rows = load_rows(str(path))
    assert len(rows) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 row(s) have chosen identical to rejected" in warnings[0].getMessage()
    assert f"{path}, line 2" in warnings[0].getMessage()
