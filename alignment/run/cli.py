"""`python cli.py fit --config X.yaml`: LightningCLI over the preference modules, with run directories."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import lightning as L
import yaml
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from alignment.data import PreferenceDataModule, usable_val_split
from alignment.errors import ConfigError, RunDirError, RunFinished
from alignment.files import atomic_write
from alignment.hub import resolve_base
from alignment.methods.base import PreferenceModule
from alignment.run.callbacks import DisplacementWarning, RunCheckpoint, StopOnDivergence
from alignment.run.generations import SampleGenerations
from alignment.run.parser import AlignmentParser
from alignment.run.resume import AtomicCheckpointIO, ExactResume, RunCSVLogger, checkpoint_step, run_seed
from alignment.run.rundir import clear_run, holds_run, lock_run, release_runs, write_error

SUBCOMMANDS = ("fit", "validate")  # LightningCLI's; alignment.usage describes them in --help
__all__ = ["SUBCOMMANDS", "AlignmentCLI", "run_cli"]
log = logging.getLogger(__name__)


class RunStart(SaveConfigCallback):
    """What a fit does to its run directory once training really starts, and not before: a run that fails or is
    refused earlier (bad data, a resume check, Ctrl-C while tokenizing) leaves the directory as it was.

    With `--overwrite true` the earlier run's files go; metrics.csv starts (or keeps the rows up to the resumed
    step); config.yaml is written, without `ckpt_path` and `overwrite`: `fit --config runs/X/config.yaml` reruns it,
    and `--ckpt_path last` continues it.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass  # LightningCLI would save config.yaml here, before the data is read and the checkpoint checked

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir)
        if self.config.get("overwrite"):
            clear_run(root)
        for logger in trainer.loggers:
            if isinstance(logger, RunCSVLogger):
                logger.start()
        config = self.config.clone()
        config.ckpt_path, config.overwrite = None, False
        config.seed_everything = run_seed(trainer, config.seed_everything)  # a resume keeps the run's seed
        text = self.parser.dump(config, skip_none=False)
        path = root / self.config_filename  # (trainer.log_dir is a collective: this runs on process 0 only)
        try:
            atomic_write(path, lambda handle: handle.write(text.encode()))
        except OSError as err:
            raise write_error(err, path) from err


class AlignmentCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit and validate: the modules have no test or predict step."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--wandb", type=bool, default=False, help="also log to Weights & Biases")
        parser.add_argument("--wandb_project", type=str, default="preference-alignment")
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="fit: start over in a run directory that holds a run (its files go once training starts)",
        )  # fmt: skip
        parser.link_arguments("model.init_args.base", "data.tokenizer")
        parser.link_arguments("model.init_args.revision", "data.revision")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # next, LightningCLI reads the hyperparameters of a checkpoint file: a damaged one is named, not a traceback
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None and ckpt_path not in CKPT_KEYWORDS:
            if not Path(ckpt_path).is_file():
                raise RunDirError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
            checkpoint_step(ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.default_root_dir is None:
            # a fixed directory per run: `--ckpt_path last` finds nothing otherwise
            files = config.get("config") or []
            name = Path(str(files[-1])).stem if files else config.model.class_path.rsplit(".", 1)[-1].lower()
            config.trainer.default_root_dir = str(Path("runs") / name)
        # the base is checked before anything prints or is built: a wrong --model.base is one line, at once
        resolve_base(config.model.init_args.base, config.model.init_args.get("revision"))
        # set before the data module is built, so that the saved config.yaml says what the run did
        data = config.data
        data.val_split = usable_val_split(data.get("path"), data.val_split, data.get("val_path"), data.val_fraction)
        root = Path(config.trainer.default_root_dir)
        self._resumed_from: int | None = None
        if config.get("ckpt_path") == "last":
            config.ckpt_path = str(last_checkpoint(root))
            step = checkpoint_step(config.ckpt_path)  # a damaged last.ckpt is one line, for validate too
            self._resumed_from = step if self.subcommand == "fit" else None
        elif config.get("ckpt_path") is not None and config.ckpt_path not in CKPT_KEYWORDS:
            self._resumed_from = checkpoint_step(config.ckpt_path) if self.subcommand == "fit" else None
        if self.subcommand == "fit" and rank_zero_only.rank == 0:  # the other processes of a DDP run join this one
            lock_run(root)
            check_fit_dir(root, config)

    def before_fit(self) -> None:
        if self.config.fit.trainer.use_distributed_sampler and self.trainer.world_size > 1:
            raise ConfigError(
                "--trainer.use_distributed_sampler true: the data module shards the training pairs itself (that is "
                "what makes a resume exact); leave it false"
            )
        log.info("run directory: %s", self.trainer.default_root_dir)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        subcommand_config = self.config[self.subcommand] if self.subcommand else self.config
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).trainer
        root = Path(config.default_root_dir)
        fitting = self.subcommand == "fit"
        if config.get("logger") in (None, True):
            # validate, test and predict print their results and leave the run directory alone
            kwargs["logger"] = self._run_loggers(root, subcommand_config) if fitting else False
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        # the RNG state, the run's identity and its seed in each checkpoint, checked on resume
        callbacks.append(ExactResume(seed=subcommand_config.get("seed_everything")))
        if not fitting:
            return super().instantiate_trainer(callbacks=callbacks, **kwargs)
        if subcommand_config.get("wandb"):
            callbacks.append(SampleGenerations())  # a table of answers to fixed validation prompts
        # save_top_k=1: Lightning only refreshes last.ckpt when it saves a regular checkpoint too; checkpoints
        # hold adapters only, so the second file is small. On an exception (Ctrl-C included) one more is written.
        callbacks.append(
            RunCheckpoint(
                dirpath=root / "checkpoints",
                adapter_dir=root / "adapter",
                save_last=True,
                save_top_k=1,
                save_on_exception=True,
                enable_version_counter=False,  # a rerun replaces last.ckpt instead of adding last-v1.ckpt
            )
        )
        callbacks.append(StopOnDivergence())  # at the first loss or gradient not finite, before a save
        callbacks.append(DisplacementWarning())  # DPO, KTO: chosen rewards below 0 and falling, margin rising
        kwargs["callbacks"] = callbacks
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def _run_loggers(self, root: Path, subcommand_config) -> list:
        loggers = [RunCSVLogger(root, keep_until_step=self._resumed_from)]
        if subcommand_config.get("wandb"):
            from lightning.pytorch.loggers import WandbLogger

            resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))[self.subcommand]
            loggers.append(
                WandbLogger(project=subcommand_config.wandb_project, name=root.name, save_dir=root, config=resolved)
            )
        return loggers


CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


def last_checkpoint(root: Path) -> Path:
    path = root / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise RunDirError(
            f"--ckpt_path last: {path} does not exist, there is no run to continue in {root}; "
            "leave out --ckpt_path to start one"
        )
    return path


def check_fit_dir(root: Path, config) -> None:
    """Starting over in a directory that holds a run is a choice made explicitly."""
    resuming = config.get("ckpt_path") is not None
    if resuming and config.get("overwrite"):
        raise RunDirError("--overwrite true starts the run over and --ckpt_path continues it: give one of them")
    if not resuming and not config.get("overwrite") and holds_run(root):
        raise RunDirError(
            f"{root} already holds a run: add --ckpt_path last to continue it, or --overwrite true to start it "
            "over, or choose another --trainer.default_root_dir"
        )


def run_cli(argv: list[str] | None) -> AlignmentCLI | None:
    try:
        return AlignmentCLI(
            PreferenceModule,
            PreferenceDataModule,
            parser_class=AlignmentParser,
            subclass_mode_model=True,
            auto_configure_optimizers=False,
            save_config_callback=RunStart,
            seed_everything_default=42,
            # the data module shards the training pairs itself: Lightning's sampler would change their order on resume
            trainer_defaults={"max_epochs": 1, "log_every_n_steps": 1, "use_distributed_sampler": False},
            args=argv,
        )
    except RunFinished as finished:
        print(finished, file=sys.stderr)
        return None
    finally:
        release_runs()
