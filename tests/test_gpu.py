"""On a CUDA device: a few training steps in 4-bit nf4 with bf16-mixed precision (skipped without one)."""

import math

import lightning as L
import pytest
import torch

from alignment import PreferenceDataModule
from tests.helpers import ALL_METHODS, synthetic_pairs, write_jsonl


@pytest.mark.gpu
@pytest.mark.parametrize("cls", ALL_METHODS)
def test_4bit_bf16_mixed_steps_on_cuda(tmp_path, cls):
    data = PreferenceDataModule(
        str(write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(48, seed=0))), max_length=64, batch_size=4
    )
    L.seed_everything(0)
    module = cls(base="tiny", load_in_4bit=True, lora_dropout=0.1, learning_rate=5e-3, gradient_checkpointing=True)
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(module, data)

    base_layer = module.policy.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert base_layer.weight.__class__.__name__ == "Params4bit" and base_layer.weight.device.type == "cuda"
    assert base_layer.compute_dtype == torch.bfloat16
    adapters = [p for n, p in module.policy.named_parameters() if p.requires_grad]
    assert adapters and all(p.dtype == torch.float32 for p in adapters)  # bf16-mixed keeps LoRA in fp32
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
