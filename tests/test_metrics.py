"""Logged metrics are means over pairs: whole validation set, and train steps since the last log."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from alignment import DPO, ORPO, PreferenceDataModule
from tests.helpers import synthetic_pairs, write_jsonl


class Recording(DPO):
    """DPO that records the per-pair loss of every training micro-batch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss, metrics = self.compute_loss(batch)
        self.train_metrics.update(metrics)
        self.seen.append(metrics["loss"])
        return loss


def data(tmp_path, n_train: int, n_val: int, batch_size: int) -> PreferenceDataModule:
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(n_train, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(n_val, seed=1))
    return PreferenceDataModule(str(train), val_path=str(val), max_length=64, batch_size=batch_size)


@pytest.mark.parametrize("cls", [DPO, ORPO])
def test_validation_metrics_are_means_over_pairs_not_batches(tmp_path, cls):
    datamodule = data(tmp_path, 8, 5, batch_size=2)  # validation batches of 2, 2 and 1 pairs
    module = cls(base="tiny", load_in_4bit=False)
    with torch.no_grad():
        module.configure_model()
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # rewards that differ from pair to pair
    logged = L.Trainer(logger=False, enable_progress_bar=False).validate(module, datamodule, verbose=False)[0]

    per_pair = {}
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            _, metrics = module.compute_loss(batch)
            for name, values in metrics.items():
                per_pair.setdefault(name, []).append(values)
    for name, values in per_pair.items():
        assert logged[f"val/{name}"] == pytest.approx(torch.cat(values).mean().item(), rel=1e-5, abs=1e-6), name


def test_train_metrics_are_means_over_the_steps_since_the_last_log(tmp_path):
    datamodule = data(tmp_path, 12, 2, batch_size=2)
    module = Recording(base="tiny", load_in_4bit=False, learning_rate=1e-2, lr_scheduler="constant")
    trainer = L.Trainer(
        max_steps=6, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule)

    with open(tmp_path / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(logged) == [3, 6]
    assert logged[3] == pytest.approx(torch.cat(module.seen[0:3]).mean().item(), rel=1e-6)
    assert logged[6] == pytest.approx(torch.cat(module.seen[3:6]).mean().item(), rel=1e-6)
    assert logged[3] != pytest.approx(logged[6])  # the model learnt in between: not one value repeated
