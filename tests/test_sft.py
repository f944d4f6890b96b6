"""SFT: labels on the answer tokens only (or the prompt's too), chat conversations trained on their last assistant
turn, the loss as TRL's (NLL per answer token), learning, exact resume, and the CLI."""

import csv
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from alignment import DPO, SFT, PreferenceDataModule
from alignment.data import IGNORE_INDEX, TokenizedSequence, collate_sequences
from alignment.errors import ConfigError
from alignment.methods import METHODS
from tests.helpers import synthetic_pairs, write_jsonl
from tests.test_cli import run_cli
from tests.test_resume import assert_same_adapters, run


def sft_data(path, **kwargs) -> PreferenceDataModule:
    data = PreferenceDataModule(str(path), val_fraction=0, max_length=128, **kwargs)
    data.data_kind = "sequences"
    data.setup()
    return data


def labelled_text(data: PreferenceDataModule, row) -> str:
    batch = data.collate([row])
    return data.tokenizer.decode(batch.labels[0][batch.labels[0] != IGNORE_INDEX])


def test_collate_sequences_labels_the_answer_only():
    rows = [TokenizedSequence([1, 40, 41], [50, 51, 2], 0), TokenizedSequence([1, 42], [52, 2], 1)]
    batch = collate_sequences(rows, pad_id=3, pad_to_multiple_of=8)
    assert batch.input_ids.tolist() == [[1, 40, 41, 50, 51, 2, 3, 3], [1, 42, 52, 2, 3, 3, 3, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]]
    x = IGNORE_INDEX
    assert batch.labels.tolist() == [[x, x, x, 50, 51, 2, x, x], [x, x, 52, 2, x, x, x, x]]
    assert batch.index.tolist() == [0, 1]


def test_rows_of_every_format_train_their_answer_text(tmp_path):
    rows = [
        {"prompt": "What is 2 + 2?", "chosen": "four", "rejected": "five"},
        {"prompt": "Name a colour.", "completion": "blue"},
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows[:1])
    completions = write_jsonl(tmp_path / "completions.jsonl", rows[1:])
    for path, answer in ((pairs, "four"), (completions, "blue")):
        data = sft_data(path, use_chat_template=False)
        (row,) = data.train_set.pairs
        assert labelled_text(data, row) == answer + data.tokenizer.eos_token  # the chosen answer, then EOS
        assert data.tokenizer.decode(row.prompt_ids).endswith(rows[0 if path == pairs else 1]["prompt"])


def test_a_conversation_trains_its_last_assistant_turn_the_earlier_ones_are_prompt(tmp_path):
    messages = [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "second answer"},
    ]
    data = sft_data(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]))
    (row,) = data.train_set.pairs
    trained, prompt = labelled_text(data, row), data.tokenizer.decode(row.prompt_ids)
    assert "second answer" in trained and "first answer" not in trained
    assert "first answer" in prompt and "Again." in prompt and "second answer" not in prompt


def test_completions_labelled_undesirable_are_left_out(tmp_path):
    rows = [{"prompt": "a", "completion": "good", "label": True}, {"prompt": "b", "completion": "bad", "label": False}]
    data = sft_data(write_jsonl(tmp_path / "rows.jsonl", rows), use_chat_template=False)
    assert [labelled_text(data, r) for r in data.train_set.pairs] == ["good" + data.tokenizer.eos_token]


@pytest.fixture(scope="module")
def model():
    module = SFT(base="tiny", load_in_4bit=True, lora_r=4)
    module.configure_model()
    return module


