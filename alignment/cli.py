"""`python cli.py fit --config X.yaml`: LightningCLI over the preference modules, with run directories."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import yaml
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from alignment.callbacks import AdapterExport, RunCheckpoint
from alignment.data import PreferenceDataModule
from alignment.errors import USER_ERRORS
from alignment.generations import SampleGenerations
from alignment.model import resolve_base
from alignment.modules import PreferenceModule
from alignment.resume import AtomicCheckpointIO, RunCSVLogger, checkpoint_step
from alignment.verbs import run_verb

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


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


class AlignmentCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--wandb", type=bool, default=False, help="also log to Weights & Biases")
        parser.add_argument("--wandb_project", type=str, default="preference-alignment")
        parser.link_arguments("model.init_args.base", "data.tokenizer")
        parser.link_arguments("model.init_args.revision", "data.revision")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.default_root_dir is None:
            # a fixed directory per run: `--ckpt_path last` finds nothing otherwise
            files = config.get("config") or []
            name = Path(str(files[-1])).stem if files else config.model.class_path.rsplit(".", 1)[-1].lower()
            config.trainer.default_root_dir = str(Path("runs") / name)
        # the base is checked before anything prints or is built: a wrong --model.base is one line, at once
        resolve_base(config.model.init_args.base, config.model.init_args.get("revision"))

    def before_fit(self) -> None:
        # the model is checked before the data is read: a missing base fails at once, not after tokenizing
        resolve_base(self.model.hparams.base, self.model.hparams.revision)
        root = Path(self.trainer.default_root_dir)
        log.info("run directory: %s", root)
        if (root / "checkpoints" / "last.ckpt").exists() and self.config[self.subcommand].get("ckpt_path") is None:
            log.warning(
                "%s already holds a run: this one starts over and replaces its metrics.csv and adapter; "
                "to continue it instead, add --ckpt_path last (or pick another --trainer.default_root_dir)",
                root,
            )

    def _instantiate_trainer(self, config: dict, callbacks: list):
        root = Path(config["default_root_dir"])
        subcommand_config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("logger") in (None, True):
            loggers = [RunCSVLogger(save_dir=root, name="", version="", keep_until_step=self._resumed_step(root))]
            if subcommand_config.get("wandb"):
                from lightning.pytorch.loggers import WandbLogger

                resolved = yaml.safe_load(self._parser(self.subcommand).dump(subcommand_config, skip_none=False))
                loggers.append(
                    WandbLogger(project=subcommand_config.wandb_project, name=root.name, save_dir=root, config=resolved)
                )
            config["logger"] = loggers
        if subcommand_config.get("wandb"):
            callbacks.append(SampleGenerations())  # a table of answers to fixed validation prompts
        # save_top_k=1: Lightning only refreshes last.ckpt when it saves a regular checkpoint too; checkpoints
        # hold adapters only, so the second file is small. On an exception (Ctrl-C included) one more is written.
        callbacks.append(
            RunCheckpoint(
                dirpath=root / "checkpoints",
                save_last=True,
                save_top_k=1,
                save_on_exception=True,
                enable_version_counter=False,  # a rerun replaces last.ckpt instead of adding last-v1.ckpt
            )
        )
        callbacks.append(AdapterExport(root / "adapter"))
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def _resumed_step(self, root: Path) -> int | None:
        """The step of the checkpoint this run resumes from, if it resumes."""
        ckpt_path = (self.config[self.subcommand] if self.subcommand else self.config).get("ckpt_path")
        if ckpt_path is None:
            return None
        path = root / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
        return checkpoint_step(path) if path.is_file() else None


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    # deprecation notices raised inside peft and lightning themselves, on every run: nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    logging.getLogger("alignment").setLevel(logging.INFO)
    if argv is None:  # from the shell: LightningCLI reads sys.argv itself
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    else:
        argv = resolve_config_args(argv)
    try:
        if not run_verb(sys.argv[1:] if argv is None else argv):  # report, compare, sweep, merge
            run_cli(argv)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)  # the user's input, not a bug: no traceback
        sys.exit(2)


def user_error(err: BaseException) -> BaseException | None:
    """The mistake in the user's data, model or settings behind `err`, if that is what it is.

    jsonargparse wraps errors raised while building the model in its own ValueError, so follow the chain.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (*USER_ERRORS, MisconfigurationException)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def run_cli(argv: list[str] | None) -> AlignmentCLI:
    return AlignmentCLI(
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=42,
        # the data module shards the training pairs itself: Lightning's sampler would change their order on resume
        trainer_defaults={"max_epochs": 1, "log_every_n_steps": 1, "use_distributed_sampler": False},
        args=argv,
    )
