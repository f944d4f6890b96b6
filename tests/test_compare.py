"""`compare`: one row per prompt, one column per model, repetition and length per answer, adapters switched."""

import json

import pytest
from peft import PeftModel

from alignment.commands.compare import (
    Answer,
    parse_adapters,
    prompt_token_ids,
    read_prompts,
    repetition_score,
    write_comparison,
)
from alignment.errors import ConfigError, DataError
from alignment.model import load_base, load_tokenizer
from alignment.model.generate import DecodeOptions, generate_ids, stop_token_ids
from alignment.usage import main
from tests.demo_runs import demo_run
from tests.helpers import write_jsonl

PROMPTS = [{"prompt": "What is 27 + 31?"}, {"prompt": "Count to 4."}, {"prompt": "What colour is the sky?"}]


def test_repetition_score_by_hand():
    # 7 trigrams: abc bca cab abc bca cab abc; the last 4 repeat earlier ones
    assert repetition_score("a b c a b c a b c".split(), n=3) == pytest.approx(4 / 7)
    assert repetition_score([5, 5, 5, 5], n=2) == pytest.approx(2 / 3)  # (5,5) three times: 2 repeats
    assert repetition_score("the cat sat on the mat".split(), n=2) == 0.0  # "the" recurs, no bigram does
    assert repetition_score([1, 2], n=4) == 0.0  # shorter than n: no n-gram at all


@pytest.mark.slow
def test_compare_writes_one_row_per_prompt_and_one_column_per_model(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "cmp"
    main(["compare", "--prompts", str(prompts), "--adapter", f"dpo={demo_run('dpo')}",
          "--adapter", f"orpo={demo_run('orpo')}", "--max-new-tokens", "12", "--out", str(out)])  # fmt: skip

    records = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p["prompt"] for p in PROMPTS]
    assert all(list(r["answers"]) == ["base", "dpo", "orpo"] for r in records)
    table = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == ["#", "prompt", "base", "dpo", "orpo"]
    assert len(table) == 2 + len(PROMPTS) + 1  # header, rule, one row per prompt, the means
    means = [c.strip() for c in table[-1].strip("|").split("|")]
    for column, model in enumerate(["base", "dpo", "orpo"], start=2):
        answers = [r["answers"][model] for r in records]
        assert all(0 < a["tokens"] <= 12 and 0 <= a["repetition"] <= 1 for a in answers)
        mean_repetition = sum(a["repetition"] for a in answers) / len(answers)
        mean_tokens = sum(a["tokens"] for a in answers) / len(answers)
        assert means[column] == f"repetition {mean_repetition:.3f}, {mean_tokens:.1f} tokens"
    page = (out / "compare.html").read_text()
    assert page.count("<tr>") == 1 + len(PROMPTS) + 1 and "<tfoot>" in page
    about = (out / "compare.md").read_text().split("\n\n")[1]  # the settings, greedy by default
    assert "- do_sample: False" in about and "temperature" not in about and "top_p" not in about


def test_only_the_decoding_settings_that_applied_are_listed():
    assert "temperature" not in DecodeOptions().applied() and "top_p" not in DecodeOptions().applied()
    sampled = DecodeOptions(do_sample=True, temperature=0.5, top_p=0.8).applied()
    assert sampled["temperature"] == 0.5 and sampled["top_p"] == 0.8


