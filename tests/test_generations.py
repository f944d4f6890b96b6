"""W&B sample generations: a table of (step, prompt, answer) for fixed validation prompts, W&B offline."""

import json

import lightning as L
import pytest
import wandb
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from alignment import ORPO, PreferenceDataModule
from alignment.run.generations import COLUMNS, SampleGenerations
from alignment.usage import main


@pytest.fixture(autouse=True)
def _finish_wandb():
    yield
    wandb.finish()  # a run left open would be reused by the next WandbLogger


def fit(tmp_path, logger, callback):
    data = PreferenceDataModule(None, max_length=96, batch_size=4, val_fraction=0.05)
    module = ORPO(base="tiny", load_in_4bit=False, learning_rate=1e-2)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=logger,
                        callbacks=[callback], enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, data)
    return data


def test_a_table_of_answers_to_the_same_prompts_is_logged_after_each_validation(tmp_path, monkeypatch):
    logged = []
    original = WandbLogger.log_table

    def spy(self, key, columns=None, data=None, dataframe=None, step=None):
        logged.append((key, columns, [list(row) for row in data], step))
        original(self, key, columns=columns, data=data, step=step)

    monkeypatch.setattr(WandbLogger, "log_table", spy)
    data = fit(tmp_path, WandbLogger(project="test", save_dir=tmp_path), SampleGenerations(num_prompts=2))

    assert [(key, columns, step) for key, columns, _, step in logged] == [
        ("val/generations", COLUMNS, 2), ("val/generations", COLUMNS, 4)
    ]  # fmt: skip
    rows = logged[-1][2]
    assert [row[0] for row in rows] == [2, 2, 4, 4]  # the table keeps the rows of earlier validations
    prompts = [data.tokenizer.decode(data.val_set[i].prompt_ids, skip_special_tokens=True).strip() for i in (0, 1)]
    assert [row[1] for row in rows] == prompts * 2  # the same validation prompts each time
    assert all(isinstance(row[2], str) for row in rows)


def test_nothing_is_generated_without_a_wandb_logger(tmp_path):
    callback = SampleGenerations(num_prompts=2)
    fit(tmp_path, CSVLogger(tmp_path), callback)
    assert callback.rows == []


def test_cli_with_wandb_logs_the_table_and_the_resolved_config(tmp_path):
    run = tmp_path / "run"
    main(["fit", "--config", "demo.yaml", "--trainer.default_root_dir", str(run), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
          "--wandb", "true"])  # fmt: skip
    assert wandb.run is not None and wandb.run.config["trainer"]["default_root_dir"] == str(run)
    assert wandb.run.config["model"]["class_path"] == "alignment.ORPO"
    wandb.finish()
    [table] = (run / "wandb").glob("offline-run-*/files/media/table/val/generations_*.table.json")
    content = json.loads(table.read_text())
    assert content["columns"] == COLUMNS and len(content["data"]) == 4 and content["data"][0][0] == 2
