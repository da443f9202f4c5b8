"""Adapter artifacts: save / load in the PEFT layout, safety of the files, bad input, merging."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import bitsandbytes as bnb
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from hf_peft_plugin import (
    AdapterLoadError,
    AdapterNameError,
    BottleneckConfig,
    LoraConfig,
    MergeError,
    PromptTuningConfig,
    add_adapter,
    delete_adapter,
    prepare_model,
    set_active_adapters,
)
from hf_peft_plugin import atomic
from hf_peft_plugin.config import QuantizationConfig
from hf_peft_plugin.heads import TrainableCopy
from hf_peft_plugin.loading import load_adapter
from hf_peft_plugin.lora import LoraLinear
from hf_peft_plugin.merging import merge_adapters, merge_and_unload, unmerge_adapters
from hf_peft_plugin.quantization import quantize_model
from hf_peft_plugin.saving import save_adapter
from hf_peft_plugin.state import STATE_ATTRIBUTE

from tiny_models import VOCAB, perturb_trainable, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

pytestmark = pytest.mark.filterwarnings(
    "ignore:MatMul8bitLt:UserWarning", "ignore::FutureWarning", "ignore:.*may not fit this model:UserWarning"
)

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}
EXTRA_FILES = {"hf_peft_plugin_config.json", "hf_peft_plugin_adapter.safetensors"}
CASES = {  # name: (model factory, bits, LoRA config)
    "llama-4bit-dora": (tiny_llama, 4, LoraConfig(r=4, alpha=8, use_dora=True)),
    "gpt2-plain": (tiny_gpt2, None, LoraConfig(r=4, alpha=8)),
    "bert-8bit-head": (tiny_bert_classifier, 8, LoraConfig(r=4, alpha=8, target_modules=["query", "value"])),
}


def base(factory, bits: int | None) -> nn.Module:
    """The base model quantized exactly as prepare_model quantizes it (quantization is deterministic)."""
    model = factory()
    if bits is not None:
        quantize_model(model, QuantizationConfig(bits=bits), torch.float32)
    return model.eval()





def adapted(case: str, seed: int = 1) -> nn.Module:
    factory, bits, lora = CASES[case]
    return perturb_trainable(prepare_model(factory(), bits=bits, lora=lora), seed)


def logits(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch() if ids is None else ids).logits


def snapshot(model: nn.Module) -> dict:
    return {
        "class": type(model),
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
        "attrs": set(vars(model)),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["class"] is before["class"]
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][k], v) for k, v in before["tensors"].items())
    assert after["grad"] == before["grad"] and after["training"] == before["training"]
    assert after["attrs"] == before["attrs"]


def header_size(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def saved_llama_adapter(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("saved") / "llama"
    save_adapter(adapted("llama-4bit-dora"), path)
    return path


@pytest.fixture
def llama_adapter(saved_llama_adapter, tmp_path) -> Path:
    """A fresh copy of a saved 4-bit Llama DoRA adapter, free to damage."""
    return Path(shutil.copytree(saved_llama_adapter, tmp_path / "llama"))


# -- round trips and layout ------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_then_load_gives_the_same_logits(case, tmp_path):
    model = adapted(case)
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES
    factory, bits, _ = CASES[case]
    loaded = load_adapter(base(factory, bits), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)
    assert sorted(loaded._hf_peft_plugin_state.adapters["default"].lora_targets) == sorted(
        model._hf_peft_plugin_state.adapters["default"].lora_targets
    )


def test_saved_lora_is_in_peft_layout(tmp_path):
    save_adapter(adapted("llama-4bit-dora"), tmp_path / "llama")
    config = json.loads((tmp_path / "llama/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["use_dora"], config["bias"]) == (4, 8, True, "none")
    assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert config["fan_in_fan_out"] is False and config["modules_to_save"] is None
    keys = set(load_file(tmp_path / "llama/adapter_model.safetensors"))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert {f"{q}.lora_A.weight", f"{q}.lora_B.weight", f"{q}.lora_magnitude_vector"} <= keys
    assert len(keys) == 3 * 7 * 2

    save_adapter(adapted("gpt2-plain"), tmp_path / "gpt2")
    assert json.loads((tmp_path / "gpt2/adapter_config.json").read_text())["fan_in_fan_out"] is True

    save_adapter(adapted("bert-8bit-head"), tmp_path / "bert")
    config = json.loads((tmp_path / "bert/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    keys = set(load_file(tmp_path / "bert/adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_target_modules_fall_back_to_full_paths_when_short_names_would_match_more(tmp_path):
    model = perturb_trainable(
        prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=2, target_modules=r".*layers\.1\..*_proj"))
    )
    save_adapter(model, tmp_path)
    targets = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert targets == sorted(model._hf_peft_plugin_state.adapters["default"].lora_targets)
    assert all(t.startswith("model.layers.1.") for t in targets)


@pytest.mark.parametrize("case", ["gpt2-plain", "bert-8bit-head"])
def test_file_holds_only_the_trainable_tensors(case, tmp_path):
    model = adapted(case)
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert path.stat().st_size == header_size(path) + trainable
    keys = load_file(path)
    # GPT-2 ties lm_head to the token embeddings; neither is trained, so neither is saved.
    assert not any("lm_head" in k or "wte" in k or "word_embeddings" in k for k in keys)


def test_tied_lm_head_is_saved_only_when_trained_and_stays_untied_after_merge(tmp_path):
    lora = LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["lm_head"])
    model = perturb_trainable(prepare_model(tiny_gpt2(), bits=None, lora=lora))
    save_adapter(model, tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter/adapter_model.safetensors")
    assert [k for k in keys if ".lora_" not in k] == ["base_model.model.lm_head.weight"]  # not the tied wte
    expected = logits(model)
    torch.testing.assert_close(logits(load_adapter(tiny_gpt2().eval(), tmp_path / "adapter")), expected, rtol=0, atol=0)
    merged = merge_and_unload(model, dtype=torch.float32)
    assert merged.config.tie_word_embeddings is False
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(
        logits(GPT2LMHeadModel.from_pretrained(tmp_path / "merged")), expected, rtol=0, atol=1e-4
    )


def test_several_adapters_default_at_root_others_in_subfolders(tmp_path):
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4))
    add_adapter(model, "second", lora=LoraConfig(r=2, target_modules=["q_proj"]))
    perturb_trainable(model)
    set_active_adapters(model, ["second"])
    perturb_trainable(model, seed=2)
    expected = {"second": logits(model)}
    set_active_adapters(model, ["default"])
    expected["default"] = logits(model)
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES | {"second"}
    assert {p.name for p in (tmp_path / "second").iterdir()} == PEFT_FILES

    loaded = load_adapter(base(tiny_llama, 4), tmp_path)
    load_adapter(loaded, tmp_path, subfolder="second", adapter_name="second")
    assert loaded._hf_peft_plugin_state.active == ["default"]  # a second load adds an inactive adapter
    torch.testing.assert_close(logits(loaded), expected["default"], rtol=0, atol=1e-6)
    set_active_adapters(loaded, ["second"])
    torch.testing.assert_close(logits(loaded), expected["second"], rtol=0, atol=1e-6)

    save_adapter(model, tmp_path / "only", adapter_name="second")
    assert {p.name for p in (tmp_path / "only").iterdir()} == {"second"}


def test_loading_an_existing_name_again_is_refused(llama_adapter):
    model = load_adapter(base(tiny_llama, 4), llama_adapter)
    before = snapshot(model)
    with pytest.raises(AdapterNameError, match="already has an adapter named 'default'"):
        load_adapter(model, llama_adapter)
    assert_untouched(model, before)


def test_is_trainable_false_freezes_and_true_resumes_training(llama_adapter):
    frozen = load_adapter(base(tiny_llama, 4), llama_adapter)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training

    model = load_adapter(base(tiny_llama, 4), llama_adapter, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.clone()
    ids = token_batch()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.lora_B["default"].weight, before)


def test_model_methods_and_save_pretrained(tmp_path):
    model = adapted("gpt2-plain")
    model.save_pretrained(tmp_path / "a")  # what the Trainer calls: the adapter only
    assert {p.name for p in (tmp_path / "a").iterdir()} == PEFT_FILES
    model.save_adapter(tmp_path / "b")
    assert load_file(tmp_path / "a/adapter_model.safetensors").keys() == model.get_adapter_state_dict().keys()
    model.load_adapter(tmp_path / "b", adapter_name="again")
    assert set(model._hf_peft_plugin_state.adapters) == {"default", "again"}
    assert model.active_adapters() == ["default"]
    model.disable_adapters()  # transformers' imperative form, called by some model code
    torch.testing.assert_close(logits(model), logits(tiny_gpt2().eval()), rtol=0, atol=0)
    model.enable_adapters()
    torch.testing.assert_close(logits(model), logits(adapted("gpt2-plain")), rtol=0, atol=0)
    for method in ("set_adapter", "add_adapter", "delete_adapter"):  # would add peft layers: refused
        with pytest.raises(TypeError, match="hf_peft_plugin"):
            getattr(model, method)("again")


# -- files are safe -----------------------------------------------------------------------------


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = adapted("gpt2-plain")
    save_adapter(model, tmp_path)
    good = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real_write = atomic._write_bytes
    written = []

    def dies_halfway(path, data):  # the disk fills up while the second file is written
        if written:
            path.write_bytes(data[: len(data) // 2])
            raise OSError("No space left on device")
        written.append(path)
        real_write(path, data)

    monkeypatch.setattr(atomic, "_write_bytes", dies_halfway)
    perturb_trainable(model, seed=5)
    with pytest.raises(OSError, match="No space left"):
        save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == good  # intact, and no temporary left
    monkeypatch.undo()
    torch.testing.assert_close(logits(load_adapter(tiny_gpt2().eval(), tmp_path)), logits(adapted("gpt2-plain")))


def test_pickle_adapter_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Exploit()))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match="pickle"):
        load_adapter(model, adapter)
    assert not marker.exists()
    assert_untouched(model, before)


# -- bad input ----------------------------------------------------------------------------------


def corrupt(directory: Path) -> None:
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(300))


def truncate(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def lose_field(directory: Path) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    del config["r"]
    (directory / "adapter_config.json").write_text(json.dumps(config))


BAD_INPUT = {
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "corrupted weights": (corrupt, "not a readable safetensors file"),
    "truncated weights": (truncate, "not a readable safetensors file"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    "missing required field": (lose_field, r"lacks the required field\(s\) \['r'\]"),
    "unknown peft_type": (lambda d: edit_config(d, peft_type="IA3"), "peft_type='IA3'"),
    "unsupported feature": (lambda d: edit_config(d, lora_bias=True), "lora_bias"),
    "config not json": (lambda d: (d / "adapter_config.json").write_text("{oops"), "not valid JSON"),
    "rank differs from config": (lambda d: edit_config(d, r=8), r"lora_A has shape \(4, 64\) in the file"),
    "strict base mismatch": (lambda d: edit_config(d, base_model_name_or_path="org/other-model"), "strict=True"),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUT))
@pytest.mark.parametrize("into", ["plain", "prepared"])
def test_bad_input_is_a_clear_error_and_leaves_the_model_untouched(problem, into, llama_adapter):
    damage, message = BAD_INPUT[problem]
    damage(llama_adapter)
    model = base(tiny_llama, 4) if into == "plain" else prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=2))
    model.config._name_or_path = "org/tiny-llama"
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=message):
        load_adapter(model, llama_adapter, adapter_name="new", strict=True)
    assert_untouched(model, before)


def test_adapter_for_another_base_names_the_module_and_both_shapes(llama_adapter):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    smaller = LlamaForCausalLM(config).eval()
    before = snapshot(smaller)
    with pytest.raises(AdapterLoadError) as err:
        load_adapter(smaller, llama_adapter)
    assert "model.layers.0.mlp.down_proj: lora_B has shape (64, 4) in the file, but this model needs (32, 4)" in str(
        err.value
    )
    assert_untouched(smaller, before)


def test_adapter_for_another_architecture_lists_the_missing_modules(llama_adapter):
    gpt2 = tiny_gpt2()
    before = snapshot(gpt2)
    with pytest.raises(AdapterLoadError, match=r"does not have: \['model\.layers\.0\.mlp\.down_proj'"):
        load_adapter(gpt2, llama_adapter)
    assert_untouched(gpt2, before)


def test_folder_of_subfolders_points_to_them(tmp_path):
    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=2), adapter_name="fr")
    save_adapter(model, tmp_path)
    with pytest.raises(AdapterLoadError, match="sub-folders \\['fr'\\]: pass subfolder='fr'"):
        load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(AdapterLoadError, match="must be a relative folder"):
        load_adapter(tiny_llama(), tmp_path, subfolder="../fr")
    with pytest.raises(AdapterLoadError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path, subfolder="de")
    assert load_adapter(tiny_llama(), tmp_path, subfolder="fr", adapter_name="fr")._hf_peft_plugin_state.active == [
        "fr"
    ]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ""])
def test_adapter_names_that_are_not_folder_names_are_refused(name, llama_adapter):
    with pytest.raises(AdapterNameError, match="not allowed"):
        load_adapter(base(tiny_llama, 4), llama_adapter, adapter_name=name)


def test_unknown_config_fields_are_ignored_with_a_warning(llama_adapter):
    expected = logits(load_adapter(base(tiny_llama, 4), llama_adapter))
    edit_config(llama_adapter, future_option=3)
    with pytest.warns(UserWarning, match=r"ignoring unknown field\(s\) \['future_option'\]"):
        model = load_adapter(base(tiny_llama, 4), llama_adapter)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


def test_base_model_mismatch_warns(llama_adapter):
    edit_config(llama_adapter, base_model_name_or_path="org/other-model")
    model = base(tiny_llama, 4)
    model.config._name_or_path = "org/tiny-llama"
    with pytest.warns(UserWarning, match="saved for base model 'org/other-model'"):
        load_adapter(model, llama_adapter)
    hub_and_local = base(tiny_llama, 4)
    hub_and_local.config._name_or_path = "/cache/models/other-model"  # a local copy of the same repo
    edit_config(llama_adapter, base_model_name_or_path="org/other-model")
    load_adapter(hub_and_local, llama_adapter, strict=True)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(AdapterLoadError, match="not a local folder|neither a local folder"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")


# -- the Hub --------------------------------------------------------------------------------------


def test_load_from_the_hub_with_revision_and_token(local_hub, tmp_path):
    first, second = adapted("gpt2-plain", seed=1), adapted("gpt2-plain", seed=2)
    save_adapter(first, tmp_path / "v1")
    save_adapter(second, tmp_path / "v2")
    files = lambda d: {p.name: p.read_bytes() for p in d.iterdir()}  # noqa: E731
    v1 = local_hub.seed("alice/tiny-lora", files(tmp_path / "v1"), private=True)
    local_hub.seed(
        "alice/tiny-lora", {**files(tmp_path / "v2"), **{f"fr/{k}": v for k, v in files(tmp_path / "v1").items()}}
    )
    model = tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match="downloading it from the Hub failed"):
        load_adapter(model, "alice/tiny-lora")  # private: no token (checked before anything is cached)
    assert_untouched(model, before)
    loaded = load_adapter(tiny_gpt2().eval(), "alice/tiny-lora", token="hf_read_alice")
    torch.testing.assert_close(logits(loaded), logits(second), rtol=0, atol=1e-6)
    old = load_adapter(tiny_gpt2().eval(), "alice/tiny-lora", revision=v1, token="hf_read_alice")
    torch.testing.assert_close(logits(old), logits(first), rtol=0, atol=1e-6)
    fr = load_adapter(tiny_gpt2().eval(), "alice/tiny-lora", subfolder="fr", token="hf_read_alice")
    torch.testing.assert_close(logits(fr), logits(first), rtol=0, atol=1e-6)


# -- soft prompts, bottleneck adapters and combinations -------------------------------------------


def test_prompt_only_adapter_round_trip_in_peft_layout(tmp_path):
    model = perturb_trainable(prepare_model(tiny_llama(), bits=4, prompt=PromptTuningConfig(num_virtual_tokens=3)))
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING"
    assert (config["num_virtual_tokens"], config["token_dim"], config["num_transformer_submodules"]) == (3, 64, 1)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {"prompt_embeddings"}
    loaded = load_adapter(base(tiny_llama, 4), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)


def test_soft_prompt_of_the_wrong_width_is_refused(tmp_path):
    save_adapter(prepare_model(tiny_llama(), bits=None, prompt=PromptTuningConfig(num_virtual_tokens=3)), tmp_path)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    other = LlamaForCausalLM(config).eval()
    before = snapshot(other)
    with pytest.raises(AdapterLoadError, match="token_dim 64 .* hidden size 32"):
        load_adapter(other, tmp_path)
    assert_untouched(other, before)


def test_lora_with_bottleneck_and_prompt_keeps_the_lora_part_in_peft_files(tmp_path):
    model = prepare_model(
        tiny_llama(), bits=4, lora=LoraConfig(r=2, target_modules=["q_proj"]),
        bottleneck=BottleneckConfig(bottleneck_size=8), prompt=PromptTuningConfig(num_virtual_tokens=2),
    )  # fmt: skip
    perturb_trainable(model)
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES | EXTRA_FILES
    assert all(".lora_" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    extras = load_file(tmp_path / "hf_peft_plugin_adapter.safetensors")
    assert "prompt_embeddings" in extras
    assert "base_model.model.model.layers.0.bottleneck_attn.down.weight" in extras
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    files = [tmp_path / "adapter_model.safetensors", tmp_path / "hf_peft_plugin_adapter.safetensors"]
    assert sum(f.stat().st_size - header_size(f) for f in files) == trainable
    loaded = load_adapter(base(tiny_llama, 4), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)

    # Saving a LoRA-only adapter over it removes the extras, which would otherwise be loaded too.
    save_adapter(adapted("llama-4bit-dora"), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES


def test_bottleneck_only_adapter_round_trip(tmp_path):
    model = perturb_trainable(prepare_model(tiny_bert_classifier(), bits=None, bottleneck=BottleneckConfig(reduction_factor=8)))
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == EXTRA_FILES
    assert "base_model.model.classifier.weight" in load_file(tmp_path / "hf_peft_plugin_adapter.safetensors")
    loaded = load_adapter(tiny_bert_classifier().eval(), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=1e-6)


# -- merging --------------------------------------------------------------------------------------


def assert_plain(model: nn.Module, cls: type) -> None:
    assert type(model) is cls
    assert not hasattr(model, STATE_ATTRIBUTE) and "_hf_peft_config_loaded" not in vars(model)
    assert not any(
        isinstance(m, (LoraLinear, TrainableCopy, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules()
    )
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_and_unload_gives_a_plain_model_with_the_same_logits(case, tmp_path):
    model = adapted(case)
    expected = logits(model)
    merged = merge_and_unload(model, dtype=torch.float32)
    cls = {"llama-4bit-dora": LlamaForCausalLM, "gpt2-plain": GPT2LMHeadModel}.get(case)
    assert_plain(merged, cls or type(tiny_bert_classifier()))
    atol = 5e-3 if CASES[case][1] == 8 else 1e-5  # 8-bit matmuls quantize their inputs too
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=atol)
    if case == "gpt2-plain":
        assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    merged.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if cls else AutoModelForSequenceClassification
    reloaded = auto.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), logits(merged), rtol=0, atol=1e-6)


def test_merge_and_unload_to_bfloat16(tmp_path):
    merged = merge_and_unload(adapted("llama-4bit-dora"), dtype=torch.bfloat16)  # explicit: the default keeps the base's
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert merged.config.dtype == torch.bfloat16
    merged.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16


def test_merge_of_gpt2_quantized_by_transformers_rebuilds_conv1d(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, dtype=torch.float32)
    model = perturb_trainable(prepare_model(loaded, lora=LoraConfig(r=4, target_modules=["c_attn"])))
    expected = logits(model)
    merged = merge_and_unload(model, dtype=torch.float32)
    assert_plain(merged, GPT2LMHeadModel)
    assert all(isinstance(merged.transformer.h[0].mlp.get_submodule(n), Conv1D) for n in ("c_fc", "c_proj"))
    assert not hasattr(merged, "hf_quantizer")
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


def test_merge_keeps_the_trained_head_and_drops_inactive_adapters():
    model = adapted("bert-8bit-head")
    trained_head = model.classifier.modules_to_save["default"].weight.clone()
    add_adapter(model, "unused", lora=LoraConfig(r=2, target_modules=["key"]))
    merged = merge_and_unload(model, dtype=torch.float32)
    assert type(merged.classifier) is nn.Linear and torch.equal(merged.classifier.weight, trained_head)


def test_requantize_keeps_4bit_layers():
    model = adapted("llama-4bit-dora")
    expected = logits(model)
    merged = merge_and_unload(model, dtype=torch.float32, requantize=True)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert type(merged) is LlamaForCausalLM and not hasattr(merged, STATE_ATTRIBUTE)
    error = (logits(merged) - expected).abs()
    assert 0 < error.max() < 0.5 * expected.abs().max()  # a second rounding: close, not equal


def test_merge_unmerge_in_place_is_exact():
    model = perturb_trainable(prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=4, use_dora=True)))
    expected, weights = logits(model), {k: v.clone() for k, v in model.state_dict().items()}
    merge_adapters(model)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    unmerge_adapters(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model), expected)

    quantized = adapted("llama-4bit-dora")
    expected = logits(quantized)
    merge_adapters(quantized)  # requantized merge: approximate
    assert (logits(quantized) - expected).abs().max() < 0.5 * expected.abs().max()
    merged = merge_and_unload(quantized, dtype=torch.float32)  # folds from the original weights, once
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)


def test_unmergeable_adapters_raise_unless_kept(tmp_path):
    def with_bottleneck():
        model = prepare_model(
            tiny_llama(), bits=4, lora=LoraConfig(r=2), bottleneck=BottleneckConfig(bottleneck_size=4)
        )
        return perturb_trainable(model)

    model = with_bottleneck()
    before = snapshot(model)
    with pytest.raises(MergeError, match="cannot be folded"):
        merge_and_unload(model)
    assert_untouched(model, before)

    expected = logits(model)
    kept = merge_and_unload(model, dtype=torch.float32, keep_unmergeable=True)
    assert not any(isinstance(m, (LoraLinear, bnb.nn.Linear4bit)) for m in kept.modules())
    torch.testing.assert_close(logits(kept), expected, rtol=0, atol=1e-4)
    spec = kept._hf_peft_plugin_state.adapters["default"]
    assert spec.lora is None and spec.bottleneck is not None
    save_adapter(kept, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == EXTRA_FILES


def test_saving_the_same_adapter_twice_gives_identical_bytes(tmp_path):
    """Unchanged adapters must not make new Hub commits: the files are byte-for-byte stable."""
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4))
    for attempt in range(5):
        save_adapter(model, tmp_path / str(attempt))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        contents = {(tmp_path / str(i) / name).read_bytes() for i in range(5)}
        assert len(contents) == 1, name


# -- whole folders, integrity, pickling ---------------------------------------------------------


def test_saving_every_adapter_removes_those_the_model_no_longer_has(tmp_path):
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4))
    add_adapter(model, "fr", lora=LoraConfig(r=2, target_modules=["q_proj"]))
    add_adapter(model, "de", lora=LoraConfig(r=2, target_modules=["v_proj"]))
    save_adapter(model, tmp_path)
    save_adapter(adapted("llama-4bit-dora"), tmp_path / "checkpoint-10")  # not written as a named adapter: kept
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES | {"fr", "de", "checkpoint-10"}

    delete_adapter(model, "fr")
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES | {"de", "checkpoint-10"}
    save_adapter(model, tmp_path, adapter_name="de")  # one adapter: the others are left alone
    assert {p.name for p in tmp_path.iterdir()} == PEFT_FILES | {"de", "checkpoint-10"}
    delete_adapter(model, "default")
    save_adapter(model, tmp_path)  # no default any more: the top-level files go too
    assert {p.name for p in tmp_path.iterdir()} == {"de", "checkpoint-10"}


def test_nan_or_inf_weights_warn_naming_the_tensor_or_fail_with_strict(tmp_path):
    model = adapted("gpt2-plain")
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
        layer.lora_A["default"].weight[0, 0] = float("inf")
    save_adapter(model, tmp_path)
    with pytest.warns(UserWarning, match=r"NaN or infinite values in \['base_model\.model\.transformer\.h\.0"):
        load_adapter(tiny_gpt2(), tmp_path)
    plain = tiny_gpt2()
    before = snapshot(plain)
    with pytest.raises(AdapterLoadError, match=r"NaN or infinite.*lora_[AB]\.weight.*strict=True"):
        load_adapter(plain, tmp_path, strict=True)
    assert_untouched(plain, before)


def test_edited_scaling_fields_are_caught_but_editing_where_it_comes_from_is_fine(llama_adapter):
    edit_config(llama_adapter, base_model_name_or_path="/models/local-copy", revision="abc")
    load_adapter(base(tiny_llama, 4), llama_adapter, strict=True)
    edit_config(llama_adapter, lora_alpha=64)
    with pytest.warns(UserWarning, match="adapter_config.json is not the config that was saved with"):
        load_adapter(base(tiny_llama, 4), llama_adapter)
    with pytest.raises(AdapterLoadError, match="not the config that was saved"):
        load_adapter(base(tiny_llama, 4), llama_adapter, strict=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_save_of_a_prepared_model_round_trips(case, tmp_path):
    model = adapted(case)
    torch.save(model, tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    assert type(again) is type(model) and isinstance(again, CASES[case][0]().__class__)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    again.save_pretrained(tmp_path / "saved")  # still saves the adapter only
    assert PEFT_FILES <= {p.name for p in (tmp_path / "saved").iterdir()}
    assert type(pickle.loads(pickle.dumps(model))) is type(model)


def edit_extras(directory: Path, **changes) -> None:
    path = directory / "hf_peft_plugin_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            config[outer][inner] = value
        else:
            config[key] = value
    path.write_text(json.dumps(config))


MALFORMED = {  # what to write -> words the error must say
    "rank_pattern is a string": (lambda d: edit_config(d, rank_pattern="abc"), "rank_pattern must be a JSON object"),
    "rank not a number": (lambda d: edit_config(d, rank_pattern={"q_proj": "8"}), r"rank_pattern\['q_proj'\] must be"),
    "r is true": (lambda d: edit_config(d, r=True), "r must be a whole number >= 1; it is True"),
    "use_dora is a string": (lambda d: edit_config(d, use_dora="false"), "use_dora must be true or false"),
    "alpha_pattern is a list": (lambda d: edit_config(d, alpha_pattern=[1]), "alpha_pattern must be a JSON object"),
    "format is a string": (lambda d: edit_extras(d, hf_peft_plugin_format="1"), "must be a whole number"),
    "format is true": (lambda d: edit_extras(d, hf_peft_plugin_format=True), "it is True"),
    "format from the future": (lambda d: edit_extras(d, hf_peft_plugin_format=2), "format 2, newer than the format 1"),
    "layers is a string": (lambda d: edit_extras(d, **{"bottleneck.layers": "ab"}), "bottleneck.layers must be null"),
}


@pytest.mark.parametrize("problem", sorted(MALFORMED))
def test_malformed_config_values_are_clear_load_errors(problem, tmp_path):
    model = prepare_model(
        tiny_llama(), bits=None, lora=LoraConfig(r=4, target_modules=["q_proj"]), bottleneck=BottleneckConfig(layers=[0])
    )
    save_adapter(model, tmp_path)
    damage, message = MALFORMED[problem]
    damage(tmp_path)
    plain = tiny_llama()
    before = snapshot(plain)
    with pytest.raises(AdapterLoadError, match=message) as info:
        load_adapter(plain, tmp_path)
    assert "reads format 1" not in str(info.value)  # never "written in format 1; this version reads format 1"
    assert_untouched(plain, before)


def test_merge_and_unload_frees_each_replaced_quantized_layer_at_once():
    """bitsandbytes keeps a cycle (layer -> Params4bit -> layer): without breaking it, every old and
    merged 4-bit base stays alive until the garbage collector runs, on top of the new layers."""
    import gc
    import weakref

    for requantize in (False, True):
        model = adapted("llama-4bit-dora")
        merge_adapters(model)  # merged: each layer holds its original base and the requantized merge
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        refs = [weakref.ref(x) for m in layers for x in (m.base_layer, m._unmerged_base)]
        del layers
        gc.disable()
        try:
            merged = merge_and_unload(model, requantize=requantize)
            kept = {id(m) for m in merged.modules()}
            leaked = [r() for r in refs if r() is not None and id(r()) not in kept]
        finally:
            gc.enable()
        assert len(refs) == 28 and leaked == []


def test_merged_original_weight_moves_with_the_model():
    model = adapted("gpt2-plain")
    merge_adapters(model)
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    original = layer._original_weight.clone()
    assert "_original_weight" not in layer.state_dict()  # not saved
    model.to(torch.float64)
    assert layer._original_weight.dtype == torch.float64
    unmerge_adapters(model)
    assert layer.base_layer.weight.dtype == torch.float64
    assert torch.equal(layer.base_layer.weight, original.to(torch.float64))
