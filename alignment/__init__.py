"""DPO and ORPO on LoRA adapters over 4-bit bases, with PyTorch Lightning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from alignment.methods import METHODS

if TYPE_CHECKING:
    from alignment.data import PreferenceBatch, PreferenceDataModule
    from alignment.methods.base import PreferenceModule
    from alignment.methods.cpo import CPO
    from alignment.methods.dpo import DPO
    from alignment.methods.kto import KTO
    from alignment.methods.orpo import ORPO
    from alignment.methods.sft import SFT
    from alignment.methods.simpo import SimPO

# imported on first use (PEP 562): `python cli.py --help` and the after-training verbs must not wait for torch
_HOMES = {
    **METHODS,
    "PreferenceModule": "alignment.methods.base",
    "PreferenceBatch": "alignment.data.batches",
    "PreferenceDataModule": "alignment.data.module",
}
__all__ = ["CPO", "DPO", "KTO", "ORPO", "SFT", "SimPO", "PreferenceBatch", "PreferenceDataModule", "PreferenceModule"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'alignment' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
