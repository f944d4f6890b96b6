"""Entry point: `python cli.py fit --config configs/demo.yaml` (bare config names resolve in configs/)."""

import logging

# bitsandbytes looks for an optional hub kernel when imported on CPU and warns when it is absent, though it
# falls back to its own; that warning would read as an error at the top of every run
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from alignment.usage import main  # noqa: E402  (Lightning is imported only for fit and validate)

if __name__ == "__main__":
    main()
