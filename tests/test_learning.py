"""On a small learnable preference task, held-out reward accuracy rises from chance to >= 0.9."""

import lightning as L
import pytest

from alignment import PreferenceDataModule
from tests.helpers import PAIR_METHODS, synthetic_pairs, write_jsonl


@pytest.mark.parametrize("cls", PAIR_METHODS)
@pytest.mark.slow
def test_held_out_reward_accuracy_rises(tmp_path, cls):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(128, seed=0))
    held_out = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(64, seed=1))
    data = PreferenceDataModule(str(train), val_path=str(held_out), max_length=64, batch_size=8)
    L.seed_everything(0)
    module = cls(base="tiny", load_in_4bit=True, lora_r=8, lora_alpha=16, learning_rate=5e-3, lr_scheduler="constant")
    trainer = L.Trainer(
        max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0
    )
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = {k: v.item() for k, v in trainer.callback_metrics.items()}

    assert before["val/rewards/accuracies"] < 0.7  # the random model cannot tell the answers apart
    assert after["val/rewards/accuracies"] >= 0.9
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.01
    assert after["val/loss"] < before["val/loss"]
