"""The argument parser of `fit` and `validate`: a mistake is one line naming the flag, checked before anything loads."""

from __future__ import annotations

import configparser
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from alignment.data.rows import FIELDS
from alignment.errors import ConfigError
from alignment.files import check_writable
from alignment.run.fsdp import check_strategy  # also registers --trainer.strategy fsdp_qlora
from alignment.run.rundir import check_config_home

COLUMNS_HINT = (
    f"expected a mapping of field ({', '.join(FIELDS)}) to the data's column, "
    """e.g. --data.columns '{"prompt": "question"}'"""
)
KEY = r'Parser key "([^"]+)":'  # how jsonargparse starts the report of a bad value
WANDB_OFFLINE_MODES = ("offline", "dryrun", "disabled")


class AlignmentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line (the full usage is for --help), and which refuses settings
    that would only fail later: after the model has loaded, or with a traceback from inside Lightning."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parsing inside itself: it catches this and tries the next type
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"error: {one_line(message, parser.prog)}", file=sys.stderr)
        self.exit(2)

    def parse_args(self, *args: Any, **kwargs: Any) -> Namespace:
        config = super().parse_args(*args, **kwargs)
        if config.get("subcommand"):
            fitting = config.subcommand == "fit"
            check_settings(config[config.subcommand], fitting=fitting)
            if fitting:
                argv = args[0] if args and args[0] is not None else kwargs.get("args") or sys.argv[1:]
                check_run_config(config.fit, [str(a) for a in argv])
        return config


def one_line(message: str, prog: str) -> str:
    """jsonargparse's multi-line report of a bad value, as `--flag: what is wrong, got what`."""
    keys = re.findall(KEY, message)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not keys:  # unknown or missing arguments: the flags are in the message
        return f"{' '.join(lines)} (see python {prog.replace(' [options]', '')} --help)"
    flag = "--" + ".".join(keys)
    given = re.search(r"^\s*Given value: (.*)$", message, re.M)
    nested = re.search(r"Problem with given class_path '[^']+':\n(.*)", message, re.S)
    if flag == "--data.columns" and given:
        return f"{flag}: {COLUMNS_HINT}; got {given.group(1)}"
    if nested:  # an argument of the model's class: its own line says what is wrong
        inner = [line.strip() for line in nested.group(1).splitlines()]
        reason = next(line for line in inner if line and not line.startswith("Parser key"))
        return f"{flag}: {_plain(reason[:1].lower() + reason[1:])}"
    subtypes = re.search(r"^\s*Subtypes: \[(.*)\]$", message, re.M)
    if subtypes and given:
        return f"{flag}: expected one of [{_plain(subtypes.group(1))}], got {given.group(1)}"
    return f"{flag}: {_plain(' '.join(re.sub(KEY, '', message).split()))}"


def _plain(text: str) -> str:
    """`<class 'int'>` as int, `typing.Literal` as Literal, `NoneType` as None."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("typing.", "")
    return text.replace("NoneType", "None")


def check_settings(config: Namespace, fitting: bool = True) -> None:
    """Settings of fit or validate that are wrong whatever the data and model: refused before either loads.

    Only fit writes to the run directory: validate reads a run, read-only ones included.
    """
    accumulate = config.trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        raise ConfigError(f"--trainer.accumulate_grad_batches must be at least 1, got {accumulate}")
    columns = config.data.get("columns") if config.get("data") else None
    unknown = sorted(set(columns or {}) - set(FIELDS))
    if unknown:
        raise ConfigError(f"--data.columns: unknown field {unknown[0]!r}; {COLUMNS_HINT}")
    model = config.get("model")
    load_in_4bit = model.get("init_args", {}).get("load_in_4bit", True) if model is not None else True
    check_strategy(config.trainer, load_in_4bit)
    if fitting and config.trainer.get("default_root_dir") is not None:
        check_writable(config.trainer.default_root_dir, "--trainer.default_root_dir")
    if config.get("wandb"):
        check_wandb_login()


def check_run_config(config: Namespace, argv: list[str]) -> None:
    """A run's config.yaml copied or moved elsewhere must not reach back into the run it came from."""
    resuming, overwrite = config.get("ckpt_path") is not None, bool(config.get("overwrite"))
    check_config_home(config.get("config"), config.trainer.get("default_root_dir"), argv, resuming=resuming,
                      overwrite=overwrite)  # fmt: skip


def check_wandb_login() -> None:
    """W&B needs an API key unless it runs offline: without one it would stop the run at its first log, or wait
    for a key at a prompt. Decided from the environment and ~/.netrc, as wandb reads them, never by asking the
    server (https://docs.wandb.ai/guides/track/environment-variables)."""
    settings = _wandb_settings()
    mode = os.environ.get("WANDB_MODE") or settings.get("mode", "")
    if mode in WANDB_OFFLINE_MODES or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    if settings.get("api_key"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or settings.get("base_url") or "https://api.wandb.ai").netloc
    if _netrc_has(host):
        return
    raise ConfigError(
        f"--wandb true: no W&B login for {host} (no WANDB_API_KEY, no entry in ~/.netrc): "
        "run `wandb login`, or set WANDB_MODE=offline to log into the run directory only"
    )


def _netrc_has(host: str) -> bool:
    """Whether the netrc file wandb reads ($NETRC, else ~/.netrc, else ~/_netrc) holds a password for `host`."""
    paths = [Path(os.environ["NETRC"])] if os.environ.get("NETRC") else [Path("~/.netrc"), Path("~/_netrc")]
    for path in (p.expanduser() for p in paths):
        if path.is_file():
            try:
                entry = netrc.netrc(path).authenticators(host)
            except (netrc.NetrcParseError, OSError):
                return False
            return bool(entry and entry[2])
    return False


def _wandb_settings() -> dict[str, str]:
    """The [default] section of wandb's global settings file ($WANDB_CONFIG_DIR/settings, ~/.config/wandb)."""
    folder = os.environ.get("WANDB_CONFIG_DIR") or Path("~/.config/wandb").expanduser()
    settings = configparser.ConfigParser()
    try:
        settings.read(Path(folder) / "settings")
    except configparser.Error:
        return {}
    return dict(settings["default"]) if settings.has_section("default") else {}
