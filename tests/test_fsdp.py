"""`--trainer.strategy fsdp_qlora` on 2 CPU processes (gloo), through the real cli.py: the 4-bit base is sharded (the
log line), training equals one process and DDP, resume is exact, the reference cache equals one process's, every
method trains, two "nodes" launched by torchrun equal one machine. Runs are shared between tests (module fixtures)
and launched side by side."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from alignment.errors import ConfigError
from alignment.run.fsdp import EvenBatches, decoder_layers
from alignment.usage import main

ROOT = Path(__file__).resolve().parents[1]
STEPS = "9"
# demo_dpo.yaml (157 training pairs): 9 steps of global batch 8 stay in the first epoch's full batches; dropout off,
# since each process draws its own masks. They read 72 pairs, under half: the reference pass computes those alone
# (`pairs_read_by_steps`), and the validation rows are computed at the one validation, after step 9, with trained
# adapters in the model, and written to the cache
COMMON = ["--config", "demo_dpo.yaml", "--trainer.accelerator", "cpu", "--trainer.max_steps", STEPS,
          "--trainer.val_check_interval", STEPS, "--trainer.num_sanity_val_steps", "0", "--model.lora_dropout", "0",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]  # fmt: skip
TWO = ["--trainer.devices", "2", "--data.batch_size", "4"]
RESIDENT = re.compile(r"rank (\d+): base weights ([\d.]+) MiB of ([\d.]+) MiB resident \(sharded over (\d+)\)")


class FirstStep(L.Callback):
    """Writes this process's first training loss and its LoRA gradients (after they are averaged across processes,
    before the optimizer step) to `out`/rank<R>.pt."""

    def __init__(self, out: str):
        self.out, self.record = Path(out), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.record["loss"] = outputs["loss"].detach().clone()
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.record["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                    if p.requires_grad}  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def launch(run: Path, *args: str, torchrun: list[str] | None = None, log: str | None = None) -> subprocess.Popen:
    """`cli.py fit` in the background, its output in `run`.log (or `log`)."""
    prefix = [sys.executable, "-m", "torch.distributed.run", *torchrun] if torchrun else [sys.executable]
    command = [*prefix, str(ROOT / "cli.py"), "fit", "--trainer.default_root_dir", str(run), *args]
    path = run.parent / (log or f"{run.name}.log")
    with path.open("w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env())
    process.log = path
    return process


def wait(*processes: subprocess.Popen) -> None:
    for process in processes:
        process.wait(timeout=900)
    for process in processes:
        assert process.returncode == 0, process.log.read_text()[-3000:]


def output(run: Path, log: str | None = None) -> str:
    return (run.parent / (log or f"{run.name}.log")).read_text()


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def cache_tables(directory: Path) -> dict[str, torch.Tensor]:
    (entry,) = directory.glob("*.pt")
    return torch.load(entry, weights_only=True)["tables"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """DPO on the demo pairs, 9 steps, the same global batch of 8: one process; FSDP and DDP on two processes."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    first = ["--trainer.callbacks+=tests.test_fsdp.FirstStep"]
    started = [
        launch(root / "one", *COMMON, "--data.batch_size", "8", "--model.reference_cache_dir", str(root / "cache-one"),
               *first, f"--trainer.callbacks.out={root / 'first-one'}"),
        launch(root / "fsdp", *COMMON, *TWO, "--trainer.strategy", "fsdp_qlora",
               "--model.reference_cache_dir", str(root / "cache-fsdp"), *first,
               f"--trainer.callbacks.out={root / 'first-fsdp'}"),
        launch(root / "ddp", *COMMON, *TWO, "--trainer.strategy", "ddp",
               "--model.reference_cache_dir", str(root / "cache-ddp")),
    ]  # fmt: skip
    wait(*started)
    return root


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_each_rank_holds_about_half_of_the_base(runs):
    lines = {int(m[0]): m for m in RESIDENT.findall(output(runs / "fsdp"))}
    assert sorted(lines) == [0, 1]
    for _, resident, total, over in lines.values():
        assert over == "2" and float(resident) <= 0.6 * float(total), (resident, total)
    assert not RESIDENT.search(output(runs / "ddp"))  # the line is fsdp_qlora's


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_first_step_loss_and_lora_gradients_equal_one_process(runs):
    one = torch.load(runs / "first-one" / "rank0.pt", weights_only=True)
    ranks = [torch.load(runs / "first-fsdp" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    # each process's loss is the mean over its 4 pairs: their mean is the mean over the global 8
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, one["loss"], rtol=1e-6, atol=1e-6)
    assert one["grads"].keys() == ranks[0]["grads"].keys() and len(one["grads"]) > 0
    moved = 0
    for name, grad in one["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][name], ranks[1]["grads"][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
        moved += bool(grad.abs().sum() > 0)
    assert moved >= len(one["grads"]) // 2  # the LoRA B matrices (A's gradients are 0 at step 0, B being 0)


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_adapter_after_nine_steps_is_within_tolerance_of_one_process_and_of_ddp(runs):
    one, fsdp, ddp = adapter(runs / "one"), adapter(runs / "fsdp"), adapter(runs / "ddp")
    assert one.keys() == fsdp.keys() == ddp.keys() and one
    for name, value in one.items():
        assert not value.is_meta and fsdp[name].shape == value.shape  # whole tensors, not shards
        # the same sums in another grouping (4 + 4 pairs): float rounding, compounded over 9 Adam steps
        torch.testing.assert_close(fsdp[name], value, rtol=1e-3, atol=1e-5, msg=name)
        # DDP on the same processes and per-process batches: the same arithmetic but for the layers' all-gather
        torch.testing.assert_close(fsdp[name], ddp[name], rtol=0, atol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_reference_cache_is_the_reference_and_equals_one_process(runs):
    # the pass before the first step wrote the 72 training rows alone; the validation rows came after step 9
    assert "reference log-probs: 72 of 175 rows written" in output(runs / "fsdp")
    one, fsdp = cache_tables(runs / "cache-one"), cache_tables(runs / "cache-fsdp")
    assert one.keys() == fsdp.keys()
    for split in one:
        both = ~torch.isnan(one[split]).any(1) & ~torch.isnan(fsdp[split]).any(1)
        assert both.sum() >= 72 if split == "train" else both.all()
        torch.testing.assert_close(fsdp[split][both], one[split][both], rtol=1e-5, atol=1e-4)
    # the validation rows were computed after 9 steps, adapters trained: equal to one process's, they are the
    # reference's (adapters off), not the policy's. And at step 0 (LoRA B = 0) the policy is the reference: the
    # first DPO loss is ln 2
    first = torch.load(runs / "first-fsdp" / "rank0.pt", weights_only=True)
    torch.testing.assert_close(first["loss"], torch.tensor(0.6931471805599453), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_adapter_is_a_peft_adapter_that_merge_takes(runs, tmp_path):
    main(["merge", str(runs / "fsdp"), "--out", str(tmp_path / "merged"), "--dtype", "float32"])
    assert (tmp_path / "merged" / "config.json").is_file()
    config = json.loads((runs / "fsdp" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_resume_after_sigterm_is_bit_exact(runs):
    run = runs / "stopped"
    common = [*COMMON, *TWO, "--trainer.strategy", "fsdp_qlora",
              "--model.reference_cache_dir", str(runs / "cache-fsdp")]  # fmt: skip
    wait(launch(run, *common, "--trainer.callbacks+=tests.helpers.SignalAtStep", "--trainer.callbacks.step=5",
                "--trainer.callbacks.rank=1"))  # fmt: skip
    assert "stopped at step 5" in output(run)  # rank 1 was signalled; rank 0 saved
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    wait(launch(run, "--config", str(run / "config.yaml"), "--ckpt_path", "last"))
    resumed, whole = adapter(run), adapter(runs / "fsdp")
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


@pytest.mark.slow
@pytest.mark.xdist_group("fsdp")
def test_two_nodes_launched_by_torchrun_equal_one_machine(runs):
    port, run = free_port(), runs / "nodes"
    args = [*COMMON, *TWO[2:], "--trainer.devices", "1", "--trainer.num_nodes", "2", "--trainer.strategy",
            "fsdp_qlora", "--model.reference_cache_dir", str(runs / "cache-nodes")]  # fmt: skip
    nodes = []
    for rank in (0, 1):  # one run directory, as on a shared file system; one log per "node"
        torchrun = ["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1", "--rdzv-backend", "static",
                    "--rdzv-endpoint", f"127.0.0.1:{port}"]  # fmt: skip
        nodes.append(launch(run, *args, torchrun=torchrun, log=f"node{rank}.log"))
    wait(*nodes)
    lines = [RESIDENT.findall(output(run, f"node{rank}.log")) for rank in (0, 1)]
    assert [[int(m[0]) for m in found] for found in lines] == [[0], [1]]
    two_nodes, one_machine = adapter(run), adapter(runs / "fsdp")
    assert two_nodes.keys() == one_machine.keys()
    assert all(torch.equal(two_nodes[k], one_machine[k]) for k in one_machine)


@pytest.mark.slow  # no shared fixture: these spread over the workers while one builds the runs above
@pytest.mark.parametrize("config", ["demo.yaml", "demo_kto.yaml", "demo_sft.yaml"])
def test_every_method_trains_three_steps(config, tmp_path):
    # DPO is the runs above; demo.yaml (ORPO) stands for the pair methods without a reference, SimPO and CPO, which
    # differ from it in their loss alone (test_method_mix.py trains each of them)
    run = tmp_path / "run"
    cache = ["--model.reference_cache_dir", str(tmp_path / "cache")] if config == "demo_kto.yaml" else []
    args = ["--config", config, "--trainer.accelerator", "cpu", *TWO, "--trainer.strategy", "fsdp_qlora",
            "--trainer.max_steps", "3", "--data.limit", "40", "--trainer.enable_progress_bar", "false",
            *cache]  # fmt: skip
    wait(launch(run, *args))
    assert len(RESIDENT.findall(output(run))) == 2
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert all(v.abs().sum() > 0 for k, v in adapter(run).items() if "lora_B" in k)  # B starts at 0: it moved


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trainer.strategy", "fsdp", "--trainer.devices", "2"], "use --trainer.strategy fsdp_qlora"),
        (["--trainer.strategy", "fsdp_qlora"], "give --trainer.devices 2 or more"),
        (
            ["--trainer.strategy", "fsdp_qlora", "--trainer.devices", "2", "--trainer.precision", "bf16-true"],
            "--trainer.precision bf16-true with --trainer.strategy fsdp_qlora",
        ),
    ],
    # fmt: skip
    ids=["fsdp-on-cpu", "one-device", "true-half-precision"],
)
def test_a_strategy_that_cannot_work_is_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", "demo.yaml", "--trainer.accelerator", "cpu", "--trainer.default_root_dir",
              str(tmp_path / "run"), *args])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_base_without_known_layers_is_refused():
    class Flat(torch.nn.Module):
        _no_split_modules = None

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="cannot find the layers of Flat"):
        decoder_layers(Flat())


@pytest.mark.parametrize(("n", "batch", "world"), [(5, 2, 2), (17, 8, 2), (3, 1, 2), (9, 4, 3), (2, 8, 2)])
def test_even_batches_give_each_item_once_in_equal_rounds(n, batch, world):
    shards = [EvenBatches(n, batch, num_replicas=world, rank=r) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every process the same number of forwards
    items = sorted(i for s in shards for b in s for i in b)
    assert items == list(range(n)) and all(b for s in shards for b in s)
    assert max(len(b) for s in shards for b in s) <= batch + 1
