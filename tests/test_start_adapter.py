"""Starting from an existing adapter (`--model.adapter`): the policy starts from its weights, and DPO's reference is
that adapter, frozen, not the bare base (with the bare base as reference the loss would not start at ln 2)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from alignment import DPO, ORPO, PreferenceDataModule
from alignment.errors import ConfigError
from alignment.model.load import REFERENCE_ADAPTER, load_base
from alignment.run.callbacks import RunCheckpoint
from alignment.run.resume import AtomicCheckpointIO, ExactResume
from tests.helpers import SignalAtStep, synthetic_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FIRST_RUN_CONFIG = "demo_sft.yaml"  # the first run of the CLI chain: SFT, then DPO from its adapter


def fit(cls, pairs, root, *, max_steps, ckpt_path=None, callbacks=(), **model):
    """A short run of `cls` on the tiny 4-bit model; its checkpoints and adapter/ under `root`."""
    L.seed_everything(7)
    model = {"base": "tiny", "learning_rate": 1e-2, **model}
    module = cls(reference_cache_dir=str(root / "cache"), **model) if cls is DPO else cls(**model)
    data = PreferenceDataModule(str(pairs), max_length=64, batch_size=2, val_fraction=0.2, seed=3)
    checkpoints = RunCheckpoint(dirpath=root / "checkpoints", adapter_dir=root / "adapter", save_last=True,
                                save_top_k=1)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, max_steps=max_steps, accumulate_grad_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()], callbacks=[checkpoints, ExactResume(), *callbacks], num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(18, seed=0))


@pytest.fixture(scope="module")
def batch(pairs):
    data = PreferenceDataModule(str(pairs), max_length=64, batch_size=4, val_fraction=0.2, seed=3)
    data.prepare_data()
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory) -> Path:
    """An adapter trained a few ORPO steps at a high learning rate (far from the bare base), LoRA dropout on."""
    root = tmp_path_factory.mktemp("trained")
    fit(ORPO, pairs, root, max_steps=4, lora_r=4, lora_alpha=8, lora_dropout=0.1)
    return root / "adapter"


def lora_weights(module, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if f".{adapter}." in n}


def built(cls, adapter: Path, **model):
    module = cls(base="tiny", adapter=str(adapter), **model)
    module.configure_model()
    return module


# ---- the reference is the starting adapter ------------------------------------------------------------------------


def test_dpo_from_an_adapter_starts_at_ln2_with_every_reward_zero(trained, batch):
    module = built(DPO, trained).eval()  # the step-0 validation: no dropout
    loss, metrics = module.compute_loss(batch, "validation")  # no cache: the reference forward
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        torch.testing.assert_close(metrics[name], torch.zeros(4), rtol=0, atol=0)

    # the trap: the bare base as reference (adapters disabled) sees the trained adapter's gains as rewards
    with torch.no_grad(), module.policy.disable_adapter():
        base_chosen, base_rejected = module.sequence_logps(batch, average=False)
    chosen_rewards = module.hparams.beta * (metrics["logps/chosen"] - base_chosen)
    rejected_rewards = module.hparams.beta * (metrics["logps/rejected"] - base_rejected)
    assert torch.all(chosen_rewards.abs() > 1e-2) and torch.all(rejected_rewards.abs() > 1e-2)


def test_the_reference_pass_leaves_the_policy_adapter_alone_trainable(trained, batch):
    module = built(DPO, trained).train()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    reference = {n for n, _ in module.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    assert trainable and reference and all(".default." in n for n in trainable)
    with module.reference_model():
        assert not module.policy.training
    assert {n for n, p in module.named_parameters() if p.requires_grad} == trainable
    assert module.policy.training and module.policy.active_adapter == "default"
    assert set(module._adapter_keys()) == trainable  # what checkpoints hold


def test_training_moves_the_policy_adapter_and_not_the_reference(trained, pairs, tmp_path):
    # no cache: a reference forward inside every step, between the policy's forward and its backward
    start = built(DPO, trained)
    _, module = fit(DPO, pairs, tmp_path, max_steps=2, adapter=str(trained), reference_cache=False)
    policy, reference = lora_weights(module), lora_weights(module, REFERENCE_ADAPTER)
    assert all(torch.equal(v, lora_weights(start, REFERENCE_ADAPTER)[n]) for n, v in reference.items())
    moved = [n for n, v in policy.items() if not torch.equal(v, lora_weights(start)[n])]
    assert len(moved) == len(policy)  # every LoRA matrix of the trainable adapter moved

    saved = tmp_path / "adapter"  # the run's adapter: the trained weights, alone
    assert not (saved / REFERENCE_ADAPTER).exists()
    loaded = PeftModel.from_pretrained(load_base("tiny"), saved)
    assert list(loaded.peft_config) == ["default"]
    for name, value in dict(loaded.named_parameters()).items():
        if ".default." in name:
            assert torch.equal(value, policy[f"policy.{name}"]), name


def test_orpo_starts_from_the_adapters_weights(trained, batch):
    module = built(ORPO, trained).eval()
    assert list(module.policy.peft_config) == ["default"]  # no reference to keep
    assert module.hparams.lora_r == 4 and module.hparams.lora_dropout == 0.1  # the adapter's settings
    expected = PeftModel.from_pretrained(load_base("tiny"), trained).eval()
    with torch.no_grad():
        chosen, rejected = module.sequence_logps(batch, average=True)
        module.policy = expected
        want_chosen, want_rejected = module.sequence_logps(batch, average=True)
        with expected.disable_adapter():
            base_chosen, _ = module.sequence_logps(batch, average=True)
    torch.testing.assert_close(chosen, want_chosen, rtol=0, atol=0)
    torch.testing.assert_close(rejected, want_rejected, rtol=0, atol=0)
    assert torch.all((chosen - base_chosen).abs() > 1e-3)  # not the bare base's


# ---- the cache --------------------------------------------------------------------------------------------------


def test_the_reference_cache_of_the_bare_base_is_never_read_for_an_adapter(trained, pairs, tmp_path):
    _, bare = fit(DPO, pairs, tmp_path / "bare", max_steps=1, lora_r=4, lora_alpha=8)
    other = tmp_path / "other-adapter"  # the same adapter, its weights changed
    shutil.copytree(trained, other)
    weights = load_file(other / "adapter_model.safetensors")
    save_file({k: v * 0.5 for k, v in weights.items()}, other / "adapter_model.safetensors")
    entries = [torch.load(tmp_path / "bare" / "cache" / f"{bare.reference.key}.pt", weights_only=True)]
    for adapter in (trained, other):
        root = tmp_path / adapter.name
        shutil.copytree(tmp_path / "bare" / "cache", root / "cache")  # the bare base's entry is there
        _, module = fit(DPO, pairs, root, max_steps=1, adapter=str(adapter))
        assert len(list((root / "cache").glob("*.pt"))) == 2  # its own entry beside the bare base's
        entries.append(torch.load(root / "cache" / f"{module.reference.key}.pt", weights_only=True))
    assert len({entry["fingerprint"] for entry in entries}) == 3
    bare_rows, adapter_rows = (entry["tables"]["train"] for entry in entries[:2])
    both = entries[0]["filled"]["train"] & entries[1]["filled"]["train"]  # the same pairs: one step's
    assert both.sum() >= 4 and torch.all((bare_rows[both, :2] - adapter_rows[both, :2]).abs() > 1e-2)


# ---- exact resume ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_started_from_an_adapter_resumes_bit_exact(trained, pairs, tmp_path):
    _, whole = fit(DPO, pairs, tmp_path / "whole", max_steps=7, adapter=str(trained))
    stopped, _ = fit(DPO, pairs, tmp_path / "split", max_steps=7, adapter=str(trained), callbacks=[SignalAtStep(3)])
    assert stopped.global_step == 3
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    stored = torch.load(last, weights_only=True)["state_dict"]
    assert stored and all(".default." in k for k in stored)  # the frozen reference copy is not in the checkpoint
    resumed, module = fit(DPO, pairs, tmp_path / "split", max_steps=7, adapter=str(trained), ckpt_path=str(last))
    assert resumed.global_step == 7
    expected = lora_weights(whole)
    assert expected.keys() == lora_weights(module).keys()
    for name, value in lora_weights(module).items():
        assert torch.equal(value, expected[name]), name


def test_resume_after_the_starting_adapter_changed_is_refused(trained, pairs, tmp_path):
    start = tmp_path / "start"
    shutil.copytree(trained, start)
    fit(DPO, pairs, tmp_path / "run", max_steps=2, adapter=str(start))
    weights = load_file(start / "adapter_model.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, start / "adapter_model.safetensors")  # trained on since
    with pytest.raises(ConfigError, match="model.adapter_weights"):
        fit(DPO, pairs, tmp_path / "run", max_steps=4, adapter=str(start),
            ckpt_path=str(tmp_path / "run" / "checkpoints" / "last.ckpt"))  # fmt: skip


# ---- the settings --------------------------------------------------------------------------------------------


def test_lora_flags_at_their_defaults_take_the_adapters_and_others_are_refused(trained):
    module = DPO(base="tiny", adapter=str(trained), lora_alpha=8)  # the same value as the adapter's: fine
    assert (module.hparams.lora_r, module.hparams.lora_alpha) == (4, 8)
    with pytest.raises(ConfigError, match=r"--model.lora_r 8 conflicts with --model.adapter .* r: 4"):
        DPO(base="tiny", adapter=str(trained), lora_r=8)


# ---- the command line ------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ.copy())  # fmt: skip


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """A finished run of FIRST_RUN_CONFIG (no LoRA dropout, so that a DPO step's policy is exactly its adapter)."""
    run = tmp_path_factory.mktemp("chain") / "first"
    result = run_cli("fit", "--config", FIRST_RUN_CONFIG, "--trainer.default_root_dir", str(run),
                     "--trainer.max_steps", "3", "--model.lora_dropout", "0", "--model.learning_rate", "1e-2",
                     "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_cli_chain_dpo_from_a_runs_adapter(first_run, tmp_path):
    run = tmp_path / "dpo"
    result = run_cli("fit", "--config", "demo_dpo.yaml", "--model.adapter", str(first_run / "adapter"),
                     "--model.lora_dropout", "0", "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2",
                     "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    first = min((r for r in read_metrics(run) if r["train/loss"]), key=lambda r: int(r["step"]))
    assert int(first["step"]) == 1  # the mean over the first step's batches, scored before its update
    assert float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(first["train/rewards/chosen"]) == 0 and float(first["train/rewards/rejected"]) == 0

    start = load_file(first_run / "adapter" / "adapter_model.safetensors")
    trained = load_file(run / "adapter" / "adapter_model.safetensors")
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)
    policy = PeftModel.from_pretrained(load_base("tiny"), run / "adapter")
    assert list(policy.peft_config) == ["default"]

    restored = DPO.load_from_checkpoint(run / "checkpoints" / "last.ckpt")  # no trainer: builds the model itself
    weights = dict(policy.named_parameters())
    for name, value in lora_weights(restored).items():
        assert torch.equal(value, weights[name.removeprefix("policy.")]), name

    merged = run_cli("merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32")
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (tmp_path / "merged" / "config.json").is_file()
    compared = run_cli("compare", "--prompts", str(ROOT / "alignment" / "assets" / "demo_prompts.jsonl"),
                       "--adapter", f"first={first_run}", "--adapter", f"dpo={run}", "--max-new-tokens", "4",
                       "--out", str(tmp_path / "compare"))  # fmt: skip
    assert compared.returncode == 0, compared.stderr[-3000:]
    answers = [json.loads(line) for line in (tmp_path / "compare" / "compare.jsonl").read_text().splitlines()]
    assert answers and all(set(row["answers"]) == {"base", "first", "dpo"} for row in answers)


def adapter_naming_another_base(first_run: Path, tmp_path: Path) -> Path:
    adapter = tmp_path / "elsewhere"  # outside its run directory: only adapter_config.json names the base
    shutil.copytree(first_run / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someorg/another-model"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


@pytest.mark.slow
@pytest.mark.parametrize(
    ("given", "message"),
    [
        (lambda run, tmp: tmp / "missing", "no such directory"),
        (lambda run, tmp: run / "checkpoints", "not a PEFT adapter directory"),
        (lambda run, tmp: run, "not a PEFT adapter directory (no adapter_config.json): pass "),
        (adapter_naming_another_base, "was trained on 'someorg/another-model'"),
        (lambda run, tmp: run / "adapter", "--model.lora_dropout 0.05 conflicts with --model.adapter"),
    ],
)
def test_cli_adapter_mistakes_are_one_line(first_run, tmp_path, given, message):
    adapter = given(first_run, tmp_path)
    result = run_cli("fit", "--config", "demo_dpo.yaml", "--model.adapter", str(adapter),
                     "--trainer.default_root_dir", str(tmp_path / "run"))  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert f"--model.adapter {adapter}" in errors[0] and message in errors[0], errors[0]


@pytest.mark.slow
def test_two_processes_train_from_an_adapter_as_one(first_run, tmp_path):
    # no cache: the reference adapter is switched in inside every step, between DDP's forward and its backward
    common = ["--config", "demo_dpo.yaml", "--model.adapter", str(first_run / "adapter"), "--model.lora_dropout", "0",
              "--model.reference_cache", "false", "--trainer.accelerator", "cpu", "--trainer.max_steps", "3",
              "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false"]  # fmt: skip
    runs = {"one": ["--data.batch_size", "8"],
            "two": ["--data.batch_size", "4", "--trainer.devices", "2", "--trainer.strategy", "ddp"]}  # fmt: skip
    for name, args in runs.items():
        result = run_cli("fit", *common, *args, "--trainer.default_root_dir", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
    start = load_file(first_run / "adapter" / "adapter_model.safetensors")
    one, two = (load_file(tmp_path / name / "adapter" / "adapter_model.safetensors") for name in runs)
    for name, value in one.items():
        assert not torch.equal(value, start[name]), name  # every LoRA matrix trained
        # gradients averaged over 2 processes of 4 equal those of 8 up to float rounding
        torch.testing.assert_close(two[name], value, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_cli_refuses_to_start_from_the_adapter_the_run_replaces(first_run, tmp_path):
    run = tmp_path / "first"
    shutil.copytree(first_run, run)
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    result = run_cli("fit", "--config", "demo_dpo.yaml", "--model.adapter", str(run / "adapter"),
                     "--model.lora_dropout", "0", "--trainer.default_root_dir", str(run),
                     "--overwrite", "true")  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is where this run saves its own adapter" in errors[0], errors
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before  # still there, as it was
