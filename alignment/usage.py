"""`python cli.py VERB ...`: picks the verb, and turns the user's mistakes into one line on stderr and exit code 2.

Nothing heavy is imported here: `--help` and the after-training verbs must not wait for Lightning.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from alignment.commands import VERB_HELP, run_verb
from alignment.errors import USER_ERRORS, ConfigError
from alignment.files import ACCESS_REFUSED

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TRAINING_VERBS = {
    "fit": "train a DPO or ORPO adapter (python cli.py fit --config demo.yaml)",
    "validate": "one pass over the validation set, with the metrics of fit",
}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # Deprecation notices about other libraries' calls into each other, on every run, that no user can act on: peft
    # reads transformers' `is_gradient_checkpointing` (peft 0.21 / transformers 5.23), lightning builds torch's
    # `LeafSpec()` (lightning 2.6 / torch 2.13). Filtered by message AND the module that warns; all else shows.
    warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning,
                            module="transformers.modeling_utils")  # fmt: skip
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
                            module="lightning.pytorch.utilities._pytree")  # fmt: skip
    # torchdata 0.11's StatefulDataLoader calls torch's deprecated set_vital on every loader
    warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning,
                            module="torchdata.stateful_dataloader.stateful_dataloader")  # fmt: skip
    logging.getLogger("alignment").setLevel(logging.INFO)
    # Lightning's `lightning` logger has a console handler of its own and also propagates to the root's: every
    # record of Lightning would print twice. And its "Seed set to 42" (the seed is in the run's config.yaml) would
    # stand before the one line of a mistake the model's arguments make, as LightningCLI seeds before building them.
    logging.getLogger("lightning").propagate = False
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    if argv is None:  # from the shell: LightningCLI reads sys.argv itself
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        argv = resolve_config_args(argv)
    given = sys.argv[1:] if argv is None else argv
    try:
        if not given or given[0] in ("-h", "--help"):
            print_help(given)
        elif not run_verb(given):  # report, compare, sweep, merge
            check_training_verb(given[0])
            from alignment.run.cli import run_cli  # Lightning: only now that the verb needs it

            run_cli(argv)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)  # the user's input, not a bug: no traceback
        sys.exit(2)


def print_help(given: list[str]) -> None:
    """The verbs, each with one line; `python cli.py` alone is a mistake, `--help` is not."""
    if not given:
        raise ConfigError(f"name a command: {', '.join(all_verbs())} (see python cli.py --help)")
    width = max(map(len, all_verbs()))
    lines = ["usage: python cli.py VERB [options]", "", "DPO and ORPO on LoRA adapters over 4-bit bases.", ""]
    lines += ["training (LightningCLI):"] + [f"  {verb:<{width}}  {text}" for verb, text in TRAINING_VERBS.items()]
    lines += ["after training:"] + [f"  {verb:<{width}}  {text}" for verb, text in VERB_HELP.items()]
    lines += ["", "The options of each: python cli.py VERB --help"]
    print("\n".join(lines))


def all_verbs() -> list[str]:
    return [*TRAINING_VERBS, *VERB_HELP]


def check_training_verb(first: str) -> None:
    """`first` is fit, validate, or an option LightningCLI takes before them (`--config X fit`)."""
    if first not in TRAINING_VERBS and not first.startswith("-"):
        raise ConfigError(f"unknown command {first!r}: expected one of {', '.join(all_verbs())}")


def resolve_config_args(argv: list[str]) -> list[str]:
    """`--config orpo_tinyllama.yaml` finds configs/orpo_tinyllama.yaml when no such file is in the cwd."""
    out = list(argv)
    for i, arg in enumerate(out):
        value, prefix = None, ""
        if arg == "--config" and i + 1 < len(out):
            value, i = out[i + 1], i + 1
        elif arg.startswith("--config="):
            value, prefix = arg.split("=", 1)[1], "--config="
        if value is None or Path(value).exists():
            continue
        for candidate in (Path("configs") / value, CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml"):
            if candidate.is_file():
                out[i] = prefix + str(candidate)
                break
    return out


def user_error(err: BaseException) -> BaseException | None:
    """The mistake in the user's data, model or settings behind `err`, if that is what it is.

    jsonargparse wraps errors raised while building the model in its own ValueError, so follow the chain.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (*USER_ERRORS, *_lightning_errors())):
            return seen
        if isinstance(seen, OSError) and seen.errno in ACCESS_REFUSED and seen.filename:
            return ConfigError(f"{seen.filename}: {seen.strerror}")  # a path the user gave, or the cwd
        seen = seen.__cause__ or seen.__context__
    return None


def _lightning_errors() -> tuple[type[BaseException], ...]:
    """Lightning's MisconfigurationException, when Lightning is loaded (no instance can exist before)."""
    module = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (module.MisconfigurationException,) if module else ()
