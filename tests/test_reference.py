"""The reference log-prob cache: equal to the live reference, reused, never trusted when broken."""

import logging
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel

from alignment import DPO, PreferenceDataModule
from alignment.methods.reference import ReferenceScorer
from alignment.methods.reference_cache import ReferenceCache, _checksum, fingerprint, pairs_read_by_steps
from tests.helpers import synthetic_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(12, seed=0))


@pytest.fixture
def reference_forwards(monkeypatch):
    """Counts every forward with adapters disabled: the reference pass and the live reference alike."""
    calls = []
    original = PeftModel.disable_adapter

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(PeftModel, "disable_adapter", counting)
    return calls


def fit(path, cache_dir, *, steps=3, data_kwargs=None, **model_kwargs):
    torch.manual_seed(0)
    model_kwargs = {"load_in_4bit": False, "learning_rate": 1e-2, **model_kwargs}
    module = DPO(base="tiny", reference_cache_dir=str(cache_dir), **model_kwargs)
    data_kwargs = {"max_length": 64, "batch_size": 2, "val_fraction": 0.25, **(data_kwargs or {})}
    data = PreferenceDataModule(str(path), **data_kwargs)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        num_sanity_val_steps=0, val_check_interval=steps, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, data)
    return module, data


def entries(cache_dir):
    return sorted((cache_dir).glob("*.pt"))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])  # sums, and per-token means
