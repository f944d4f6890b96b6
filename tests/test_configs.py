"""Configs compose: settings several experiments share live once in configs/shared/, named by each experiment's
group (`trainer: shared/trainer_gpu.yaml`), and the experiment file stays the one thing a user passes."""

import shutil
from pathlib import Path

import yaml

from alignment.commands.sweep import _config_hash
from alignment.usage import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.is_symlink())  # demo.yaml: demo_orpo.yaml


def test_every_group_a_config_names_is_a_shared_file_and_no_group_is_written_out_twice():
    written_out: dict[str, list[str]] = {}
    for path in EXPERIMENTS:
        config = yaml.safe_load(path.read_text())
        for group in ("trainer", "data"):
            value = config[group]
            if isinstance(value, str):
                assert (path.parent / value).is_file(), f"{path.name}: {group}: {value} does not exist"
            else:
                written_out.setdefault(f"{group}: {sorted(value.items())}", []).append(path.name)
    copied = {settings: names for settings, names in written_out.items() if len(names) > 1}
    assert not copied, f"the same group written out in several configs (move it to configs/shared/): {copied}"


def test_a_flag_overrides_a_value_of_a_shared_group(capsys):
    try:
        main(["fit", "--config", "orpo_tinyllama.yaml", "--trainer.max_epochs", "3", "--print_config"])
    except SystemExit as stop:
        assert stop.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_epochs"] == 3  # the flag
    assert printed["trainer"]["accumulate_grad_batches"] == 4  # the rest from configs/shared/trainer_gpu.yaml
    assert printed["data"]["path"] == "HuggingFaceH4/ultrafeedback_binarized"  # configs/shared/data_ultrafeedback.yaml


def test_a_sweep_sees_a_change_to_a_shared_file(tmp_path):
    shutil.copytree(ROOT / "configs", tmp_path / "configs", symlinks=True)
    config = str(tmp_path / "configs" / "demo_dpo.yaml")
    before = _config_hash(config)
    shared = tmp_path / "configs" / "shared" / "data_demo.yaml"
    shared.write_text(shared.read_text().replace("max_length: 192", "max_length: 160"))
    assert _config_hash(config) != before
