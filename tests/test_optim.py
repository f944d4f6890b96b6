"""Optimizer over the adapters only, learning-rate schedules with warmup."""

import lightning as L
import pytest

from alignment import ORPO, PreferenceDataModule
from tests.helpers import synthetic_pairs, write_jsonl

# lr multiplier at steps 0, 1, 2, 6, 10 of 10, with 2 warmup steps (decay over steps 2..10)
EXPECTED = {
    "cosine": [0.0, 0.5, 1.0, 0.5, 0.0],
    "linear": [0.0, 0.5, 1.0, 0.5, 0.0],
    "constant": [0.0, 0.5, 1.0, 1.0, 1.0],
}


def fit(tmp_path, **kwargs) -> L.Trainer:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24, seed=0))
    module = ORPO(base="tiny", load_in_4bit=False, learning_rate=1e-3, **kwargs)
    trainer = L.Trainer(
        max_steps=10, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0
    )
    trainer.fit(module, PreferenceDataModule(str(pairs), max_length=64, batch_size=2, val_fraction=0))
    return trainer


@pytest.mark.parametrize("schedule", sorted(EXPECTED))
@pytest.mark.parametrize("warmup", [{"warmup_steps": 2}, {"warmup_ratio": 0.2}])
def test_schedule_with_warmup(tmp_path, schedule, warmup):
    trainer = fit(tmp_path, lr_scheduler=schedule, **warmup)
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step"
    multiplier = config.scheduler.lr_lambdas[0]
    assert [multiplier(step) for step in (0, 1, 2, 6, 10)] == pytest.approx(EXPECTED[schedule], abs=1e-9)


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit"])
def test_optimizer_holds_only_the_adapters(tmp_path, name):
    trainer = fit(tmp_path, optimizer=name, lr_scheduler="constant")
    optimizer = trainer.optimizers[0]
    assert ("8bit" in type(optimizer).__name__) == (name == "adamw_8bit")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    adapters = {id(p) for n, p in trainer.lightning_module.named_parameters() if "lora_" in n}
    assert held == adapters
