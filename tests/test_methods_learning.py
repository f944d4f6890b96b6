"""SimPO, CPO and DPO's other loss types learn the small preference task of test_learning; bco_pair and SimPO
resume bit-exactly."""

import lightning as L
import pytest
import torch
import yaml

from alignment import DPO, PreferenceDataModule
from alignment.usage import main
from tests.helpers import SignalAtStep, synthetic_pairs, write_jsonl
from tests.test_cli import run_cli
from tests.test_ddp import fit_cli
from tests.test_resume import assert_same_adapters, run

LEARNERS = [  # (method, its knobs): DPO's other loss types (every pair method learns in tests/test_learning.py)
    (DPO, {"loss_type": "bco_pair"}),
    (DPO, {"loss_type": "apo_zero"}),
    (DPO, {"loss_type": "sigmoid", "rpo_alpha": 1.0}),
]


@pytest.mark.parametrize(("cls", "knobs"), LEARNERS, ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
@pytest.mark.slow
def test_held_out_reward_accuracy_rises(tmp_path, cls, knobs):
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(128, seed=0))
    held_out = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(64, seed=1))
    data = PreferenceDataModule(str(train), val_path=str(held_out), max_length=64, batch_size=8)
    L.seed_everything(0)
    if cls is DPO:
        knobs = {"reference_cache_dir": str(tmp_path / "cache"), **knobs}
    module = cls(
        base="tiny", load_in_4bit=True, lora_r=8, lora_alpha=16, learning_rate=5e-3, lr_scheduler="constant", **knobs
    )
    trainer = L.Trainer(
        max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0
    )
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = {k: v.item() for k, v in trainer.callback_metrics.items()}

    assert {f"val/{name}" for name in module.metric_names} <= after.keys()  # nll_loss too, for all but plain DPO
    assert before["val/rewards/accuracies"] < 0.7  # the random model cannot tell the answers apart
    assert after["val/rewards/accuracies"] >= 0.9
    assert after["val/rewards/margins"] > before["val/rewards/margins"] + 0.01
    assert after["val/loss"] < before["val/loss"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", synthetic_pairs(18, seed=0))


@pytest.mark.parametrize(("cls", "knobs"), [(DPO, {"loss_type": "bco_pair"})], ids=["bco_pair"])  # others: test_resume
@pytest.mark.slow
def test_signal_and_resume_is_bit_exact(cls, knobs, pairs, tmp_path):
    _, uninterrupted = run(cls, pairs, tmp_path / "whole", max_steps=7, **knobs)
    stopped, _ = run(cls, pairs, tmp_path / "split", max_steps=7, extra_callbacks=[SignalAtStep(3)], **knobs)
    assert stopped.global_step == 3
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    resumed, adapters = run(cls, pairs, tmp_path / "split", max_steps=7, ckpt_path=str(last), **knobs)
    assert resumed.global_step == 7
    assert_same_adapters(adapters, uninterrupted)


@pytest.mark.slow
def test_bco_pair_checkpoint_holds_the_reward_mean_and_resume_needs_it(pairs, tmp_path):
    _, uninterrupted = run(DPO, pairs, tmp_path / "whole", max_steps=7, loss_type="bco_pair")
    run(DPO, pairs, tmp_path / "split", max_steps=7, extra_callbacks=[SignalAtStep(3)], loss_type="bco_pair")
    last = tmp_path / "split" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    # 3 steps of 2 batches of 2 pairs: 12 chosen and 12 rejected training rewards; validation adds none
    assert checkpoint["reward_mean"]["count"] == 24
    assert checkpoint["reward_mean"]["mean"] != 0.0
    del checkpoint["reward_mean"]  # as a checkpoint without it: the resumed run starts the mean over
    torch.save(checkpoint, last)
    _, adapters = run(DPO, pairs, tmp_path / "split", max_steps=7, ckpt_path=str(last), loss_type="bco_pair")
    assert any(not torch.equal(adapters[n], uninterrupted[n]) for n in adapters)


@pytest.mark.slow
def test_bco_pair_reward_mean_under_two_processes_equals_one_process_of_twice_the_batch(tmp_path):
    # each process adds every process's rewards (gathered): the mean is the same as one process's over batch 2b
    common = ["--config", "demo_dpo.yaml", "--model.loss_type", "bco_pair", "--trainer.max_steps", "4",
              "--trainer.limit_val_batches", "0", "--model.lora_dropout", "0.0",
              "--model.reference_cache_dir", str(tmp_path / "cache")]  # fmt: skip
    fit_cli(tmp_path / "one", *common, "--data.batch_size", "8")
    fit_cli(tmp_path / "two", *common, "--data.batch_size", "4", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    one, two = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["reward_mean"]
        for run in ("one", "two")
    )
    assert one["count"] == two["count"] == 4 * 8 * 2  # 4 steps of 8 pairs, a chosen and a rejected reward each
    assert two["mean"] == pytest.approx(one["mean"], rel=1e-4, abs=1e-7)
    assert one["mean"] != 0.0


@pytest.mark.parametrize("method", ["SimPO", "CPO"])
def test_method_is_selected_by_flag(method, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "demo.yaml", "--model", f"alignment.{method}", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"] == f"alignment.{method}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.loss_type", "exo_pair"], "--model.loss_type exo_pair needs --model.label_smoothing > 0"),
        (["--model", "alignment.SimPO", "--model.cpo_alpha", "-0.5"], "--model.cpo_alpha must be >= 0, got -0.5"),
    ],
)
@pytest.mark.slow
def test_a_bad_knob_is_one_line_and_exit_2(args, message, tmp_path):
    result = run_cli("fit", "--config", "demo_dpo.yaml", "--trainer.default_root_dir", str(tmp_path), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
