"""Two CPU processes (gloo): validation metrics cover each pair exactly once, as on one process."""

import lightning as L
import pytest

from alignment import ORPO, PreferenceDataModule
from tests.helpers import synthetic_pairs, write_jsonl


@pytest.mark.slow
def test_two_process_validation_metrics_equal_one_process(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(8, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(5, seed=1))  # 3 + 2 pairs: shards of unequal size
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        module = ORPO(base="tiny", load_in_4bit=False)  # ORPO's rewards differ from pair to pair from the start
        data = PreferenceDataModule(str(train), val_path=str(val), max_length=64, batch_size=2)
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False)
        results[devices] = trainer.validate(module, data, verbose=False)[0]
    assert results[1].keys() == results[2].keys() and "val/loss" in results[1]
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
