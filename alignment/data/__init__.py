"""Rows → token ids → batches: reading and checking rows (`rows`), tokenizing them (`encoding`), the items and
batches each method trains on (`batches`), resumable samplers (`samplers`) and the DataModule (`module`)."""

from __future__ import annotations

from alignment.lazy import lazy_exports

# imported on first use: a light submodule (rows, for the command line's checks) must not load torch
_HOMES = {
    "IGNORE_INDEX": "alignment.data.batches",
    "DataKind": "alignment.data.batches",
    "PreferenceBatch": "alignment.data.batches",
    "SequenceBatch": "alignment.data.batches",
    "Split": "alignment.data.batches",
    "TokenizedPair": "alignment.data.batches",
    "TokenizedSequence": "alignment.data.batches",
    "TokenizedUnpaired": "alignment.data.batches",
    "UnpairedBatch": "alignment.data.batches",
    "collate_pairs": "alignment.data.batches",
    "collate_sequences": "alignment.data.batches",
    "collate_unpaired": "alignment.data.batches",
    "cut_prompt": "alignment.data.batches",
    "pair_length": "alignment.data.batches",
    "pairs_digest": "alignment.data.batches",
    "truncate_pair": "alignment.data.batches",
    "PreferenceDataModule": "alignment.data.module",
    "usable_val_split": "alignment.data.module",
}
__all__ = sorted(_HOMES)

__getattr__, __dir__ = lazy_exports(__name__, _HOMES)
