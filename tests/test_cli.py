"""The real `cli.py` on the demo configs: files written, metric names logged, every config parses."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from alignment import DPO, ORPO
from alignment.methods import METHODS
from alignment.model.load import load_base
from alignment.usage import main
from tests.helpers import synthetic_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
COMMON = ["train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
          "train/rewards/margins", "train/logps/chosen", "train/logps/rejected"]  # fmt: skip
ORPO_EXTRA = ["train/nll_loss", "train/log_odds_ratio", "train/log_odds_chosen"]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True, env=os.environ.copy()
    )


@pytest.mark.parametrize(("config", "cls", "extra"), [("demo.yaml", ORPO, ORPO_EXTRA), ("demo_dpo.yaml", DPO, [])])
@pytest.mark.slow
def test_fit_writes_run_directory(tmp_path, config, cls, extra):
    run = tmp_path / "run"
    result = run_cli("fit", "--config", config, "--trainer.default_root_dir", str(run),
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["default_root_dir"] == str(run)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])  # adapters only

    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    policy = PeftModel.from_pretrained(load_base("tiny", load_in_4bit=True), adapter)
    loaded = dict(policy.named_parameters())
    for key, value in checkpoint["state_dict"].items():
        name = key.removeprefix("policy.")
        torch.testing.assert_close(loaded[name].float(), value.float(), rtol=0, atol=0)

    restored = cls.load_from_checkpoint(run / "checkpoints" / "last.ckpt")  # no trainer: builds the model itself
    restored_weights = dict(restored.named_parameters())
    for key, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(restored_weights[key], value, rtol=0, atol=0)

    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    expected = COMMON + extra
    assert set(expected) <= columns
    assert {name.replace("train/", "val/") for name in expected} <= columns
    assert any(row["train/loss"] for row in rows) and any(row["val/loss"] for row in rows)


@pytest.mark.slow
def test_bare_config_name_resolves_in_configs_dir(tmp_path):
    result = run_cli("fit", "--config", "orpo_tinyllama.yaml", "--print_config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unsloth/tinyllama-bnb-4bit" in result.stdout


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.slow
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] in {f"alignment.{name}" for name in METHODS}
    assert "tokenizer" not in printed["data"]  # linked from model.base, not set by hand


# every preference method has a config for every seed base; a method joins with its name here
PAIRED_METHODS = ("DPO", "ORPO", "SimPO", "CPO")
SEED_BASES = ("gemma2b", "llama3_8b", "mistral7b", "tinyllama", "smollm2")


@pytest.mark.parametrize("base", SEED_BASES)
@pytest.mark.parametrize("method", PAIRED_METHODS)
def test_every_method_has_a_config_per_seed_base_that_differs_only_in_its_method(method, base):
    path = ROOT / "configs" / f"{method.lower()}_{base}.yaml"
    assert path.name in CONFIGS, f"{path.name} missing"  # and so parsed by test_every_config_parses
    config, dpo = (yaml.safe_load(p.read_text()) for p in (path, ROOT / "configs" / f"dpo_{base}.yaml"))
    assert config["model"]["class_path"] == f"alignment.{method}" and method in METHODS
    assert {k: v for k, v in config.items() if k != "model"} == {k: v for k, v in dpo.items() if k != "model"}
    shared = set(config["model"]["init_args"]) & set(dpo["model"]["init_args"]) - {"beta", "label_smoothing"}
    assert {k: config["model"]["init_args"][k] for k in shared} == {k: dpo["model"]["init_args"][k] for k in shared}
    assert "base" in shared and "learning_rate" in shared


@pytest.mark.parametrize("base", SEED_BASES)
@pytest.mark.parametrize("method", sorted(set(METHODS) - set(PAIRED_METHODS)))
def test_the_unpaired_and_supervised_methods_have_a_config_per_seed_base_on_the_same_model(method, base):
    """SFT and KTO read other data (SFT splits, unpaired batches), so only the model settings match DPO's."""
    path = ROOT / "configs" / f"{method.lower()}_{base}.yaml"
    assert path.name in CONFIGS, f"{path.name} missing"  # and so parsed by test_every_config_parses
    config, dpo = (yaml.safe_load(p.read_text()) for p in (path, ROOT / "configs" / f"dpo_{base}.yaml"))
    assert config["model"]["class_path"] == f"alignment.{method}"
    for key in ("base", "load_in_4bit", "lora_r", "lora_alpha", "lora_target_modules"):
        assert config["model"]["init_args"].get(key) == dpo["model"]["init_args"].get(key), key


