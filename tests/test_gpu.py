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


# ---- fsdp_qlora over NCCL: the CPU checks of tests/test_fsdp.py on two GPUs ----------------------------------------

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.mark.gpu
@two_gpus
def test_fsdp_qlora_on_two_gpus_shards_the_base_equals_ddp_and_resumes_bit_exact(tmp_path):
    from tests.test_fsdp import RESIDENT, adapter, launch, output, wait

    common = ["--config", "demo_dpo.yaml", "--trainer.accelerator", "gpu", "--trainer.devices", "2",
              "--trainer.precision", "bf16-mixed", "--trainer.max_steps", "9", "--model.lora_dropout", "0",
              "--data.batch_size", "4", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    wait(launch(tmp_path / "fsdp", *common, "--trainer.strategy", "fsdp_qlora",
                "--model.reference_cache_dir", str(tmp_path / "cache-fsdp")))  # fmt: skip
    wait(launch(tmp_path / "ddp", *common, "--trainer.strategy", "ddp",
                "--model.reference_cache_dir", str(tmp_path / "cache-ddp")))  # fmt: skip
    lines = RESIDENT.findall(output(tmp_path / "fsdp"))
    assert sorted(int(m[0]) for m in lines) == [0, 1]
    assert all(float(resident) <= 0.6 * float(total) for _, resident, total, _ in lines)
    fsdp, ddp = adapter(tmp_path / "fsdp"), adapter(tmp_path / "ddp")
    assert fsdp.keys() == ddp.keys() and fsdp
    for name, value in ddp.items():  # bf16 compute: the all-gathered layers may take other kernels than DDP's
        torch.testing.assert_close(fsdp[name], value, rtol=1e-2, atol=1e-4, msg=name)
    for a, b in zip(*(torch.load(next((tmp_path / c).glob("*.pt")), weights_only=True)["tables"]["train"]
                      for c in ("cache-fsdp", "cache-ddp")), strict=True):  # fmt: skip
        if not torch.isnan(a).any():
            torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)

    run = tmp_path / "stopped"
    wait(launch(run, *common, "--trainer.strategy", "fsdp_qlora", "--model.reference_cache_dir",
                str(tmp_path / "cache-fsdp"), "--trainer.callbacks+=tests.helpers.SignalAtStep",
                "--trainer.callbacks.step=5", "--trainer.callbacks.rank=1"))  # fmt: skip
    assert "stopped at step 5" in output(run)
    wait(launch(run, "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    resumed = adapter(run)
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)
