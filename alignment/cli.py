"""`python cli.py fit --config X.yaml`: LightningCLI over the preference modules, with run directories."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.cli import LightningCLI

from alignment.callbacks import AdapterExport, RunCheckpoint
from alignment.data import PreferenceDataModule
from alignment.generations import SampleGenerations
from alignment.model import resolve_base
from alignment.modules import PreferenceModule
from alignment.parser import AlignmentParser
from alignment.resume import AtomicCheckpointIO, RunCSVLogger, checkpoint_step
from alignment.usage import CONFIG_DIR, TRAINING_VERBS, main, resolve_config_args, user_error

__all__ = ["CONFIG_DIR", "AlignmentCLI", "main", "resolve_config_args", "run_cli", "user_error"]
log = logging.getLogger(__name__)


class AlignmentCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate: the modules have no test or predict step."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in TRAINING_VERBS}

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


def run_cli(argv: list[str] | None) -> AlignmentCLI:
    return AlignmentCLI(
        PreferenceModule,
        PreferenceDataModule,
        parser_class=AlignmentParser,
        subclass_mode_model=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=42,
        # the data module shards the training pairs itself: Lightning's sampler would change their order on resume
        trainer_defaults={"max_epochs": 1, "log_every_n_steps": 1, "use_distributed_sampler": False},
        args=argv,
    )