def test_cached_reference_gives_the_live_losses_and_gradients(pairs_file, tmp_path, loss_type):
    module, data = fit(pairs_file, tmp_path / "cache", loss_type=loss_type)  # the policy has moved off the base
    module.on_fit_start()  # loads the entry the fit wrote
    assert set(module.reference.tables) == {"train", "validation"}
    batch = next(iter(data.train_dataloader()))
    results = []
    for cached in (True, False):
        tables = module.reference.tables
        module.reference.tables = tables if cached else {}
        module.zero_grad()
        loss, metrics = module.compute_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((loss.detach(), metrics, grads))
        module.reference.tables = tables
    (cached_loss, cached_metrics, cached_grads), (live_loss, live_metrics, live_grads) = results
    assert cached_metrics["rewards/margins"].abs().max() > 1e-3  # rewards are not trivially zero
    # fp32 on CPU: the pass batches pairs by length, training batches them at random; padding changes the sums'
    # rounding only
    torch.testing.assert_close(cached_loss, live_loss, rtol=1e-5, atol=1e-6)
    for name in cached_metrics:
        torch.testing.assert_close(cached_metrics[name], live_metrics[name], rtol=1e-5, atol=1e-5, msg=name)
    for name in cached_grads:
        torch.testing.assert_close(cached_grads[name], live_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_second_run_does_no_reference_forward(pairs_file, tmp_path, reference_forwards, caplog):
    caplog.set_level(logging.INFO, logger="alignment")
    fit(pairs_file, tmp_path / "cache")
    first = len(reference_forwards)
    assert first == 5 + 2  # one pass: 9 train pairs and 3 validation pairs, 2 per batch; none in the steps
    assert "computing them" in caplog.text and len(entries(tmp_path / "cache")) == 1
    reference_forwards.clear()
    caplog.clear()
    # a beta sweep, another loss and more steps reuse the entry
    fit(pairs_file, tmp_path / "cache", steps=5, beta=0.5, loss_type="ipo")
    assert reference_forwards == []
    assert "loaded from" in caplog.text


def test_cache_off_runs_the_reference_every_step(pairs_file, tmp_path, reference_forwards):
    fit(pairs_file, tmp_path / "cache", reference_cache=False)
    assert len(reference_forwards) == 3 + 2  # 3 steps, then 2 validation batches
    assert entries(tmp_path / "cache") == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_broken_entry_is_recomputed(pairs_file, tmp_path, reference_forwards, caplog, damage):
    fit(pairs_file, tmp_path / "cache")
    (entry,) = entries(tmp_path / "cache")
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # still a valid file: only the checksum tells
        tables = torch.load(entry, weights_only=True)
        tables["tables"]["train"][0, 0] += 1.0
        torch.save(tables, entry)
    else:
        entry.write_bytes(b"not a torch file")
    reference_forwards.clear()
    caplog.set_level(logging.WARNING, logger="alignment")
    fit(pairs_file, tmp_path / "cache")
    assert len(reference_forwards) == 7
    assert "computing them afresh" in caplog.text
    assert ReferenceCache(tmp_path / "cache").load(entry.stem, {"train": 9, "validation": 3}) is not None


@pytest.mark.parametrize(
    "change",
    [
        {"data_kwargs": {"max_length": 24}},  # truncation
        {"data_kwargs": {"max_prompt_length": 8}},
        {"data_kwargs": {"use_chat_template": False}},  # template
        {"load_in_4bit": True},  # quantization
        {"compute_dtype": "bfloat16"},
    ],
    ids=["max_length", "max_prompt_length", "chat_template", "4bit", "dtype"],
)
@pytest.mark.slow
def test_fingerprint_change_computes_afresh(pairs_file, tmp_path, reference_forwards, change):
    fit(pairs_file, tmp_path / "cache")
    reference_forwards.clear()
    fit(pairs_file, tmp_path / "cache", **change)
    assert len(reference_forwards) > 0
    assert len(entries(tmp_path / "cache")) == 2


def test_other_data_computes_afresh(pairs_file, tmp_path, reference_forwards):
    fit(pairs_file, tmp_path / "cache")
    other = write_jsonl(tmp_path / "other.jsonl", synthetic_pairs(12, seed=1))
    reference_forwards.clear()
    fit(other, tmp_path / "cache")
    assert len(reference_forwards) == 7 and len(entries(tmp_path / "cache")) == 2


def _write_many(directory, times):
    tables = {"train": torch.arange(4000.0).reshape(1000, 4)}
    cache = ReferenceCache(directory)
    for _ in range(times):
        cache.save("same", tables, meta={})


@pytest.mark.slow
def test_concurrent_writers_never_leave_a_broken_entry(tmp_path):
    cache = ReferenceCache(tmp_path)
    _write_many(tmp_path, 1)
    # spawn, not fork: a child forked after the parent's OpenMP threads ran can hang in its first parallel torch op
    writers = [multiprocessing.get_context("spawn").Process(target=_write_many, args=(tmp_path, 40)) for _ in range(2)]
    for writer in writers:
        writer.start()
    reads = 0
    while any(w.is_alive() for w in writers) or reads < 10:
        assert cache.load("same", {"train": 1000}) is not None
        reads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["same.pt"]  # no temp file left behind


# ---- partial entries: a short run computes what its steps read; a signal keeps what was computed ---------------


def entry_masks(cache_dir):
    (entry,) = entries(cache_dir)
    return torch.load(entry, weights_only=True)["filled"]


def first_batches(data, steps):
    sampler = data.train_dataloader().batch_sampler
    sampler.set_epoch(0)
    return {i for batch in sampler.global_batches()[:steps] for i in batch}


def test_a_short_run_computes_only_the_pairs_its_steps_read(tmp_path, reference_forwards):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40, seed=0))  # 30 train, 10 validation
    _, data = fit(pairs, tmp_path / "cache", steps=2)  # validates at step 2
    masks = entry_masks(tmp_path / "cache")
    assert set(masks["train"].nonzero().flatten().tolist()) == first_batches(data, 2)  # 4 of 30
    assert masks["validation"].all()  # computed as validation read them, then written at the end
    assert len(reference_forwards) == 2 + 5  # 4 train pairs, 10 validation pairs, 2 per forward

    reference_forwards.clear()
    _, data = fit(pairs, tmp_path / "cache", steps=4)  # 4 more train pairs; the rest is in the entry
    assert len(reference_forwards) == 2
    assert set(entry_masks(tmp_path / "cache")["train"].nonzero().flatten().tolist()) == first_batches(data, 4)

    reference_forwards.clear()
    fit(pairs, tmp_path / "cache", steps=15)  # reads every pair: the remaining 22 in one pass
    assert len(reference_forwards) == 11 and entry_masks(tmp_path / "cache")["train"].all()
    fit(pairs, tmp_path / "whole", steps=15)  # one pass from nothing: the same values
    (partial,), (whole,) = entries(tmp_path / "cache"), entries(tmp_path / "whole")
    partial, whole = torch.load(partial, weights_only=True), torch.load(whole, weights_only=True)
    for split in ("train", "validation"):
        torch.testing.assert_close(partial["tables"][split], whole["tables"][split], rtol=1e-5, atol=1e-5)


