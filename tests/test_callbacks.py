"""The run's checkpoint callback: last.ckpt at the final step, the adapter saved with it."""

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from alignment import ORPO, PreferenceDataModule
from alignment.run.callbacks import RunCheckpoint
from tests.helpers import synthetic_pairs, write_jsonl


@pytest.mark.slow
def test_last_checkpoint_and_adapter_hold_the_final_step_when_stopping_between_saves(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=0))
    data = PreferenceDataModule(str(pairs), max_length=64, batch_size=2, val_fraction=0.1)  # 18 steps an epoch
    module = ORPO(base="tiny", load_in_4bit=False, learning_rate=1e-2)
    checkpoints = RunCheckpoint(
        dirpath=tmp_path / "checkpoints", adapter_dir=tmp_path / "adapter", save_last=True, save_top_k=1
    )
    trainer = L.Trainer(
        max_steps=13, val_check_interval=5, logger=False, enable_progress_bar=False,
        callbacks=[checkpoints],
    )  # fmt: skip
    trainer.fit(module, data)

    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 13  # the regular saves happened at steps 5 and 10
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    final = {k: v for k, v in module.policy.state_dict().items() if "lora_" in k}
    assert len(adapter) == len(final) == len(last["state_dict"])
    for key, value in last["state_dict"].items():
        torch.testing.assert_close(value, final[key.removeprefix("policy.")], rtol=0, atol=0)
    for key, value in adapter.items():  # PEFT names drop the adapter name ("default")
        assert any(torch.equal(value, v) for k, v in final.items() if k.replace(".default", "") == key), key
