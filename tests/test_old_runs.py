"""A run written before the package moved into layers still loads, resumes, and resumes exactly.

tests/fixtures/run_2026_12_07 is what that version wrote for `fit --config demo_dpo.yaml --trainer.max_steps 4
--data.limit 16 --model.lora_r 2 --model.lora_target_modules [q_proj,v_proj]` stopped by SIGTERM after step 2
(`--trainer.callbacks+=tests.helpers.SignalAtStep --trainer.callbacks.step 2`): its config.yaml (with that
callback taken out: `callbacks: null`), checkpoints/last.ckpt and adapter/."""

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_cli import run_cli

OLD_RUN = Path(__file__).parent / "fixtures" / "run_2026_12_07"


@pytest.mark.slow
def test_an_old_run_resumes_to_the_adapter_of_an_uninterrupted_run(tmp_path):
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    shutil.copytree(OLD_RUN, resumed)
    config = str(resumed / "config.yaml")
    result = run_cli("fit", "--config", config, "--trainer.default_root_dir", str(resumed), "--ckpt_path", "last",
                     )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states from the checkpoint" in result.stderr + result.stdout
    result = run_cli("fit", "--config", config, "--trainer.default_root_dir", str(fresh))
    assert result.returncode == 0, result.stderr[-3000:]

    before = load_file(OLD_RUN / "adapter" / "adapter_model.safetensors")
    after, uninterrupted = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (resumed, fresh))
    assert after.keys() == uninterrupted.keys() == before.keys()
    assert all((after[k] == uninterrupted[k]).all() for k in after)  # bit for bit
    assert any((after[k] != before[k]).any() for k in after)  # and it trained on from the old step 2 to step 4


@pytest.mark.slow
def test_an_old_config_parses_as_it_is(tmp_path):
    result = run_cli("fit", "--config", str(OLD_RUN / "config.yaml"), "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "class_path: alignment.DPO" in result.stdout and "lora_r: 2" in result.stdout
