"""Sample generations at validation time, logged to Weights & Biases as a table."""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from alignment.model.generate import DecodeOptions, generate_ids, stop_token_ids

log = logging.getLogger(__name__)

COLUMNS = ["step", "prompt", "answer"]


class SampleGenerations(L.Callback):
    """After each validation pass, greedy answers of the policy to the first `num_prompts` validation prompts.

    The prompts are the validation pairs' own token ids (rendered as in training), the same ones every time, so
    the table shows how the answers to fixed questions change as training goes on. The table logged under `key`
    holds every row so far (step, prompt, answer). Nothing happens without a W&B logger, during the sanity
    check, or on processes other than the first.
    """

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 48, key: str = "val/generations"):
        self.num_prompts = num_prompts
        self.decode = DecodeOptions(max_new_tokens=max_new_tokens)
        self.key = key
        self.rows: list[list[int | str]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        data = trainer.datamodule
        val_set, tokenizer = getattr(data, "val_set", None), getattr(data, "tokenizer", None)
        policy = getattr(pl_module, "policy", None)
        if logger is None or not val_set or tokenizer is None or policy is None:
            return
        prompts = [val_set[i].prompt_ids for i in range(min(self.num_prompts, len(val_set)))]
        answers = generate_ids(
            policy,
            prompts,
            pad_id=tokenizer.pad_token_id,
            stop_ids=stop_token_ids(policy, tokenizer),
            decode=self.decode,
            batch_size=len(prompts),
        )
        for prompt, answer in zip(prompts, answers, strict=True):
            text = tokenizer.decode(prompt, skip_special_tokens=True).strip()
            self.rows.append([trainer.global_step, text, tokenizer.decode(answer, skip_special_tokens=True).strip()])
        logger.log_table(self.key, columns=COLUMNS, data=[list(row) for row in self.rows], step=trainer.global_step)
