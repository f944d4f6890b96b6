"""Two CPU processes (gloo): validation metrics cover each pair once; two processes of batch b train as one of
batch 2b; the reference cache is shared; a stopped run resumes exactly."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from alignment import ORPO, PreferenceDataModule
from tests.helpers import synthetic_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


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


def fit_cli(run: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "cli.py"), "fit", "--trainer.default_root_dir", str(run),
               "--trainer.accelerator", "cpu", *args]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def val_rows(run: Path) -> list[dict[str, float]]:
    with (run / "metrics.csv").open() as file:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(file) if row.get("val/loss")]


@pytest.mark.slow
def test_two_processes_of_batch_b_train_as_one_of_batch_2b_with_the_reference_cache(tmp_path):
    # DPO: the reference cache is computed in shares and gathered; 15 steps of global batch 8 stay in the first
    # epoch's full batches (157 pairs); dropout off, since each process draws its own masks
    common = ["--config", "demo_dpo.yaml", "--trainer.max_steps", "15", "--trainer.val_check_interval", "15",
              "--model.lora_dropout", "0.0"]  # fmt: skip
    one = fit_cli(tmp_path / "one", *common, "--data.batch_size", "8",
                  "--model.reference_cache_dir", str(tmp_path / "cache-one"))  # fmt: skip
    two = fit_cli(tmp_path / "two", *common, "--data.batch_size", "4", "--trainer.devices", "2",
                  "--trainer.strategy", "ddp", "--model.reference_cache_dir", str(tmp_path / "cache-two"))  # fmt: skip
    assert "computing them" in one.stderr and "computing them" in two.stderr

    cached = [torch.load(next((tmp_path / d).glob("*.pt")), weights_only=True) for d in ("cache-one", "cache-two")]
    assert cached[0]["fingerprint"] == cached[1]["fingerprint"]  # the same model and data: the same entry
    for split in ("train", "validation"):
        # fp32 on CPU; the shares batch the pairs differently, which changes the rounding of the sums only
        torch.testing.assert_close(cached[1]["tables"][split], cached[0]["tables"][split], rtol=1e-5, atol=1e-4)

    adapters = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for name, value in adapters[0].items():
        # gradients averaged over 2 processes of 4 equal those of 8 up to float rounding, compounded over 15 steps
        torch.testing.assert_close(adapters[1][name], value, rtol=1e-3, atol=1e-5, msg=name)
    (val_one,), (val_two,) = val_rows(tmp_path / "one"), val_rows(tmp_path / "two")
    for name in ("val/loss", "val/rewards/margins", "val/rewards/accuracies", "val/logps/chosen"):
        assert val_two[name] == pytest.approx(val_one[name], rel=1e-3, abs=1e-4), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "knobs"),
    [
        ("demo.yaml", []),
        ("demo_dpo.yaml", ["--model.loss_type", "bco_pair"]),
        ("demo_kto.yaml", []),
        ("demo_sft.yaml", []),
    ],  # fmt: skip
    # one per kind of state a resume restores: ORPO stands for the pair methods without a reference (SimPO and CPO
    # read the same batches and keep no state of their own; their single-process resume is in test_resume.py);
    # bco_pair: its reward shift is a running mean gathered across processes; KTO: its KL estimate, averaged; SFT:
    # its rows and their sampler
    ids=["ORPO", "DPO-bco_pair", "KTO", "SFT"],
)
def test_two_process_resume_is_bit_exact_for_every_method(config, knobs, tmp_path):
    """A two-process run stopped by a signal to one process (rank 1; rank 0 saves) resumes bit-exact."""
    common = ["--config", config, *knobs, "--trainer.max_steps", "8", "--trainer.devices", "2", "--trainer.strategy",
              "ddp", "--model.lora_dropout", "0.1", "--trainer.val_check_interval", "4"]  # fmt: skip
    if config in ("demo_dpo.yaml", "demo_kto.yaml"):
        common += ["--model.reference_cache_dir", str(tmp_path / "cache")]
    fit_cli(tmp_path / "whole", *common)
    stopped = fit_cli(tmp_path / "run", *common, "--trainer.callbacks+=tests.helpers.SignalAtStep",
                      "--trainer.callbacks.step=5", "--trainer.callbacks.rank=1")  # fmt: skip
    assert "stopped at step 5" in stopped.stderr
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    fit_cli(tmp_path / "run", "--config", str(tmp_path / "run" / "config.yaml"), "--ckpt_path", "last")
    resumed, whole = adapter(tmp_path / "run"), adapter(tmp_path / "whole")
    assert resumed.keys() == whole.keys() and whole
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    (*_, last_whole), (*_, last_resumed) = val_rows(tmp_path / "whole"), val_rows(tmp_path / "run")
    assert last_resumed["val/loss"] == last_whole["val/loss"]
