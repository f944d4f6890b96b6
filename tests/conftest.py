import os
import tempfile

# No test may touch the network: the hub is offline and W&B (when a test switches it on) too.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tiny offline model is written here once per test session, not into the user's cache
os.environ["ALIGNMENT_CACHE"] = tempfile.mkdtemp(prefix="alignment-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # tests in parallel processes: one thread each, none spinning idle
    torch.set_num_threads(1)


# Modules whose tests take minutes, heaviest first. They are collected first, so that under pytest -n the workers
# start on them and the short tests fill in at the end, instead of a long test starting last and running alone.
# Each module stays in one piece (its module-scoped fixtures are built once per worker).
FIRST = ["test_real_model", "test_ddp", "test_fsdp", "test_method_mix", "test_sweep", "test_cli", "test_old_runs",
         "test_start_adapter", "test_methods_learning", "test_rundir", "test_resume"]  # fmt: skip


def _rank(item) -> int:
    name = item.path.stem
    return FIRST.index(name) if name in FIRST else len(FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_rank)  # stable: each module's tests keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
