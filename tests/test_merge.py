"""`merge`: the merged model loads with AutoModelForCausalLM and computes what base + adapter computed in training.

The honest reference is the trained policy itself: the nf4 base with the adapter on top (what training and
`PeftModel.from_pretrained` on the 4-bit base compute). The merge adds the LoRA update to the dequantized nf4
weights, so in float32 the two agree to float rounding (measured: 2.7e-7 max abs logit difference, logits of
magnitude ~0.6); in bfloat16 / float16 the stored weights are rounded too (measured 2.2e-3 / 3.1e-4).
"""

import json
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.commands.merge import merge_adapter
from alignment.errors import ConfigError
from alignment.model import load_base, load_tokenizer
from alignment.usage import main
from tests.demo_runs import demo_run

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}  # max abs logit difference


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(10, 260, (2, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_4bit_run_equals_the_nf4_base_with_its_adapter(tmp_path, ids, dtype):
    run = demo_run("dpo")  # trained on a 4-bit base
    main(["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", dtype])

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == getattr(torch, dtype)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == dtype
    merged_logits = logits(merged.float(), ids)
    policy = PeftModel.from_pretrained(load_base("tiny", load_in_4bit=True), run / "adapter")
    expected = logits(policy, ids)
    assert (merged_logits - expected).abs().max() < TOLERANCE[dtype]
    assert (logits(load_base("tiny", load_in_4bit=True), ids) - expected).abs().max() > 0.1  # the adapter matters
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer("Hi")["input_ids"] == load_tokenizer("tiny")("Hi")["input_ids"]


def test_merging_into_the_full_precision_weights_would_be_further_off(tmp_path, ids):
    """Why the merge dequantizes nf4: the adapter learnt a correction to the nf4 weights, not to the originals."""
    run = demo_run("orpo")
    merge_adapter(run, tmp_path / "merged", dtype="float32")
    expected = logits(PeftModel.from_pretrained(load_base("tiny", load_in_4bit=True), run / "adapter"), ids)
    ours = (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids) - expected).abs().max()
    full = PeftModel.from_pretrained(load_base("tiny", load_in_4bit=False), run / "adapter")
    assert ours < 1e-5 < 1e-3 < (logits(full, ids) - expected).abs().max()


def test_a_full_precision_run_merges_onto_its_unquantized_base(tmp_path, ids):
    run = tmp_path / "fp_run"
    shutil.copytree(demo_run("dpo") / "adapter", run / "adapter")
    config = yaml.safe_load((demo_run("dpo") / "config.yaml").read_text())
    config["model"]["init_args"]["load_in_4bit"] = False
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    merge_adapter(run, tmp_path / "merged", dtype="float32")
    expected = logits(PeftModel.from_pretrained(load_base("tiny", load_in_4bit=False), run / "adapter"), ids)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged, ids) - expected).abs().max() < TOLERANCE["float32"]


def test_merge_errors_name_the_path(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(tmp_path / "unfinished"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "unfinished holds no adapter" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="holds something other than a model"):
        merge_adapter(demo_run("dpo"), demo_run("dpo"))  # would write into the run directory itself
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "--help"])
    assert exit_info.value.code == 0 and "--dtype" in capsys.readouterr().out