def test_pairs_read_by_steps_follow_the_sampler_epochs_and_accumulation():
    order = {0: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]], 1: [[9, 8], [7, 6], [5, 4], [3, 2], [1, 0]]}

    def read(**kwargs):
        settings = {"max_epochs": None, "accumulate": 1, "batches_per_epoch": 5} | kwargs
        return pairs_read_by_steps(order.__getitem__, settings.pop("size", 40), **settings)

    assert read(max_steps=2) == [0, 1, 2, 3]
    assert read(max_steps=1, accumulate=2) == [0, 1, 2, 3]  # one step reads two batches
    assert read(max_steps=2, batches_per_epoch=1) == [0, 1, 9, 8]  # limit_train_batches=1: one batch per epoch
    assert read(max_steps=9, batches_per_epoch=1, max_epochs=2) == [0, 1, 9, 8]  # max_epochs ends it first
    # an epoch's last step takes the batches left: [0..5], [6, 7]; then [9, 8, 7, 6, 5, 4]
    assert read(max_steps=3, accumulate=3, batches_per_epoch=4) == [0, 1, 2, 3, 4, 5, 6, 7, 9, 8]
    assert read(max_steps=5, size=10) is None  # half the pairs or more: a full pass
    assert read(max_steps=-1) is None


def test_a_signal_during_the_pass_keeps_the_rows_computed_and_stops_cleanly(pairs_file, tmp_path, reference_forwards,
                                                                            monkeypatch):  # fmt: skip
    original = ReferenceScorer.score

    def signalled(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if len(reference_forwards) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(ReferenceScorer, "score", signalled)
    with pytest.raises(SystemExit) as stop:
        fit(pairs_file, tmp_path / "cache", steps=5)  # a full pass: 9 train pairs, 3 validation, 2 per forward
    assert stop.value.code == 143 and len(reference_forwards) == 2
    masks = entry_masks(tmp_path / "cache")
    assert int(masks["train"].sum()) == 4 and not masks["validation"].any()  # the two batches done are kept

    monkeypatch.setattr(ReferenceScorer, "score", original)
    reference_forwards.clear()
    fit(pairs_file, tmp_path / "cache", steps=5)
    assert len(reference_forwards) == 3 + 2  # the other 5 train pairs and the validation pairs
    assert all(mask.all() for mask in entry_masks(tmp_path / "cache").values())


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.slow
def test_the_cli_stops_in_one_line_on_a_signal_during_the_pass(tmp_path, signum, code):
    cache = tmp_path / "cache"
    command = [sys.executable, "cli.py", "fit", "--config", "demo_dpo.yaml", "--trainer.max_steps", "50",
               "--trainer.default_root_dir", str(tmp_path / "run"), "--model.reference_cache_dir", str(cache),
               "--trainer.callbacks+=tests.reference_signals.SignalInReferencePass",
               f"--trainer.callbacks.signum={int(signum)}"]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    stops = [line for line in result.stderr.splitlines() if "during the reference pass" in line]
    assert len(stops) == 1 and signal.Signals(signum).name in stops[0], result.stderr[-3000:]
    masks = entry_masks(cache)
    assert int(masks["train"].sum()) == 2 * 8  # two batches of the demo's batch size 8
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # no step was taken: nothing to resume


def test_an_entry_of_the_first_format_is_read(pairs_file, tmp_path, reference_forwards):
    module, data = fit(pairs_file, tmp_path / "cache")
    (entry,) = entries(tmp_path / "cache")
    tables = torch.load(entry, weights_only=True)["tables"]
    digests = {split: data.digest(split) for split in ("train", "validation")}
    old_key = fingerprint({**module.reference.identity(), "format": 1, "pairs": digests})
    old = {"version": 1, "fingerprint": old_key, "meta": {}, "tables": tables, "checksum": _checksum(tables)}
    torch.save(old, tmp_path / "cache" / f"{old_key}.pt")
    entry.unlink()
    reference_forwards.clear()
    fit(pairs_file, tmp_path / "cache")
    assert reference_forwards == []