def test_loss_is_the_nll_per_answer_token_and_accuracy_the_top1_share(tmp_path, model):
    data = sft_data(write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(3, seed=0)))
    batch = data.collate(data.train_set.pairs)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.attention_mask)[:, :-1]  # (B, T-1, V)
        targets = batch.labels[:, 1:]
        expected = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX)  # mean over tokens
        mask = targets != IGNORE_INDEX
        accuracy = (logits.argmax(-1)[mask] == targets[mask]).float().mean()
        for lean in (True, False):
            model.hparams.lean_logps = lean
            loss, metrics = model.compute_loss(batch)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(metrics["loss"].mean(), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(metrics["mean_token_accuracy"].mean(), accuracy)
            assert len(metrics["loss"]) == mask.sum()  # one value per answer token
    model.hparams.lean_logps = True


def test_with_completion_only_loss_false_the_prompt_is_trained_too(tmp_path, model):
    data = sft_data(write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(3, seed=0)))
    batch = data.collate(data.train_set.pairs)
    with torch.no_grad():
        _, answers_only = model.compute_loss(batch)
        model.hparams.completion_only_loss = False
        try:
            _, whole = model.compute_loss(batch)
        finally:
            model.hparams.completion_only_loss = True
    # every real token but each row's first
    assert len(whole["loss"]) == (batch.attention_mask.sum() - len(batch.input_ids)) > len(answers_only["loss"])


def test_sft_is_a_method_of_the_package():
    assert METHODS["SFT"] == "alignment.methods.sft"
    import alignment

    assert "SFT" in alignment.__all__ and alignment.SFT is SFT


def test_held_out_nll_of_the_chosen_answers_falls(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(128, seed=0))
    held_out = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(64, seed=1))
    data = PreferenceDataModule(str(train), val_path=str(held_out), max_length=64, batch_size=8)
    L.seed_everything(0)
    module = SFT(base="tiny", load_in_4bit=True, lora_r=8, lora_alpha=16, learning_rate=5e-3, lr_scheduler="constant")
    trainer = L.Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0
    )
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = {k: v.item() for k, v in trainer.callback_metrics.items()}
    # the tiny model's LM head and final norm are frozen, which bounds its logits: the NLL cannot fall near 0, but
    # half a nat per token (5.62 -> 4.98 here) is far beyond the noise, and the top-1 share rises from ~0
    assert after["val/loss"] < before["val/loss"] - 0.5, (before, after)
    assert before["val/mean_token_accuracy"] < 0.05 and after["val/mean_token_accuracy"] > 0.3


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(18, seed=0))


def test_resume_is_bit_exact(pairs, tmp_path):
    from tests.helpers import SignalAtStep

    _, uninterrupted = run(SFT, pairs, tmp_path / "whole", max_steps=7)
    stopped, _ = run(SFT, pairs, tmp_path / "split", max_steps=7, extra_callbacks=[SignalAtStep(3)])
    assert stopped.global_step == 3
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    resumed, adapters = run(SFT, pairs, tmp_path / "split", max_steps=7, ckpt_path=str(last))
    assert resumed.global_step == 7
    assert_same_adapters(adapters, uninterrupted)


def test_a_dpo_checkpoint_is_not_resumed_as_sft(pairs, tmp_path):
    run(DPO, pairs, tmp_path, max_steps=2)
    with pytest.raises(ConfigError, match="trained with DPO, this run is SFT"):
        run(SFT, pairs, tmp_path, max_steps=4, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))


@pytest.mark.slow
def test_cli_fit_logs_the_sft_metrics(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("fit", "--config", "demo_sft.yaml", "--trainer.default_root_dir", str(run_dir),
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for name in ("loss", "mean_token_accuracy"):
        assert any(row[f"train/{name}"] for row in rows) and any(row[f"val/{name}"] for row in rows)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_conversation_without_a_final_answer_is_one_line_and_exit_2(tmp_path):
    rows = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}]}
    rows.write_text("".join(json.dumps(r) + "\n" for r in [good, good, bad]))
    result = run_cli("fit", "--config", "demo_sft.yaml", "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--data.path", str(rows))  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {rows}, line 3: field 'messages' must end with an 'assistant' turn, the answer trained on"
    )
    assert "Traceback" not in result.stderr
