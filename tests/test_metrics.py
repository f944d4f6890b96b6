"""Logged metrics are means over pairs: whole validation set, and train steps since the last log."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from alignment import DPO, PreferenceDataModule
from alignment.logprobs import sequence_logps
from alignment.losses import dpo_loss
from tests.helpers import PAIR_METHODS, literal_batch, synthetic_pairs, write_jsonl


class Recording(DPO):
    """DPO that records the per-pair loss of every training micro-batch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss, metrics = self.compute_loss(batch)
        self.train_metrics.update(metrics)
        self.seen.append(metrics["loss"])
        return loss


def data(tmp_path, n_train: int, n_val: int, batch_size: int) -> PreferenceDataModule:
    train = write_jsonl(tmp_path / "train.jsonl", synthetic_pairs(n_train, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", synthetic_pairs(n_val, seed=1))
    return PreferenceDataModule(str(train), val_path=str(val), max_length=64, batch_size=batch_size)


@pytest.mark.parametrize("cls", PAIR_METHODS)
def test_validation_metrics_are_means_over_pairs_not_batches(tmp_path, cls):
    datamodule = data(tmp_path, 8, 5, batch_size=2)  # validation batches of 2, 2 and 1 pairs
    module = cls(base="tiny", load_in_4bit=False)
    with torch.no_grad():
        module.configure_model()
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # rewards that differ from pair to pair
    logged = L.Trainer(logger=False, enable_progress_bar=False).validate(module, datamodule, verbose=False)[0]

    per_pair = {}
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            _, metrics = module.compute_loss(batch)
            for name, values in metrics.items():
                per_pair.setdefault(name, []).append(values)
    for name, values in per_pair.items():
        assert logged[f"val/{name}"] == pytest.approx(torch.cat(values).mean().item(), rel=1e-5, abs=1e-6), name


def test_train_metrics_are_means_over_the_steps_since_the_last_log(tmp_path):
    datamodule = data(tmp_path, 12, 2, batch_size=2)
    module = Recording(base="tiny", load_in_4bit=False, learning_rate=1e-2, lr_scheduler="constant")
    trainer = L.Trainer(
        max_steps=6, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule)

    with open(tmp_path / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    assert sorted(logged) == [3, 6]
    assert logged[3] == pytest.approx(torch.cat(module.seen[0:3]).mean().item(), rel=1e-6)
    assert logged[6] == pytest.approx(torch.cat(module.seen[3:6]).mean().item(), rel=1e-6)
    assert logged[3] != pytest.approx(logged[6])  # the model learnt in between: not one value repeated
    # the last log's means are what callbacks and notebooks read, and the progress bar shows (loss, acc)
    seen = trainer.callback_metrics
    assert {f"train/{name}" for name in module.metric_names} <= set(seen)
    assert seen["train/loss"].item() == seen["loss"].item() == pytest.approx(logged[6], rel=1e-6)
    assert seen["acc"].item() == seen["train/rewards/accuracies"].item()
    bar = trainer.progress_bar_metrics
    assert bar["loss"] == pytest.approx(logged[6], rel=1e-6) and bar["acc"] == seen["acc"].item()


# --- IPO: the loss on per-token means, the metrics on sums (what TRL's names mean) ---------------------------------


class LiteralPolicy(DPO):
    """DPO whose policy log-probs are given sums; the reference comes from a cache table (sums, token counts)."""

    def __init__(self, policy_sums: torch.Tensor, reference_table: torch.Tensor, **kwargs):
        super().__init__(**kwargs)
        self.policy_sums, self.forwards = policy_sums, []
        self.reference.tables = {"train": reference_table}

    def sequence_logps(self, batch, *, average):
        self.forwards.append(average)
        return self.policy_sums.chunk(2)


def test_ipo_logs_sums_and_trains_on_means_by_hand():
    """literal_batch answers: chosen 3 and 2 tokens, rejected 4 and 5 (EOS included).

    pair 0: policy chosen -6, reference -9 (+3); rejected -10 vs -12 (+2).
    pair 1: policy chosen -3, reference -4 (+1); rejected -12 vs -14 (+2).
    Sums, beta 0.5: rewards chosen (1.5, 0.5), rejected (1, 1), margins (0.5, -0.5), accuracies (1, 0).
    Means: h = 3/3 - 2/4 = 0.5 and 1/2 - 2/5 = 0.1: both pairs won, accuracy 1; IPO target 1/(2 beta) = 1:
    losses (0.5 - 1)^2 = 0.25 and (0.1 - 1)^2 = 0.81, loss 0.53.
    """
    batch = literal_batch()
    answer_tokens = (batch.labels[:, 1:] != -100).sum(-1)
    assert answer_tokens.tolist() == [3, 2, 4, 5]  # chosen rows, then rejected rows
    policy = torch.tensor([-6.0, -3.0, -10.0, -12.0])
    reference = torch.tensor([[-9.0, -12.0, 3, 4], [-4.0, -14.0, 2, 5]])  # rows: chosen, rejected, their tokens
    module = LiteralPolicy(policy, reference, loss_type="ipo", beta=0.5)
    loss, metrics = module.compute_loss(batch, "train")
    assert module.forwards == [False]  # one policy pass, on sums
    expected = {
        "rewards/chosen": [1.5, 0.5], "rewards/rejected": [1.0, 1.0], "rewards/margins": [0.5, -0.5],
        "rewards/accuracies": [1.0, 0.0], "logps/chosen": [-6.0, -3.0], "logps/rejected": [-10.0, -12.0],
        "loss": [0.25, 0.81],
    }  # fmt: skip
    for name, values in expected.items():
        torch.testing.assert_close(metrics[name], torch.tensor(values), rtol=0, atol=1e-6, msg=name)
    assert loss.item() == pytest.approx(0.53, abs=1e-6)
    # the same pairs judged on means, as the metrics were before: another accuracy
    mean_logps = [torch.tensor(v) for v in ([-2.0, -1.5], [-2.5, -2.4], [-3.0, -2.0], [-3.0, -2.8])]
    _, chosen_rewards, rejected_rewards = dpo_loss(*mean_logps, beta=0.5, loss_type="ipo")
    assert (chosen_rewards > rejected_rewards).float().mean().item() == 1.0
    assert metrics["rewards/accuracies"].mean().item() == 0.5


@pytest.mark.parametrize("cached", [False, True])
def test_ipo_metrics_on_the_tiny_model_are_those_of_sums(cached):
    """Policy and reference sums computed here from full logits, adapters on and off; the module's metrics must be
    TRL's (from sums), its loss IPO's on the per-token means, with the reference live or from a cache table."""
    torch.manual_seed(0)
    module = DPO(base="tiny", load_in_4bit=False, loss_type="ipo", beta=0.1, reference_cache=False)
    module.configure_model()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sorted(module.policy.named_parameters()):
            if "lora_B" in name:
                p.normal_(std=0.3, generator=generator)
    batch = literal_batch()
    labels = batch.labels[:, 1:]

    def sums() -> torch.Tensor:  # (2B,)
        with torch.no_grad():
            logits = module.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return sequence_logps(logits[:, :-1], labels)

    policy = sums()
    with module.policy.disable_adapter():
        reference = sums()
    tokens = (labels != -100).sum(-1)
    if cached:
        module.reference.tables = {"train": torch.stack([*reference.chunk(2), *tokens.float().chunk(2)], dim=1)}
    loss, metrics = module.compute_loss(batch, "train")

    (pc, pr), (rc, rr) = policy.chunk(2), reference.chunk(2)
    chosen_rewards, rejected_rewards = 0.1 * (pc - rc), 0.1 * (pr - rr)
    expected = {
        "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(), "logps/chosen": pc, "logps/rejected": pr,
    }  # fmt: skip
    for name, values in expected.items():
        torch.testing.assert_close(metrics[name], values, rtol=1e-5, atol=1e-5, msg=name)
    (nc, nr) = tokens.chunk(2)
    h = (pc - rc) / nc - (pr - rr) / nr
    torch.testing.assert_close(loss.detach(), ((h - 1 / (2 * 0.1)) ** 2).mean(), rtol=1e-5, atol=1e-5)
