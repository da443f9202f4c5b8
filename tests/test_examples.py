"""The README's main job, end to end with its smallest settings, on the real SmolLM2 model."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from hf_peft_plugin import cli
from hf_peft_plugin.loading import load_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_start_fine_tune_lowers_held_out_loss(tmp_path, capsys, local_hub, monkeypatch):
    example = load_example("finetune_causal_lm")
    out = tmp_path / "adapter"
    result = example.main(
        ["--max-steps", "3", "--batch-size", "4", "--train-examples", "12", "--eval-examples", "8",
         "--show", "1", "--output-dir", str(out)]
    )
    assert result["loss_after"] < result["loss_before"] - 0.2, result
    printed = capsys.readouterr().out
    assert "held-out loss:" in printed and "| word | WordNet | before | after |" in printed
    assert "tokens/s (padding-free batches)" in printed and result["tokens_per_second"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert not (out / "model.safetensors").exists()
    # The saved adapter is a real, loadable artifact.
    from hf_peft_plugin.assets import smollm2_path
    from transformers import AutoModelForCausalLM

    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(smollm2_path()), out)
    assert sum(p.numel() for n, p in reloaded.named_parameters() if "lora_" in n) == 4_884_480

    # The push command it printed is exact: run as printed (repo name filled in), it publishes the
    # adapter with a card that says how the base was quantized.
    [command] = [line.strip() for line in printed.splitlines() if line.strip().startswith("hf-peft-plugin push")]
    argv = shlex.split(command.replace("<user>/", "alice/"))
    monkeypatch.setenv("HF_TOKEN", "hf_write_alice")
    assert cli.main(argv[1:]) == 0
    files = local_hub.files("alice/wordnet-lora")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert not any(name.endswith((".bin", ".pt", "model.safetensors")) and name != "adapter_model.safetensors" for name in files)
    pushed, saved = safetensors.torch.load(files["adapter_model.safetensors"]), load_file(out / "adapter_model.safetensors")
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved)
    card = files["README.md"].decode()
    assert "4-bit" in card and "nf4" in card


def test_quick_start_push_to_pushes_when_a_token_is_present(tmp_path, capsys, local_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_write_alice")
    example = load_example("finetune_causal_lm")
    example.main(
        ["--max-steps", "1", "--batch-size", "2", "--train-examples", "2", "--eval-examples", "2", "--show", "0",
         "--output-dir", str(tmp_path / "adapter"), "--push-to", "alice/wordnet-direct"]
    )
    printed = capsys.readouterr().out
    assert f"pushed: {local_hub.endpoint}/alice/wordnet-direct/commit/" in printed
    assert "hf-peft-plugin push" not in printed
    files = local_hub.files("alice/wordnet-direct")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)


def test_classify_text_example_learns_tweet_sentiment_with_lora_and_a_soft_prompt(tmp_path, capsys):
    example = load_example("classify_text")
    out = tmp_path / "adapter"
    result = example.main(["--epochs", "1", "--prompt-tokens", "4", "--output-dir", str(out)])
    assert result["accuracy_after"] >= 0.75 and result["accuracy_after"] > result["accuracy_before"] + 0.15, result
    assert "held-out accuracy (120 examples, 2 classes)" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert json.loads((out / "hf_peft_plugin_config.json").read_text())["prompt"]["num_virtual_tokens"] == 4
