"""Entry point: `python cli.py fit --config configs/demo.yaml` (bare config names resolve in configs/)."""

import logging
import os

# OpenMP threads that wait spin on their core by default: on a machine whose cores are shared (other runs, a
# notebook, the data loader), 2 spinning threads made a CPU step 60x slower than with threads that sleep while
# they wait (docs/performance.md: tiny ORPO, 7.9 s against 0.13 s a step); set OMP_WAIT_POLICY to choose
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bitsandbytes looks for an optional hub kernel when imported on CPU and warns when it is absent, though it
# falls back to its own; that warning would read as an error at the top of every run
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# kernels 0.19 (that lookup's library) also warns, offline, that it skips the hub's publisher check for that
# kernel before it finds the kernel is not cached: drop that one notice, keep every other record of kernels
logging.getLogger("kernels._internals.hf_hub").addFilter(lambda rec: "publisher trust check" not in rec.getMessage())

from alignment.usage import main  # noqa: E402  (Lightning is imported only for fit and validate)

if __name__ == "__main__":
    main()
