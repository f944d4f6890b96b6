"""Small builders shared by the tests."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import lightning as L

import alignment
from alignment.data import TokenizedPair, collate_pairs
from alignment.methods import METHODS

ALL_METHODS = [getattr(alignment, name) for name in METHODS]  # the one list of methods the tests go through
PAIR_METHODS = [cls for cls in ALL_METHODS if cls.data_kind == "pairs"]  # those that train on preference pairs


def literal_batch(pad_id: int = 3):
    """Two pairs of literal token ids (tiny vocabulary ids, BOS = 1, EOS = 2)."""
    pairs = [
        TokenizedPair([1, 40, 41, 42], [50, 51, 2], [60, 61, 62, 2], 0),
        TokenizedPair([1, 43, 44], [52, 2], [63, 64, 65, 66, 2], 1),
    ]
    return collate_pairs(pairs, pad_id=pad_id, pad_to_multiple_of=8)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    """A preference a random model is blind to: both answers hold the same letters, the chosen one in
    alphabetical order, the rejected one shuffled. Only the order of tokens tells them apart."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = []
    for _ in range(n):
        chars = rng.sample(letters, rng.randint(5, 8))
        shuffled = chars[:]
        while shuffled == sorted(chars):
            rng.shuffle(shuffled)
        prompt, chosen, rejected = "sort: " + "".join(chars), "".join(sorted(chars)), "".join(shuffled)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


class SignalAtStep(L.Callback):
    """Sends a signal to this process once `step` optimizer steps are done (a scheduler's pre-emption); under DDP
    to the process of global rank `rank` only."""

    def __init__(self, step: int, signum: int = int(signal.SIGTERM), rank: int = 0):
        self.step, self.signum, self.rank = step, signum, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)


class CrashAtStep(L.Callback):
    """Raises once `step` optimizer steps are done: a crash with no chance to save."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")