@pytest.mark.slow
def test_offline_hub_model_fails_at_once_with_local_path_hint(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(8, seed=0))
    result = run_cli("fit", "--config", "orpo_tinyllama.yaml", "--data.path", str(data), "--data.val_split", "null",
                     "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                     "--trainer.default_root_dir", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 2
    assert "unsloth/tinyllama-bnb-4bit" in result.stderr and "--model.base" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_data_file_is_reported_without_traceback(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    result = run_cli("fit", "--config", "demo.yaml", "--data.path", str(bad),
                     "--trainer.default_root_dir", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 2
    assert "pairs.jsonl" in result.stderr and "2" in result.stderr and "chosen" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_wandb_switch_logs_offline_into_the_run(tmp_path):
    run = tmp_path / "run"
    result = run_cli("fit", "--config", "demo_dpo.yaml", "--wandb", "true", "--trainer.default_root_dir", str(run),
                     "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run written"
    assert (run / "metrics.csv").is_file()  # CSV always


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("--model.label_smoothing", "0.7", "label_smoothing must be in [0, 0.5)"), ("--model.beta", "0", "beta must be")],
)
@pytest.mark.slow
def test_out_of_range_setting_is_reported_without_traceback(tmp_path, flag, value, message):
    result = run_cli("fit", "--config", "demo_dpo.yaml", flag, value, "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def start_fit(run: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "fit", "--config", "demo.yaml", "--trainer.default_root_dir", str(run),
         "--model.lora_dropout", "0.1", *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_training(process: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 120
    while not (run / "metrics.csv").exists() or "train/loss" not in (run / "metrics.csv").read_text():
        assert process.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)


def train_steps(run: Path) -> list[int]:
    with (run / "metrics.csv").open() as file:
        return [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_finishes_bit_exact(tmp_path):
    whole = tmp_path / "whole"
    assert start_fit(whole, "--trainer.max_steps", "30").wait(timeout=300) == 0
    run = tmp_path / "run"
    process = start_fit(run, "--trainer.max_steps", "30")
    wait_for_training(process, run)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]  # a clean stop
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 0 < stopped_at < 30 and f"stopped at step {stopped_at}" in stderr
    assert max(train_steps(run)) in (stopped_at, stopped_at - 1)  # the demo logs every 2 steps

    result = run_cli("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last")
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_steps(run) == list(range(2, 31, 2))  # the rows before the stop are kept, none twice
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(whole / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


@pytest.mark.slow
def test_resume_with_another_objective_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    first = run_cli("fit", "--config", "demo.yaml", "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    result = run_cli("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--model.beta", "0.5")
    assert result.returncode == 2
    assert "cannot resume" in result.stderr and "model.beta" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_at_a_step(tmp_path):
    run = tmp_path / "run"
    process = start_fit(run, "--trainer.max_epochs", "1000")
    wait_for_training(process, run)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert f"stopped at step {stopped_at} (SIGINT)" in stderr
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_second_interrupt_stops_at_once_and_keeps_adapter_and_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    process = start_fit(run, "--trainer.max_epochs", "1000")
    wait_for_training(process, run)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    checkpoints = list((run / "checkpoints").glob("*.ckpt"))
    assert checkpoints
    state = torch.load(max(checkpoints, key=lambda p: p.stat().st_mtime), weights_only=True)
    assert state["global_step"] > 0 and all("lora_" in k for k in state["state_dict"])


@pytest.mark.slow
def test_lightnings_distributed_sampler_is_refused_in_one_line_under_ddp(tmp_path):
    run = tmp_path / "run"
    result = run_cli("fit", "--config", "demo.yaml", "--trainer.default_root_dir", str(run),
                     "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                     "--trainer.use_distributed_sampler", "true")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: --trainer.use_distributed_sampler true: the data module shards")
        and "Traceback" not in result.stderr
    )