def test_control_characters_are_shown_in_the_markdown_table_and_the_text_is_kept(tmp_path):
    text = "line one\nline two\ttab\x1b[31mred\x00 | pipe é"
    prompts = [("say\rit", "be\nbrief"), ([{"role": "user", "content": "hi\x07"}], None)]
    answers = {"base": [Answer(text, 9, 0.0), Answer("ok", 1, 0.0)]}
    write_comparison(tmp_path, prompts, answers, {"do_sample": False})

    markdown = (tmp_path / "compare.md").read_text()
    assert not any(c in markdown for c in "\t\r\x1b\x00\x07")  # no raw control character left
    rows = [line for line in markdown.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2  # each row stays one line
    assert "line one↵line two\\x09tab\\x1b[31mred\\x00 \\| pipe é<br><br>(repetition 0.00, 9 tokens)" in rows[0]
    assert "system: be↵brief<br>say\\x0dit" in rows[0] and "user: hi\\x07" in rows[1]
    page = (tmp_path / "compare.html").read_text()
    assert "line one\nline two\ttab\\x1b[31mred\\x00 | pipe é" in page  # HTML keeps breaks and tabs
    record = json.loads((tmp_path / "compare.jsonl").read_text().splitlines()[0])
    assert record["answers"]["base"]["text"] == text  # the data file keeps the exact text


def test_each_column_is_its_own_model(tmp_path):
    """The base column is the bare base and each adapter's column that adapter alone, loaded on its own."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "cmp"
    main(["compare", "--prompts", str(prompts), "--adapter", str(demo_run("dpo")),  # bare RUN: named "dpo"
          "--adapter", f"orpo={demo_run('orpo')}", "--max-new-tokens", "10", "--out", str(out)])  # fmt: skip
    records = [json.loads(line) for line in (out / "compare.jsonl").read_text().splitlines()]

    tokenizer = load_tokenizer("tiny")
    ids = prompt_token_ids(tokenizer, read_prompts(prompts), use_chat_template=True)
    alone = {"base": load_base("tiny").eval()}
    for name in ("dpo", "orpo"):
        alone[name] = PeftModel.from_pretrained(load_base("tiny"), demo_run(name) / "adapter").eval()
    for name, model in alone.items():
        generated = generate_ids(model, ids, pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(model, tokenizer),
                                 decode=DecodeOptions(max_new_tokens=10), batch_size=1)  # fmt: skip
        assert [r["answers"][name]["tokens"] for r in records] == [len(g) for g in generated]
        assert [r["answers"][name]["text"] for r in records] == [
            tokenizer.decode(g, skip_special_tokens=True).strip() for g in generated
        ]


def test_left_padded_batches_answer_as_one_prompt_at_a_time():
    tokenizer = load_tokenizer("tiny")
    model = load_base("tiny", load_in_4bit=False).eval()
    prompts = [(p["prompt"], None) for p in PROMPTS]
    ids = prompt_token_ids(tokenizer, prompts, use_chat_template=True)
    assert len({len(i) for i in ids}) > 1  # different lengths: the batch is really padded
    common = dict(pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(model, tokenizer),
                  decode=DecodeOptions(max_new_tokens=8))  # fmt: skip
    assert generate_ids(model, ids, batch_size=3, **common) == generate_ids(model, ids, batch_size=1, **common)


def test_prompts_render_as_in_training():
    tokenizer = load_tokenizer("tiny")
    [chat] = prompt_token_ids(tokenizer, [("Hi", None)], use_chat_template=True)
    [plain] = prompt_token_ids(tokenizer, [("Hi", "Be brief.")], use_chat_template=False)
    assert tokenizer.decode(chat) == "<s><|user|>\nHi</s>\n<|assistant|>\n"
    assert tokenizer.decode(plain) == "<s>Be brief.\n\nHi"


def test_prompt_files_of_every_kind_and_their_errors(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    chat = [{"role": "user", "content": "second"}]
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "first"}, {"prompt": chat}]))
    assert [p for p, _ in read_prompts(tmp_path / "p.txt")] == ["first", "second"]
    assert read_prompts(tmp_path / "p.json")[1][0] == chat
    bad = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "ok"}, {"question": "where is the prompt?"}])
    with pytest.raises(DataError, match=r"q\.jsonl, line 2: no 'prompt' field \(found \['question'\]\)"):
        read_prompts(bad)
    other = write_jsonl(tmp_path / "r.jsonl", [{"question": "where is the prompt?"}])
    assert read_prompts(other, field="question") == [("where is the prompt?", None)]
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "none.jsonl")


def test_adapter_errors_name_the_path(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(ConfigError, match=r"unfinished holds no adapter"):
        parse_adapters([f"x={tmp_path / 'unfinished'}"])
    with pytest.raises(ConfigError, match="not 'base'"):
        parse_adapters([f"base={demo_run('dpo')}"])
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--prompts", str(prompts), "--adapter", f"a={tmp_path / 'missing'}"])
    assert exit_info.value.code == 2 and "missing does not exist" in capsys.readouterr().err
