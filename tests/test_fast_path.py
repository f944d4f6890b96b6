"""The fast path by default: --model.padding_free and --model.shared_prompt left out are on wherever they give the
padded forward's log-probs (tests/test_packing.py checks that they do), off elsewhere, said in one log line; given,
they are honoured or refused in one line. A run's config.yaml keeps what was given (null when left out), so an old
run's explicit false resumes as it was trained (tests/test_old_runs.py)."""

import logging

import pytest
import yaml

import alignment
import alignment.methods.base as base_module
from alignment.errors import ConfigError
from tests.test_cli import run_cli
from tests.test_old_runs import OLD_RUN


@pytest.mark.parametrize(
    ("name", "kwargs", "padding_free", "shared_prompt"),
    [
        ("DPO", {}, True, True),
        ("DPO", {"loss_type": "ipo"}, True, True),
        ("DPO", {"rpo_alpha": 0.5, "loss_type": ["sigmoid", "bco_pair"]}, True, True),
        ("ORPO", {}, True, True),
        ("SimPO", {}, True, True),
        ("CPO", {}, True, True),
        ("KTO", {}, True, False),  # unpaired rows: no pair to share a prompt
        ("SFT", {}, False, False),
        ("DPO", {"use_weighting": True}, False, False),  # WPO and LD-DPO read the padded forward's tokens
        ("DPO", {"ld_alpha": 0.5}, False, False),
        ("DPO", {"padding_free": False}, False, False),  # given: honoured
        ("ORPO", {"shared_prompt": False}, True, False),
    ],
)
def test_left_out_the_fast_path_is_on_where_it_gives_the_same_log_probs(name, kwargs, padding_free, shared_prompt):
    module = getattr(alignment, name)(**kwargs)
    assert (module.hparams.padding_free, module.hparams.shared_prompt) == (padding_free, shared_prompt)


@pytest.mark.parametrize(("name", "kwargs"), [("SFT", {}), ("DPO", {"use_weighting": True})])
def test_left_out_and_off_says_why_in_one_line(name, kwargs, caplog):
    with caplog.at_level(logging.INFO, logger="alignment.methods.base"):
        getattr(alignment, name)(**kwargs)
    lines = [r.getMessage() for r in caplog.records if "padding_free" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("padding_free off (")


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("SFT", {"padding_free": True}, "--model.padding_free true: SFT trains on padded rows only"),
        ("DPO", {"use_weighting": True, "padding_free": True}, "set --model.padding_free false"),
        ("DPO", {"padding_free": False, "shared_prompt": True}, "--model.shared_prompt needs --model.padding_free"),
        ("KTO", {"shared_prompt": True}, "--model.shared_prompt: KTO does not train on pairs"),
    ],
)
def test_given_true_where_it_cannot_work_is_one_line(name, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        getattr(alignment, name)(**kwargs)


def test_shared_prompt_left_out_is_off_on_an_attention_that_would_not_read_the_pairs(monkeypatch, caplog):
    load = base_module.load_base

    def eager_base(*args, **kwargs):
        model = load(*args, **kwargs)
        model.set_attn_implementation("eager")
        return model

    monkeypatch.setattr(base_module, "load_base", eager_base)
    module = alignment.DPO()
    with caplog.at_level(logging.INFO, logger="alignment.methods.base"):
        module.configure_model()
    assert (module.hparams.padding_free, module.hparams.shared_prompt) == (True, False)
    assert any("shared_prompt off (the model's attention is eager" in r.getMessage() for r in caplog.records)
    given = alignment.DPO(shared_prompt=True)
    given.configure_model()
    assert given.hparams.shared_prompt is True  # given: the first packed forward refuses it in one line


@pytest.mark.slow
def test_a_config_keeps_what_was_given_and_an_old_runs_false_stays_false():
    result = run_cli("fit", "--config", "demo_dpo.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    model = yaml.safe_load(result.stdout)["model"]["init_args"]
    assert model["padding_free"] is None and model["shared_prompt"] is None
    old = yaml.safe_load((OLD_RUN / "config.yaml").read_text())["model"]["init_args"]
    assert old["padding_free"] is False and old["shared_prompt"] is False
    result = run_cli("fit", "--config", str(OLD_RUN / "config.yaml"), "--print_config")
    assert result.returncode == 0, result.stderr[-3000:]
    model = yaml.safe_load(result.stdout)["model"]["init_args"]
    assert model["padding_free"] is False and model["shared_prompt"] is False
    assert alignment.DPO(padding_free=False, shared_prompt=False).hparams.padding_free is False
