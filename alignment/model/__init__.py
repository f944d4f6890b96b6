"""The base and its adapters: loading (4-bit, LoRA, checkpointing: `load`), the padding-free forward (`packing`),
the LM head read for lean log-probs (`heads`) and decoding answers (`generate`)."""

from __future__ import annotations

from alignment.lazy import lazy_exports

# imported on first use: a light submodule (rows, for the command line's checks) must not load torch
_HOMES = {
    "load_tokenizer": "alignment.hub.tokenizer",
    "POLICY_ADAPTER": "alignment.model.load",
    "REFERENCE_ADAPTER": "alignment.model.load",
    "add_lora": "alignment.model.load",
    "adapter_weights": "alignment.model.load",
    "load_base": "alignment.model.load",
    "load_lora": "alignment.model.load",
    "read_adapter": "alignment.model.load",
    "selective_checkpointing": "alignment.model.load",
}
__all__ = sorted(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
