"""Nothing a user made is lost, whatever happens: a diverging loss, a merge onto the base or into a run, a merge
that overflows, damaged files, a resume with another seed, the debris of a kill during a save. Through the real
`cli.py` where the case is the CLI's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from alignment.errors import TrainingDiverged
from alignment.run.callbacks import StopOnDivergence

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", "demo_dpo.yaml", "--data.limit", "16", "--trainer.enable_progress_bar", "false"]


def cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "cli.py"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a user mistake prints, exit code 2, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def step_of(checkpoint: Path) -> int:
    return int(torch.load(checkpoint, weights_only=True)["global_step"])


def all_finite(tensors) -> bool:
    return all(bool(t.isfinite().all()) for t in tensors)


# ---- 1. a diverging loss -----------------------------------------------------------------------------------------


def test_a_diverging_loss_stops_before_it_reaches_the_saved_files(tmp_path):
    """lr 1e20 after 2 warmup steps (the first at lr 0): the epoch ends at step 2 (2 batches) and saves; a later
    step's loss is NaN. Before: training ran to the end, exit 0, last.ckpt and adapter/ NaN."""
    run = tmp_path / "run"
    result = cli("fit", *TINY, "--trainer.default_root_dir", str(run), "--trainer.max_steps", "4",
                 "--model.learning_rate", "1e20", "--model.warmup_steps", "2")  # fmt: skip
    line = error_line(result)
    found = re.search(r"training diverged at step (\d+): the loss is nan; last\.ckpt and adapter/ stay at step (\d+)",
                      line)  # fmt: skip
    assert found, line
    assert "--model.learning_rate (now 1e+20)" in line and "--overwrite true" in line
    failed, kept = int(found[1]), int(found[2])
    assert kept == step_of(run / "checkpoints" / "last.ckpt") < failed
    assert all_finite(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"].values())
    assert all_finite(load_file(run / "adapter" / "adapter_model.safetensors").values())
    assert all(step_of(ckpt) <= kept for ckpt in (run / "checkpoints").glob("*.ckpt"))


class _SqrtAtZero(L.LightningModule):
    """loss = sum(sqrt(w)) at w = 0: a finite loss (0) whose gradient is inf."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        return torch.sqrt(self.weight).sum() + 0 * batch.sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_gradient_that_is_not_finite_stops_before_the_optimizer_step():
    module = _SqrtAtZero()
    trainer = L.Trainer(max_steps=3, callbacks=[StopOnDivergence()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"at step 1: the gradient of 1 adapter tensors is not finite \(first: "
                       r"weight\); nothing was saved"):  # fmt: skip
        trainer.fit(module)
    assert torch.equal(module.weight.detach(), torch.zeros(3))  # the step was not taken
