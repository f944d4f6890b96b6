"""Short demo runs (DPO and ORPO on the tiny model), trained once per test process and shared by the tests of
the after-training commands."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from alignment.usage import main

CONFIGS = {"dpo": "demo_dpo.yaml", "orpo": "demo.yaml"}


@functools.cache
def demo_run(method: str) -> Path:
    """A finished run directory: 1 epoch of 6 batches, validated at its end (config.yaml, adapter/, metrics.csv)."""
    root = Path(tempfile.mkdtemp(prefix=f"demo-{method}-")) / method
    main(["fit", "--config", CONFIGS[method], "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "6", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    return root
