"""DPO and ORPO on LoRA adapters over 4-bit bases, with PyTorch Lightning."""

from alignment.data import PreferenceBatch, PreferenceDataModule
from alignment.modules import DPO, ORPO, PreferenceModule

__all__ = ["DPO", "ORPO", "PreferenceBatch", "PreferenceDataModule", "PreferenceModule"]
