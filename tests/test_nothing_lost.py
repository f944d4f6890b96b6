"""Nothing a user made is lost, whatever happens: a diverging loss, a merge onto the base or into a run, a merge
that overflows, damaged files, a resume with another seed, the debris of a kill during a save. Through the real
`cli.py` where the case is the CLI's."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from alignment.errors import TrainingDiverged
from alignment.hub import resolve_base
from alignment.run.callbacks import StopOnDivergence
from alignment.usage import main
from tests.helpers import write_jsonl

# every case runs the CLI on a trained run or trains one (10 to 40 s each on 2 cores): the whole suite runs them
pytestmark = pytest.mark.slow

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


# ---- a finished run, and what the after-training commands may do with it -----------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished DPO run of 2 steps on the tiny model (config.yaml, checkpoints/, adapter/). Tests that change it
    work on a copy."""
    run = tmp_path_factory.mktemp("finished") / "run"
    main(["fit", *TINY, "--trainer.default_root_dir", str(run), "--trainer.max_steps", "2"])
    return run


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("fit.lock"))
    return to


def main_line(capsys, *args: str) -> str:
    """`cli.py ARGS` in this process (the same entry point): the one error line and exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != "fit.lock"}  # fmt: skip


# ---- 2. merge --out: never the base, a run, or a model without --overwrite ----------------------------------------


def test_merge_refuses_the_runs_own_base_even_with_overwrite(finished, capsys):
    """Before: `merge RUN --out <base>` wrote the merged model over the base the run trained on, exit 0."""
    base = Path(resolve_base("tiny"))
    before = digest(base)
    line = error_line(cli("merge", str(finished), "--out", str(base), "--overwrite", "true"))
    assert line.startswith(f"error: --out {base} is the base of the merge ({base}): writing there would destroy it")
    line = main_line(capsys, "merge", str(finished), "--out", str(base / "merged"))
    assert line.startswith(f"error: --out {base / 'merged'} is inside the base of the merge"), line
    assert digest(base) == before and not (base / "merged").exists()


def test_merge_refuses_a_run_or_inside_one_and_a_model_without_overwrite(finished, tmp_path, capsys):
    before = digest(finished)
    for out in (finished, finished / "merged", finished.parent):
        line = main_line(capsys, "merge", str(finished), "--out", str(out), "--overwrite", "true")
        assert f"--out {out}" in line and ("run directory" in line or "holds the run" in line), line
    assert digest(finished) == before and not (finished / "merged").exists()

    model = tmp_path / "model"
    main(["merge", str(finished), "--out", str(model), "--dtype", "float32"])
    first = digest(model)
    line = main_line(capsys, "merge", str(finished), "--out", str(model), "--dtype", "bfloat16")
    assert line == f"error: --out {model} already holds a model: add --overwrite true to replace it, or choose " \
                   "another directory"  # fmt: skip
    assert digest(model) == first
    main(["merge", str(finished), "--out", str(model), "--dtype", "bfloat16", "--overwrite", "true"])
    assert AutoModelForCausalLM.from_pretrained(model).dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging directory left beside it


# ---- 8. merge --dtype float16 that overflows -----------------------------------------------------------------------


def test_a_merge_that_overflows_float16_is_refused_and_writes_nothing(finished, tmp_path, capsys):
    """An adapter whose update reaches past float16's 65504. Before: written with inf tensors, exit 0."""
    run = copy_run(finished, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1e8 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    out = tmp_path / "merged"
    line = main_line(capsys, "merge", str(run), "--out", str(out), "--dtype", "float16")
    overflow = r"error: --dtype float16: (\d+) of (\d+) merged tensors overflow it \(inf or NaN, first: \S+\); "
    found = re.fullmatch(overflow + r"nothing was written\. Merge with --dtype bfloat16 .* or --dtype float32", line)
    assert found, line
    assert 0 < int(found[1]) <= int(found[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    main(["merge", str(run), "--out", str(out), "--dtype", "bfloat16"])  # float32's range: the same update fits
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all_finite(merged.state_dict().values())


def test_a_merge_of_an_adapter_holding_nan_is_refused(finished, tmp_path, capsys):
    """An adapter saved by a run that diverged before fit stopped at it. Before: merged into a NaN model, exit 0."""
    run = copy_run(finished, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    save_file({k: v * float("nan") if k == first else v for k, v in tensors.items()}, weights)
    line = main_line(capsys, "merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "float32")
    assert line.startswith(f"error: the adapter {run / 'adapter'} holds 1 of {len(tensors)} tensors that are not "
                           "finite"), line  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ---- 9. damaged files: one line naming the file ---------------------------------------------------------------------


def cut_short(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_validate_on_a_cut_short_last_checkpoint_names_it(finished, tmp_path, capsys):
    """Before: a traceback of torch's zip reader (RuntimeError/OSError)."""
    run = copy_run(finished, tmp_path / "run")
    cut_short(run / "checkpoints" / "last.ckpt")
    line = main_line(capsys, "validate", "--config", str(run / "config.yaml"), "--trainer.default_root_dir", str(run),
                     "--ckpt_path", "last", "--trainer.enable_progress_bar", "false")  # fmt: skip
    assert line.startswith(f"error: {run / 'checkpoints' / 'last.ckpt'} is damaged"), line
    assert "epoch=0-step=2.ckpt (step 2) is readable: pass it as --ckpt_path" in line


def test_a_cut_short_adapter_is_one_line_for_merge_compare_and_fit(finished, tmp_path, capsys):
    """Before: safetensors' SafetensorError with a traceback, from each of them."""
    run = copy_run(finished, tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    cut_short(weights)
    expected = f"error: {weights} is damaged (cut short: "
    assert main_line(capsys, "merge", str(run), "--out", str(tmp_path / "merged")).startswith(expected)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi"}])
    line = main_line(capsys, "compare", "--prompts", str(prompts), "--adapter", f"a={run}", "--out",
                     str(tmp_path / "compare"))  # fmt: skip
    assert line.startswith(expected), line
    line = main_line(capsys, "fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "next"),
                     "--trainer.max_steps", "1", "--model.adapter", str(run / "adapter"))  # fmt: skip
    assert line.startswith(expected) and "copy the adapter again" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl", "run"]


def test_a_cut_short_base_is_one_line(tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(resolve_base("tiny"), base)
    cut_short(base / "model.safetensors")
    line = main_line(capsys, "fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "run"),
                     "--trainer.max_steps", "1", "--model.base", str(base))  # fmt: skip
    assert line.startswith(f"error: {base / 'model.safetensors'} is damaged (cut short: "), line
    assert "download the base" in line and not (tmp_path / "run").exists()


# ---- 7. the debris of a kill during a save -------------------------------------------------------------------------

KILLED_WRITER = """
import os, sys
from pathlib import Path
from alignment.files import atomic_write
from alignment.run.rundir import stage_adapter

run, which = Path(sys.argv[1]), sys.argv[2]

def killed(handle):  # kill -9 in the middle of writing: no cleanup runs
    handle.write(b"x" * 1000)
    handle.flush()
    os._exit(9)

class Policy:
    active_adapter = "default"

    def save_pretrained(self, path, **kwargs):
        (Path(path) / "adapter_model.safetensors").write_bytes(b"x" * 1000)
        os._exit(9)

class Module:
    policy = Policy()

if which == "adapter":
    stage_adapter(Module(), run / "adapter")
else:
    atomic_write(run / which, killed)
"""


def test_the_next_fit_removes_the_temp_files_of_a_save_killed_before(finished, tmp_path, capsys):
    """The run's own writers killed while writing (last.ckpt, config.yaml, metrics.csv, adapter/) leave their temp
    files; the next fit of the run removes them, and nothing else. Before: they stayed for good."""
    run = copy_run(finished, tmp_path / "run")
    for which in ("checkpoints/last.ckpt", "config.yaml", "metrics.csv", "adapter"):
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(run), which], cwd=ROOT)
        assert killed.returncode == 9
    debris = {p for p in run.rglob(".*") if p.name != "fit.lock"}
    assert len(debris) == 4, debris  # .last.ckpt.*.tmp, .config.yaml.*.tmp, .metrics.csv.*.tmp, .adapter.*/
    for path in debris:  # killed an hour ago: before this test process (which runs the next fit) began
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    kept = [run / "checkpoints" / "notes.tmp", run / ".adapter.mine", run / "checkpoints" / "x.last.ckpt.abcdefgh.tmp",
            run / ".metrics.csv.abcdefgh.tmp"]  # fmt: skip
    for path in kept:
        path.write_text("the user's")
    os.utime(kept[-1], (time.time() + 3600, time.time() + 3600))  # a temp name, but newer than the next fit
    before = digest(run)

    main(["fit", "--config", str(run / "config.yaml"), "--trainer.default_root_dir", str(run), "--ckpt_path", "last"])
    assert "nothing to resume" in capsys.readouterr().err
    assert not any(p.exists() for p in debris)
    assert all(p.read_text() == "the user's" for p in kept)
    gone = tuple(str(p.relative_to(run)) for p in debris)
    assert digest(run) == {k: v for k, v in before.items() if not k.startswith(gone)}  # all else as it was


# ---- 5. a resume keeps the run's record true ----------------------------------------------------------------------


def test_a_resume_with_another_seed_keeps_the_runs_seed_in_its_config(tmp_path, caplog):
    """Stopped at step 2 of 4 (SIGTERM), resumed with --seed_everything 7: it trains on as seed 42 did (its random
    state is the checkpoint's), says so, and config.yaml keeps 42. Before: config.yaml said 7, silently."""
    run = tmp_path / "run"
    result = cli("fit", *TINY, "--trainer.default_root_dir", str(run), "--trainer.max_steps", "4",
                 "--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=2")  # fmt: skip
    assert result.returncode == 0 and "stopped at step 2 (SIGTERM)" in result.stderr, result.stderr[-3000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == 42

    main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--seed_everything", "7"])
    assert step_of(run / "checkpoints" / "last.ckpt") == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == 42
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["run"]["seed"] == 42
    assert "--seed_everything 7: the run was started with seed 42" in caplog.text
    assert "its config.yaml keeps 42" in caplog.text


def test_a_merge_removes_the_staging_directories_of_a_merge_killed_before(finished, tmp_path):
    """A merge writes beside --out and renames; a kill leaves `.NAME.merging-PID-*` (or `.NAME.old-PID`), which the
    next merge into NAME removes once that process is gone, and not while it lives."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    debris = [tmp_path / f".merged.merging-{gone.pid}-abcdefgh", tmp_path / f".merged.old-{gone.pid}"]
    alive = [tmp_path / f".merged.merging-{os.getpid()}-abcdefgh", tmp_path / f".other.merging-{gone.pid}-abcdefgh"]
    for directory in debris + alive:
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"x" * 100)
    main(["merge", str(finished), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert not any(d.exists() for d in debris) and all(d.exists() for d in alive)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None


# ---- 11. labels: the counts and messages name them truthfully -----------------------------------------------------


def test_kto_with_only_desirable_rows_says_so(tmp_path, caplog):
    """Before: 'KTO: 12 desirable and 1 undesirable training examples' (a count floored at 1) and advice on weights
    that have nothing to balance."""
    from tests.test_kto import fit_kto

    rows = [{"prompt": f"sort: {i}", "completion": "abc", "label": True} for i in range(16)]
    with caplog.at_level(logging.WARNING):
        fit_kto(tmp_path, write_jsonl(tmp_path / "rows.jsonl", rows), max_steps=1, reference_cache=False)
    assert "KTO: all 12 training examples are labelled desirable (label true), none undesirable" in caplog.text
    assert "1 undesirable" not in caplog.text and "not both" not in caplog.text


def test_sft_on_rows_all_labelled_false_names_the_labels(tmp_path):
    """4 rows, 1 held out for validation. Before: 'error: train: no row fits in max_length=192 (max_prompt_length=64)',
    about lengths, not labels."""
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [{"prompt": f"q{i}", "completion": "a", "label": False} for i in range(4)])
    line = error_line(cli("fit", "--config", "demo_sft.yaml", "--data.path", str(rows),
                          "--trainer.default_root_dir", str(tmp_path / "run")))  # fmt: skip
    assert line == (
        f"error: {rows}: all 3 rows of the train split have field 'label' false (undesirable), and SFT trains on "
        "desirable answers only: nothing to train on; train them with KTO (--model alignment.KTO), or set their "
        "label to true"
    ), line
    assert not (tmp_path / "run").exists()


# ---- 3. a changed base: the run records its base's weights, and a resume on other weights is refused --------------


def test_a_resume_on_a_base_whose_weights_changed_is_refused(tmp_path):
    """Stopped at step 2 of 4 (SIGTERM) on a base directory whose weights are then replaced. Before: the resume went
    on, exit 0, training the adapter on weights it was not learnt for."""
    base, run = tmp_path / "base", tmp_path / "run"
    shutil.copytree(resolve_base("tiny"), base)
    result = cli("fit", *TINY, "--model.base", str(base), "--trainer.default_root_dir", str(run),
                 "--trainer.max_steps", "4", "--trainer.callbacks+=tests.helpers.SignalAtStep",
                 "--trainer.callbacks.step=2")  # fmt: skip
    assert result.returncode == 0 and "stopped at step 2 (SIGTERM)" in result.stderr, result.stderr[-3000:]
    record = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["run"]["model"]["base_weights"]
    assert record.startswith("sha256:")

    weights = load_file(base / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    before = digest(run)
    line = error_line(cli("fit", "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    assert line.startswith(
        f"error: cannot resume from {run / 'checkpoints' / 'last.ckpt'}: --model.base {base} holds other weights than "
        f"the run was trained on ({record[:23]}... in the checkpoint, sha256:"
    ), line
    assert line.endswith("resume on the run's own base, or start a new run on this one in another "
                         "--trainer.default_root_dir"), line  # fmt: skip
    assert digest(run) == before


# ---- 4. a copied or moved run: its config.yaml does not reach back into the run it came from ----------------------


def test_overwrite_from_a_copied_runs_config_never_clears_the_original(finished, tmp_path, capsys, caplog):
    """`cp -r run copy && fit --config copy/config.yaml --overwrite true`: config.yaml pins the original's absolute
    default_root_dir. Before: the ORIGINAL run was cleared and trained over, the copy untouched."""
    original = digest(finished)
    copy = copy_run(finished, tmp_path / "copy")
    copied = digest(copy)
    line = error_line(cli("fit", "--config", str(copy / "config.yaml"), "--overwrite", "true"))
    assert line == (
        f"error: {copy / 'config.yaml'} sits in {copy} but pins --trainer.default_root_dir {finished} (which "
        f"--overwrite true would clear): name the run directory on the command line, --trainer.default_root_dir "
        f"{copy} for the run where the config sits, or {finished}"
    ), line
    line = main_line(capsys, "fit", "--config", str(copy / "config.yaml"), "--ckpt_path", "last")
    assert f"pins --trainer.default_root_dir {finished} (the run --ckpt_path would continue)" in line, line
    assert digest(finished) == original and digest(copy) == copied

    with caplog.at_level(logging.WARNING):  # named on the command line: the copy is started over, and says so
        main(["fit", "--config", str(copy / "config.yaml"), "--overwrite", "true", "--trainer.default_root_dir",
              str(copy)])  # fmt: skip
    assert f"--overwrite true: the run in {copy} is cleared once training starts" in caplog.text
    assert digest(finished) == original and digest(copy) != copied
    assert yaml.safe_load((copy / "config.yaml").read_text())["trainer"]["default_root_dir"] == str(copy)


def test_a_moved_run_resumed_from_its_config_is_told_where_it_is(finished, tmp_path, capsys):
    """A run trained in OLD, moved to MOVED: `fit --config MOVED/config.yaml --ckpt_path last`. Before: 'OLD/
    checkpoints/last.ckpt does not exist, there is no run to continue in OLD; leave out --ckpt_path to start one'."""
    old, moved = tmp_path / "old", copy_run(finished, tmp_path / "moved")
    config = yaml.safe_load((moved / "config.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(old)
    (moved / "config.yaml").write_text(yaml.safe_dump(config))
    line = main_line(capsys, "fit", "--config", str(moved / "config.yaml"), "--ckpt_path", "last")
    assert line == (
        f"error: {moved / 'config.yaml'} sits in {moved} but pins --trainer.default_root_dir {old} (which does not "
        f"exist: moved?): name the run directory on the command line, --trainer.default_root_dir {moved} for the "
        f"run where the config sits, or {old}"
    ), line
    assert not old.exists()
    main(["fit", "--config", str(moved / "config.yaml"), "--ckpt_path", "last", "--trainer.default_root_dir",
          str(moved)])  # fmt: skip
    assert f"nothing to resume: {moved} finished at step 2" in capsys.readouterr().err


# ---- 6. sweeps: a pre-empted fit is not "finished", and a signal to the sweep reaches its fit ---------------------

SWEEP = ["sweep", "--config", "demo_dpo.yaml", "--grid", "model.beta=0.1", "--data.limit", "16"]


def sweep_status(out: Path) -> str:
    return json.loads((out / "beta-0.1" / "sweep.json").read_text())["status"]


def test_a_sweep_run_preempted_by_sigterm_is_marked_and_continued_on_rerun(tmp_path):
    """The fit gets SIGTERM after step 2 of 4 (it saves and exits 0). Before: recorded "finished" in sweep.json and
    sweep.md, and skipped by every rerun."""
    out = tmp_path / "sweep"
    args = [*SWEEP, "--out", str(out), "--trainer.max_steps", "4", "--trainer.callbacks+=tests.helpers.SignalAtStep",
            "--trainer.callbacks.step=2"]  # fmt: skip
    result = cli(*args)
    assert result.returncode == 1 and "were interrupted ['beta-0.1']" in result.stderr, result.stderr[-3000:]
    assert sweep_status(out) == "interrupted at step 2 of 4"
    assert "| interrupted at step 2 of 4 |" in (out / "sweep.md").read_text()

    result = cli(*args)  # resumed from its last.ckpt (the signal came at step 2, not again)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sweep_status(out) == "finished" and step_of(out / "beta-0.1" / "checkpoints" / "last.ckpt") == 4
    assert "Restoring states from the checkpoint path" in (out / "beta-0.1" / "fit.log").read_text()


def test_sigterm_to_the_sweep_reaches_its_fit(tmp_path):
    """Before: the sweep died at once and its fit trained on as an orphan, its run still marked "running"."""
    out = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "cli.py"), *SWEEP, "--out", str(out), "--trainer.max_steps", "400",
               "--trainer.max_epochs", "100"]  # fmt: skip
    sweep = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = out / "beta-0.1"
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    time.sleep(2)  # training, its signal handlers in place
    fit_pid = int((run / "fit.lock").read_text())
    sweep.send_signal(signal.SIGTERM)
    _, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 0 and "sweep stopped by SIGTERM" in err, err[-3000:]
    with pytest.raises(ProcessLookupError):
        os.kill(fit_pid, 0)  # no orphan
    assert re.fullmatch(r"interrupted at step \d+ of \d+", sweep_status(out)), sweep_status(out)
    assert "stopped at step" in (run / "fit.log").read_text()
