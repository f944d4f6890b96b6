"""DPO and ORPO on LoRA adapters over 4-bit bases, with PyTorch Lightning."""

from __future__ import annotations

from typing import TYPE_CHECKING

from alignment.lazy import lazy_exports
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

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
