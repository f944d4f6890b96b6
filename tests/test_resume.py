"""Exact resume: a run stopped (signal) or crashed and resumed from last.ckpt ends with the same adapter, bit for
bit, as a run that never stopped; LoRA dropout on."""

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from alignment import DPO, ORPO, PreferenceDataModule
from alignment.errors import ConfigError
from alignment.methods import METHODS
from alignment.run.callbacks import RunCheckpoint
from alignment.run.resume import AtomicCheckpointIO, ExactResume
from alignment.usage import main
from tests.helpers import PAIR_METHODS, CrashAtStep, SignalAtStep, synthetic_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run(cls, pairs, root, *, max_steps, ckpt_path=None, extra_callbacks=(), every_n_train_steps=None, **kwargs):
    L.seed_everything(7)
    model = {"base": "tiny", "load_in_4bit": True, "lora_dropout": 0.1, "learning_rate": 1e-2, **kwargs}
    module = cls(reference_cache_dir=str(root / "cache"), **model) if cls is DPO else cls(**model)
    data = PreferenceDataModule(str(pairs), max_length=64, batch_size=2, val_fraction=0.2, seed=3)
    checkpoints = RunCheckpoint(
        dirpath=root / "checkpoints", save_last=True, save_top_k=1, every_n_train_steps=every_n_train_steps
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, max_steps=max_steps, accumulate_grad_batches=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()], callbacks=[checkpoints, ExactResume(), *extra_callbacks],
        num_sanity_val_steps=2,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    adapters = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return trainer, adapters


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    # 14 training pairs, 2 per batch, 2 batches per step: 4 steps an epoch, the last one on a single batch
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(18, seed=0))


def assert_same_adapters(resumed, uninterrupted):
    assert resumed.keys() == uninterrupted.keys()
    for name, value in uninterrupted.items():
        assert torch.equal(resumed[name], value), name


@pytest.mark.parametrize("cls", PAIR_METHODS)
@pytest.mark.slow
def test_signal_stops_at_the_step_and_resume_is_bit_exact(cls, pairs, tmp_path):
    _, uninterrupted = run(cls, pairs, tmp_path / "whole", max_steps=7)
    stopped, _ = run(cls, pairs, tmp_path / "split", max_steps=7, extra_callbacks=[SignalAtStep(3)])
    assert stopped.global_step == 3 and not stopped.interrupted  # a clean stop, not a crash
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    resumed, adapters = run(cls, pairs, tmp_path / "split", max_steps=7, ckpt_path=str(last))
    assert resumed.global_step == 7
    assert_same_adapters(adapters, uninterrupted)


@pytest.mark.slow
def test_crash_resumes_from_the_last_periodic_checkpoint_bit_exact(pairs, tmp_path):
    _, uninterrupted = run(ORPO, pairs, tmp_path / "whole", max_steps=7)
    with pytest.raises(RuntimeError, match="crash at step 6"):  # in the second epoch; last.ckpt from step 5
        run(ORPO, pairs, tmp_path / "split", max_steps=7, every_n_train_steps=5, extra_callbacks=[CrashAtStep(6)])
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 5
    _, adapters = run(ORPO, pairs, tmp_path / "split", max_steps=7, ckpt_path=str(last))
    assert_same_adapters(adapters, uninterrupted)


@pytest.mark.slow
def test_without_the_rng_state_dropout_would_differ(pairs, tmp_path):
    """The check above can fail: dropping the saved RNG state changes the resumed adapters."""
    _, uninterrupted = run(ORPO, pairs, tmp_path / "whole", max_steps=7)
    run(ORPO, pairs, tmp_path / "split", max_steps=7, extra_callbacks=[SignalAtStep(3)])
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["rng"] = None
    torch.save(checkpoint, last)
    _, adapters = run(ORPO, pairs, tmp_path / "split", max_steps=7, ckpt_path=str(last))
    assert any(not torch.equal(adapters[n], uninterrupted[n]) for n in adapters)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"beta": 0.5}, "model.beta: 0.1 in the checkpoint, 0.5 now"),
        ({"lora_r": 4}, "model.lora_r: 16 in the checkpoint, 4 now"),
    ],
)
def test_resume_with_another_model_or_objective_is_refused(pairs, tmp_path, change, message):
    run(ORPO, pairs, tmp_path, max_steps=2)
    with pytest.raises(ConfigError, match=message):
        run(ORPO, pairs, tmp_path, max_steps=4, ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"), **change)


def test_resume_with_another_method_or_data_is_refused(pairs, tmp_path):
    run(ORPO, pairs, tmp_path, max_steps=2)
    last = str(tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="trained with ORPO, this run is DPO"):
        run(DPO, pairs, tmp_path, max_steps=4, ckpt_path=last)
    other = write_jsonl(tmp_path / "other.jsonl", synthetic_pairs(18, seed=1))
    with pytest.raises(ConfigError, match="data.training pairs"):
        run(ORPO, other, tmp_path, max_steps=4, ckpt_path=last)


def _save_forever(path: str) -> None:
    io = AtomicCheckpointIO()
    step = 0
    while True:
        step += 1
        io.save_checkpoint({"global_step": step, "state_dict": {"w": torch.full((1 << 18,), float(step))}}, path)


def test_a_kill_during_a_save_never_leaves_last_ckpt_unreadable(tmp_path):
    import multiprocessing
    import os
    import signal
    import time

    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 0, "state_dict": {}}, path)
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        writer = multiprocessing.get_context("fork").Process(target=_save_forever, args=(str(path),))
        writer.start()
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)  # no handler, no cleanup: as a pre-empted node
        writer.join()
        checkpoint = torch.load(path, weights_only=True)
        step = checkpoint["global_step"]
        assert step == 0 or torch.equal(checkpoint["state_dict"]["w"], torch.full((1 << 18,), float(step)))


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)

    def half_then_fail(obj, handle):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temp file is gone too


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.slow
def test_a_checkpoint_resumed_as_another_method_is_refused_in_one_line(method, tmp_path):
    """Each method's checkpoint, resumed through cli.py under the next method of METHODS (the last one under the
    first): one line naming both, exit 2, nothing trained."""
    names = list(METHODS)
    other = names[(names.index(method) + 1) % len(names)]
    run_dir = tmp_path / "run"
    # the run is made in this process (what is tested is the refusal, through cli.py below)
    main(["fit", "--config", f"demo_{method.lower()}.yaml", "--trainer.default_root_dir", str(run_dir),
          "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "1", "--trainer.limit_val_batches",
          "1"])  # fmt: skip
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    result = cli_fit(f"demo_{other.lower()}.yaml", run_dir, "--ckpt_path", "last")
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert f"trained with {method}, this run is {other}" in line and "cannot resume" in line
    assert "Traceback" not in result.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def cli_fit(config: str, run_dir, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", config, "--trainer.default_root_dir",
               str(run_dir), "--trainer.enable_progress_bar", "false", *args]  # fmt: skip
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy(), timeout=600)
