"""Entry point: `python cli.py fit --config configs/demo.yaml` (bare config names resolve in configs/)."""

from alignment.cli import main

if __name__ == "__main__":
    main()
