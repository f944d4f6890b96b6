"""Read preference pairs from files or `datasets`, check them, and normalise them to `PreferenceRow`s.

Accepted rows (per row; columns can be renamed with `columns`):

1. plain text: `prompt`, `chosen` and `rejected` are strings;
2. chat messages: `chosen`/`rejected` hold only the answer (assistant turns), `prompt` the messages before it
   (or a string, which becomes one user message);
3. whole conversations: `chosen`/`rejected` repeat the prompt messages before their answers, as in
   ultrafeedback. The messages they share, up to (not including) the last assistant turn of each, are the prompt
   when they hold a user or system turn (a `prompt` column then repeats it, or is absent); when they hold only
   assistant turns they follow the `prompt` column's messages, so the user's prompt is never lost.

Message roles are `system`, `user` and `assistant`; any other is an error (templates drop roles they don't know).

When any of the three is a message list, all three become message lists.

Methods that train on single answers (SFT, KTO) read `load_completions`, which tells the row format from the first
row's columns: preference pairs (as above), `{prompt, completion}` with an optional `label` (true: desirable), or
chat conversations `{messages: [...]}` (the last assistant turn is the completion, the turns before it the prompt).
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from alignment.errors import ConfigError, DataError

__all__ = ["CompletionRow", "DataError", "PreferenceRow", "load_completions", "load_rows"]

log = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": ..., "content": ...}
Part = str | list[Message]
Record = dict[str, Any]

SUPPORTED = (".jsonl", ".json", ".parquet", ".csv")
FIELDS = ("prompt", "chosen", "rejected", "system", "completion", "label", "messages")
PAIR_FIELDS = ("prompt", "chosen", "rejected", "system")
ANSWER_ROLE = "assistant"
PROMPT_ROLES = ("user", "system")  # roles that may not appear inside an answer
ROLES = ("system", "user", ANSWER_ROLE)


@dataclass(frozen=True)
class PreferenceRow:
    prompt: str | list[Message]  # text, or the chat messages before the answer
    chosen: str | list[Message]  # text, or the assistant message(s) of the preferred answer
    rejected: str | list[Message]
    system: str | None = None  # optional system prompt
    source: str = ""  # where it came from, e.g. "pairs.jsonl, line 12" or "org/name[train], row 5"


@dataclass(frozen=True)
class CompletionRow:
    """One answer to a prompt: what SFT trains on, and KTO with its label."""

    prompt: str | list[Message]  # text, or the chat messages before the answer
    completion: str | list[Message]  # text, or the assistant message(s)
    label: bool | None = None  # KTO: true for a desirable completion, false for an undesirable one; None: unlabelled
    system: str | None = None
    source: str = ""


@dataclass(frozen=True)
class _Columns:
    names: dict[str, str]  # our field -> the data's column
    mapped: frozenset[str]  # fields named explicitly by the user: their column must exist


def load_rows(
    path: str, *, split: str = "train", columns: dict[str, str] | None = None, limit: int | None = None
) -> list[PreferenceRow]:
    """Preference rows from a local file (.jsonl, .json, .parquet, .csv), a dataset directory or a hub name.

    Args:
        path: a local file or directory, or a `datasets` hub name.
        split: the split to read from a hub dataset (or a directory holding several).
        columns: our field -> the data's column, e.g. {"prompt": "question"}; unmapped fields keep their name.
        limit: keep only the first N rows.

    Raises:
        DataError: the data cannot be read or a row is malformed; the message says where and why.
    """
    cols = _column_map(columns)
    with _gc_paused():
        label, records = _read_rows(path, split, limit)
        rows = [_to_row(source, record, cols) for source, record in records]
    _warn_identical(label, rows)
    return rows


def _read_rows(path: str, split: str, limit: int | None) -> tuple[str, list[tuple[str, Record]]]:
    if limit is not None and limit < 1:
        raise ConfigError(f"--data.limit must be a positive number of rows, got {limit}")
    label, records = _read_records(str(path), split, limit)
    if not records:
        raise DataError(f"{label} has no rows")
    return label, records


def load_completions(
    path: str,
    *,
    split: str = "train",
    columns: dict[str, str] | None = None,
    limit: int | None = None,
    labelled: bool = False,
) -> list[PreferenceRow | CompletionRow]:
    """Rows of single answers, or preference pairs, from wherever `load_rows` reads.

    The format is told from the first row's columns: `chosen`/`rejected` (pairs: `PreferenceRow`s, checked as
    `load_rows` checks them), `messages` (a conversation ending in an assistant turn), else `completion` with an
    optional `label`. Every row is then checked against that format. `labelled`: every `completion` or `messages`
    row must carry a true/false `label` (KTO).

    Raises:
        DataError: as `load_rows`; also a missing or non-boolean label, a conversation without an assistant turn.
    """
    cols = _column_map(columns)
    with _gc_paused():
        _, records = _read_rows(path, split, limit)
        first = records[0][1]
        if cols.names["chosen"] in first or cols.names["rejected"] in first:
            rows: list = [_to_row(source, record, cols) for source, record in records]
        else:
            convert = _conversation_row if cols.names["messages"] in first else _completion_row
            rows = [convert(source, record, cols, labelled) for source, record in records]
    return rows


def _completion_row(source: str, record: Record, cols: _Columns, labelled: bool) -> CompletionRow:
    for field in ("prompt", "completion"):
        if record.get(cols.names[field]) is None:
            raise _missing(source, record, field, cols)
    prompt = _check_part(source, "prompt", record[cols.names["prompt"]])
    completion = _check_part(source, "completion", record[cols.names["completion"]])
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt, completion = _as_messages(prompt, "user"), _as_messages(completion, ANSWER_ROLE)
        stray = next((m["role"] for m in completion if m["role"] in PROMPT_ROLES), None)
        if stray is not None:
            raise DataError(f"{source}: field 'completion' holds a {stray!r} message; it must be the answer alone")
    if _is_blank(completion):
        raise DataError(f"{source}: field 'completion' is empty")
    system = _check_system(source, record.get(cols.names["system"]))
    return CompletionRow(prompt, completion, _check_label(source, record, cols, labelled), system, source)


def _conversation_row(source: str, record: Record, cols: _Columns, labelled: bool) -> CompletionRow:
    """The last assistant turn is the completion; the turns before it are the prompt."""
    if record.get(cols.names["messages"]) is None:
        raise _missing(source, record, "messages", cols)
    messages = _check_part(source, "messages", record[cols.names["messages"]])
    if not isinstance(messages, list):
        raise DataError(f"{source}: field 'messages' must be a list of {{role, content}} messages, got str")
    last = len(messages) - 1
    if last < 0 or messages[last]["role"] != ANSWER_ROLE:
        raise DataError(f"{source}: field 'messages' must end with an {ANSWER_ROLE!r} turn, the answer trained on")
    if not messages[last]["content"].strip():
        raise DataError(f"{source}: field 'messages', message {last + 1}: the last assistant turn is empty")
    system = _check_system(source, record.get(cols.names["system"]))
    label = _check_label(source, record, cols, labelled)
    return CompletionRow(messages[:last], messages[last:], label, system, source)


def _check_label(source: str, record: Record, cols: _Columns, labelled: bool) -> bool | None:
    """True or false (JSON booleans, 1/0, or the strings true/false/1/0 of a CSV cell); None when absent and not
    required."""
    value = record.get(cols.names["label"])
    if value is None:
        if labelled:
            raise _missing(source, record, "label", cols)
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise DataError(f"{source}: field 'label' must be true or false, got {value!r}")


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: loading makes millions of small acyclic containers, and the collector's
    repeated passes over them would otherwise take most of the time on large files."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _column_map(columns: dict[str, str] | None) -> _Columns:
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise DataError(f"unknown field in column mapping {unknown}: expected one of {', '.join(FIELDS)}")
    for field, column in columns.items():
        if not isinstance(column, str):
            raise DataError(f"column mapping for {field!r} must be a column name, got {_type_name(column)}")
    return _Columns({f: columns.get(f, f) for f in FIELDS}, frozenset(columns))


# ---- reading ----------------------------------------------------------------------------------------------------


def _read_records(path: str, split: str, limit: int | None) -> tuple[str, list[tuple[str, Record]]]:
    """(label for messages, [(source, record)]) from wherever `path` points."""
    local = Path(path).expanduser()
    if local.is_dir():
        return path, _read_directory(local, path, split, limit)
    if local.is_file():
        suffix = local.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ".csv": _read_csv}
        if suffix not in readers:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED)}")
        return path, readers[suffix](local, path, limit)
    if local.suffix.lower() in SUPPORTED or path.startswith(("/", ".", "~")):
        raise DataError(f"{path}: no such file")
    return f"{path}[{split}]", _read_hub(path, split, limit)


def _read_jsonl(file: Path, label: str, limit: int | None) -> list[tuple[str, Record]]:
    records: list[tuple[str, Record]] = []
    with open(file, "rb") as f:  # bytes, so that a bad encoding is blamed on its own line
        for number, raw in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{label}, line {number}: not UTF-8 text ({exc.reason})") from exc
            if line.strip():
                source = f"{label}, line {number}"
                records.append((source, _parse_object(line, source)))
    return records


def _parse_object(line: str, source: str) -> Record:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}: malformed JSON: {exc.msg} (column {exc.colno})") from exc
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected a JSON object with the pair's fields, got {_type_name(record)}")
    return record


def _read_json(file: Path, label: str, limit: int | None) -> list[tuple[str, Record]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{label}: not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{label}: malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    if not isinstance(data, list):
        raise DataError(f"{label}: expected a top-level JSON list of objects, got {_type_name(data)}")
    records = []
    for number, record in enumerate(data[:limit], 1):
        if not isinstance(record, dict):
            raise DataError(
                f"{label}, row {number}: expected a JSON object with the pair's fields, got {_type_name(record)}"
            )
        records.append((f"{label}, row {number}", record))
    return records


def _read_parquet(file: Path, label: str, limit: int | None) -> list[tuple[str, Record]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{label}: cannot read as Parquet: {_one_line(exc)}") from exc
    if limit is not None:
        table = table.slice(0, limit)
    return _numbered(label, table.to_pylist())


def _read_csv(file: Path, label: str, limit: int | None) -> list[tuple[str, Record]]:
    """CSV cells are read as plain strings (no chat messages); empty cells are empty strings."""
    import pandas as pd

    try:
        frame = pd.read_csv(file, dtype=str, keep_default_na=False, nrows=limit)
    except pd.errors.EmptyDataError:
        return []
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{label}: cannot read as CSV: {_one_line(exc)}") from exc
    return _numbered(label, frame.to_dict("records"))


def _read_directory(folder: Path, label: str, split: str, limit: int | None) -> list[tuple[str, Record]]:
    """A directory written by `save_to_disk`, or a folder of data files that `datasets` can load."""
    import datasets

    try:
        if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
            data = datasets.load_from_disk(str(folder))
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            data = datasets.load_dataset(str(folder), split=split)
    except Exception as exc:  # datasets raises many types here; all mean "cannot read it"
        raise DataError(
            f"{label}: cannot read this directory as a dataset (split {split!r}): {_one_line(exc)}; "
            f"pass one {'/'.join(SUPPORTED)} file instead"
        ) from exc
    return _from_dataset(data, label, limit)


def _read_hub(name: str, split: str, limit: int | None) -> list[tuple[str, Record]]:
    import datasets

    try:
        with _offline_unless_reachable():
            data = datasets.load_dataset(name, split=split)
    except Exception as exc:  # offline, unknown name, unknown split: all end the same way for the user
        raise DataError(
            f"{name!r} (split {split!r}) is neither a local file nor a dataset in the local datasets cache. "
            f"Reason: {_one_line(exc)}. This machine may be offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE): "
            f"download the dataset where there is network, or pass a local file with --data.path FILE "
            f"({', '.join(SUPPORTED)})."
        ) from exc
    return _from_dataset(data, f"{name}[{split}]", limit)


@contextmanager
def _offline_unless_reachable() -> Iterator[None]:
    """Read from the local cache only when the hub cannot be reached: no retries against a network that is not there."""
    import datasets
    import huggingface_hub

    from alignment.hub import hub_reachable

    if hub_reachable():
        yield
        return
    # The documented switch is the HF_HUB_OFFLINE variable, read once at import; these are the public module
    # constants datasets and huggingface_hub read at call time (datasets 5.2 `load.dataset_module_factory`,
    # huggingface_hub 2.4 `constants.is_offline_mode`). `DownloadConfig(local_files_only=True)` is no substitute:
    # datasets 5.2 asks the hub for a dataset's card without it, and waits out the network first.
    with (
        mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True),
        mock.patch.object(huggingface_hub.constants, "HF_HUB_OFFLINE", True),
    ):
        yield


def _from_dataset(data: Any, label: str, limit: int | None) -> list[tuple[str, Record]]:
    if limit is not None and limit < len(data):
        data = data.select(range(limit))
    return _numbered(label, data.to_list())


def _numbered(label: str, records: list[Record]) -> list[tuple[str, Record]]:
    return [(f"{label}, row {number}", record) for number, record in enumerate(records, 1)]


# ---- checking and normalising -------------------------------------------------------------------------------------


def _to_row(source: str, record: Record, cols: _Columns) -> PreferenceRow:
    for field in ("chosen", "rejected", *sorted(cols.mapped & {"prompt", "system"})):
        if cols.names[field] not in record:
            raise _missing(source, record, field, cols)
    chosen = _check_part(source, "chosen", record[cols.names["chosen"]])
    rejected = _check_part(source, "rejected", record[cols.names["rejected"]])
    raw_prompt = record.get(cols.names["prompt"])
    prompt = None if raw_prompt is None else _check_part(source, "prompt", raw_prompt)
    if isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list):
        prompt, chosen, rejected = _split_messages(source, prompt, chosen, rejected)
    if prompt is None:
        raise _missing(source, record, "prompt", cols)
    for field, answer in (("chosen", chosen), ("rejected", rejected)):
        if _is_blank(answer):
            raise DataError(f"{source}: field {field!r} is empty")
    system = _check_system(source, record.get(cols.names["system"]))
    return PreferenceRow(prompt, chosen, rejected, system, source)


def _missing(source: str, record: Record, field: str, cols: _Columns) -> DataError:
    column = cols.names[field]
    where = f" (column {column!r})" if column != field else ""
    what = "null" if column in record else "missing"
    present = ", ".join(map(str, record)) or "none"
    return DataError(
        f"{source}: {what} field {field!r}{where}; the columns present are: {present}. "
        'Map other column names with --data.columns, e.g. \'{"prompt": "question"}\''
    )


def _check_part(source: str, field: str, value: Any) -> Part:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return [_check_message(source, field, number, message) for number, message in enumerate(value, 1)]
    raise DataError(
        f"{source}: field {field!r} must be a string or a list of {{role, content}} messages, got {_type_name(value)}"
    )


def _check_message(source: str, field: str, number: int, message: Any) -> Message:
    """The message reduced to role and content, which is all that the chat templates here use."""
    if isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str):
        if message["role"] not in ROLES:
            raise DataError(
                f"{source}: field {field!r}, message {number}: unknown role {message['role']!r}; expected one of "
                f"{', '.join(ROLES)} (rename roles such as 'human'/'gpt' before training)"
            )
        return {"role": message["role"], "content": message["content"]}
    if isinstance(message, dict):
        problems = [
            f"{key!r} is {'missing' if key not in message else _type_name(message[key])}"
            for key in ("role", "content")
            if not isinstance(message.get(key), str)
        ]
        got = "; ".join(problems)
    else:
        got = f"got {_type_name(message)}"
    raise DataError(
        f"{source}: field {field!r}, message {number}: expected an object with string 'role' and 'content': {got}"
    )


def _split_messages(source: str, prompt: Part | None, chosen: Part, rejected: Part) -> tuple[Part | None, Part, Part]:
    """Prompt and answers as message lists, moving the conversation that chosen and rejected share into the prompt.

    The shared part is the longest common prefix that ends before the last assistant turn of each. When it holds
    a user or system turn it is the prompt (the conversations carry their prompt, which a prompt column repeats);
    when it holds only assistant turns, it follows the prompt column's messages. None: no prompt anywhere.
    """
    chosen_m, rejected_m = _as_messages(chosen, ANSWER_ROLE), _as_messages(rejected, ANSWER_ROLE)
    shared = _shared_prefix(chosen_m, rejected_m)
    given = None if prompt is None else _as_messages(prompt, "user")
    if given is None or any(m["role"] in PROMPT_ROLES for m in chosen_m[:shared]):
        # the conversations hold the prompt in their own words (a prompt column there repeats it)
        prompt_m: list[Message] | None = chosen_m[:shared] or given
    else:
        prompt_m = given + chosen_m[:shared]  # shared assistant turns continue the prompt column's conversation
    answers = chosen_m[shared:], rejected_m[shared:]
    for field, answer in zip(("chosen", "rejected"), answers, strict=True):
        stray = next((m["role"] for m in answer if m["role"] in PROMPT_ROLES), None)
        if stray is not None:
            raise DataError(
                f"{source}: field {field!r} holds a {stray!r} message in its answer; chosen and rejected must "
                f"be the answers alone, or whole conversations that share their prompt and end in "
                f"{ANSWER_ROLE!r} turns"
            )
    return prompt_m, answers[0], answers[1]


def _as_messages(part: Part, role: str) -> list[Message]:
    if isinstance(part, list):
        return part
    # an empty prompt string means "no prompt", not an empty user turn
    return [{"role": role, "content": part}] if part or role == ANSWER_ROLE else []


def _shared_prefix(chosen: list[Message], rejected: list[Message]) -> int:
    """Length of the common prefix of the two conversations, stopping before the last assistant turn of each."""
    end = min(_last_answer(chosen), _last_answer(rejected))
    shared = 0
    while shared < end and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def _last_answer(messages: list[Message]) -> int:
    """Index of the last assistant message; 0 (nothing may be shared) when there is none."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == ANSWER_ROLE:
            return index
    return 0


def _is_blank(part: Part) -> bool:
    if isinstance(part, str):
        return not part.strip()
    return all(not message["content"].strip() for message in part)


def _check_system(source: str, value: Any) -> str | None:
    """The system prompt; null and blank mean none."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"{source}: field 'system' must be a string, got {_type_name(value)}")
    return value if value.strip() else None


def _warn_identical(label: str, rows: list[PreferenceRow]) -> None:
    same = [row.source for row in rows if row.chosen == row.rejected]
    if same:
        # such pairs carry no preference (zero DPO gradient); they are kept, but usually point at a data problem
        log.warning("%s: %d row(s) have chosen identical to rejected, e.g. %s", label, len(same), "; ".join(same[:3]))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else '(no message)'}"
