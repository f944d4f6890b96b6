"""Loading bases: pre-quantized checkpoints, missing models, LoRA targets, the tiny model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from alignment.hub.tiny import build_tiny_model
from alignment.hub.tokenizer import load_tokenizer
from alignment.model.load import CPU_PACKING_FLAG, ModelLoadError, add_lora, load_base
from tests.helpers import literal_batch


def test_prequantized_checkpoint_loads_as_it_is(tmp_path):
    quantized = load_base("tiny", load_in_4bit=True)
    quantized.save_pretrained(tmp_path)  # writes a quantization_config, like unsloth/*-bnb-4bit
    load_tokenizer("tiny").save_pretrained(tmp_path)
    reloaded = load_base(str(tmp_path), load_in_4bit=True)
    layer = reloaded.model.layers[1].mlp.down_proj
    assert layer.weight.__class__.__name__ == "Params4bit"
    batch = literal_batch()
    with torch.no_grad():
        expected = quantized(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        got = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_full_precision_base_when_4bit_is_off():
    base = load_base("tiny", load_in_4bit=False)
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # not bitsandbytes' Linear4bit
    assert not getattr(base, "is_loaded_in_4bit", False)
    assert not any(p.requires_grad for p in base.parameters())


def test_missing_model_offline_names_it_and_the_local_path_option():
    with pytest.raises(ModelLoadError, match=r"no-such-org/no-such-model.*--model.base"):
        load_base("no-such-org/no-such-model")


def test_unknown_lora_target_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="not_a_layer"):
        add_lora(load_base("tiny", load_in_4bit=False), target_modules=["not_a_layer"])


def test_lora_on_chosen_modules_only():
    policy = add_lora(load_base("tiny", load_in_4bit=True), r=4, target_modules=["q_proj", "v_proj"])
    trainable = {n.split(".")[-4] for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}
    assert policy.training  # gradient checkpointing in transformers only acts in train mode


def test_tiny_model_is_deterministic(tmp_path):
    first, second = build_tiny_model(tmp_path / "a"), build_tiny_model(tmp_path / "b")
    a = (first / "model.safetensors").read_bytes()
    b = (second / "model.safetensors").read_bytes()
    assert a == b


# Counts every socket connection the child process makes once the libraries are imported. A connection made while a
# module is being imported (bitsandbytes 0.50 with kernels 0.19 looks for an optional CPU kernel on the hub when it
# is imported: peft 0.21 imported it, peft 0.22 leaves it to transformers' 4-bit loading) is the library's, not the
# loading's: it is recorded apart, by the import machinery's frames in its stack.
_COUNT_CONNECTIONS = """
import json, os, socket, traceback
import alignment, bitsandbytes, peft, transformers
OURS = os.path.dirname(os.path.abspath(alignment.__file__)) + os.sep
tries = []
connect = socket.socket.connect
def counted(sock, address):
    stack = traceback.extract_stack()[:-1]
    importing = any(frame.filename.startswith("<frozen importlib") for frame in stack)
    ours = any(frame.filename.startswith(OURS) for frame in stack)
    tries.append({"address": list(address[:2]), "importing": importing, "ours": ours,
                  "stack": [f"{frame.filename}:{frame.lineno}" for frame in stack[-6:]]})
    return connect(sock, address)
socket.socket.connect = counted
from alignment.model import load_base, load_tokenizer
load_tokenizer("someone/tiny")
load_base("someone/tiny")
print("CONNECTIONS " + json.dumps(tries))
"""


@pytest.mark.slow
def test_cached_hub_model_loads_without_network_and_without_waiting(tmp_path):
    """A hub name found in the local cache loads when the hub cannot be reached: one look at the hub (refused at
    once), then no retries and no download attempt. What libraries do while they are imported is theirs, and differs
    between versions: it is left out of the count (bitsandbytes is imported before counting)."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(build_tiny_model(tmp_path / "build"), snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9
    result = subprocess.run([sys.executable, "-c", _COUNT_CONNECTIONS], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    tries = json.loads(result.stdout.split("CONNECTIONS ", 1)[1])
    loading = [t for t in tries if not t["importing"]]
    # one look at the hub, by our code, at the endpoint (refused at once); then nothing: no retry, no download
    assert [(t["address"], t["ours"]) for t in loading] == [(["127.0.0.1", 9], True)], json.dumps(tries, indent=1)


def test_4bit_layers_never_switch_to_the_cpu_inference_kernel():
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in load_base("tiny", load_in_4bit=True).modules() if isinstance(m, Linear4bit)]
    assert layers and all(getattr(layer, CPU_PACKING_FLAG) is False for layer in layers)


def test_a_bitsandbytes_without_the_cpu_kernel_switch_fails_loudly(monkeypatch):
    """Were the switch renamed, assigning it would silently do nothing and CPU gradients would go wrong."""
    from bitsandbytes.nn import Linear4bit

    original_init = Linear4bit.__init__

    def init_without_the_switch(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        delattr(self, CPU_PACKING_FLAG)

    monkeypatch.setattr(Linear4bit, "__init__", init_without_the_switch)
    with pytest.raises(RuntimeError, match=f"Linear4bit has no '{CPU_PACKING_FLAG}'"):
        load_base("tiny", load_in_4bit=True)
    # before 0.49 there is no packed CPU kernel and no switch: nothing to do, no error
    monkeypatch.setattr("alignment.model.load._version", lambda package: "0.48.0")
    assert load_base("tiny", load_in_4bit=True) is not None
