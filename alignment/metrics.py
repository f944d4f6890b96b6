"""Per-example training metrics averaged over steps, epochs and processes (torchmetrics)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric


def _key(name: str) -> str:
    return name.replace("/", "__")  # ModuleDict keys cannot hold '.', and '/' reads badly in state dicts


class MeanTracker(nn.Module):
    """One MeanMetric per name; `compute()` syncs across processes, so every process must call it."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.means = nn.ModuleDict({_key(name): MeanMetric() for name in names})

    # Validation runs under inference mode in `validate` but not in `fit`: states made or updated in there
    # would be inference tensors that a later in-place update outside it refuses, so keep them normal tensors.
    @torch.inference_mode(False)
    def update(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            self.means[_key(name)].update(value.detach().float().clone())

    @property
    def empty(self) -> bool:
        return all(not m.update_called for m in self.means.values())

    def compute(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}/{name}": self.means[_key(name)].compute() for name in self.names}

    @torch.inference_mode(False)
    def reset(self) -> None:
        for mean in self.means.values():
            mean.reset()
