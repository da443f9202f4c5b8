"""Serving a trained adapter: merging keeps the base's dtype (peft's merge as the comparator)."""

from __future__ import annotations

import pytest
import torch

from hf_peft_plugin import LoraConfig, merge_and_unload, prepare_model, save_adapter

from tiny_models import perturb_trainable, tiny_llama, token_batch


def logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=token_batch() if ids is None else ids).logits.float()


def test_merge_keeps_a_float32_base_in_float32_and_matches_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = perturb_trainable(prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=4, alpha=8)))
    save_adapter(model, tmp_path)
    merged = merge_and_unload(model)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert merged.config.dtype == torch.float32
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).merge_and_unload().eval()
    assert (logits(merged) - logits(theirs)).abs().max() <= 1e-5


def test_merge_keeps_a_bf16_4bit_base_in_bf16_norms_included():
    model = perturb_trainable(prepare_model(tiny_llama().to(torch.bfloat16), bits=4, lora=LoraConfig(r=4)))
    assert {p.dtype for n, p in model.named_parameters() if "norm" in n} == {torch.float32}  # prepare upcast them
    merged = merge_and_unload(model)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_merge_of_a_4bit_base_keeps_its_unquantized_dtype_and_an_explicit_dtype_wins():
    model = perturb_trainable(prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4)))
    expected = logits(model)
    merged = merge_and_unload(model)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    assert (logits(merged) - expected).abs().max() <= 1e-5
    half = merge_and_unload(perturb_trainable(prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4))), dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


# -- loading for inference in one call ------------------------------------------------------------


@pytest.fixture
def trained(tmp_path):
    """A tiny Llama on disk, trained (perturbed) as a 4-bit FP4 model without double quantization,
    and its saved adapter."""
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    model = perturb_trainable(
        prepare_model(base, bits=4, quant_type="fp4", double_quant=False, lora=LoraConfig(r=4, alpha=8))
    )
    save_adapter(model, tmp_path / "adapter")
    return base, tmp_path / "adapter", model


def test_load_pretrained_quantizes_the_base_as_recorded_and_gives_the_trained_logits(trained):
    import bitsandbytes as bnb
    from hf_peft_plugin import load_pretrained
    from hf_peft_plugin.inference import recorded_quantization

    base, adapter, model = trained
    assert recorded_quantization(adapter) == {
        "bits": 4, "quant_type": "fp4", "double_quant": False, "compute_dtype": torch.float32,
    }
    loaded = load_pretrained(base, adapter)
    assert not loaded.training
    layer = loaded.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "fp4"
    assert layer.weight.quant_state.nested is False
    assert torch.equal(logits(loaded), logits(model.eval()))
    generated = loaded.generate(input_ids=token_batch(1, 5), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


def test_load_pretrained_from_the_hub_with_the_recorded_base(trained, hub_api):
    from hf_peft_plugin import load_pretrained

    base, adapter, model = trained
    hub_api.create_repo("alice/tiny-lora")
    hub_api.upload_folder(repo_id="alice/tiny-lora", folder_path=str(adapter))
    loaded = load_pretrained(None, "alice/tiny-lora", token="hf_write_alice")  # base: the recorded path
    assert torch.equal(logits(loaded), logits(model.eval()))


def test_load_pretrained_warns_when_told_other_bits_and_checks_the_architecture(trained, tmp_path):
    import bitsandbytes as bnb
    from hf_peft_plugin import AdapterLoadError, load_pretrained

    from tiny_models import tiny_qwen2

    base, adapter, _ = trained
    with pytest.warns(UserWarning, match=r"trained with bits=4; loading with bits=8 as you asked"):
        loaded = load_pretrained(base, adapter, bits=8)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear8bitLt)

    other = tmp_path / "qwen2"
    tiny_qwen2().save_pretrained(other)
    with pytest.raises(AdapterLoadError, match="saved from a LlamaForCausalLM, this model is a Qwen2ForCausalLM"):
        load_pretrained(other, adapter, strict=True)
    with pytest.warns(UserWarning, match="may not fit this model"):
        load_pretrained(other, adapter)


def test_load_adapter_on_a_freshly_prepared_model_names_load_pretrained(trained):
    from hf_peft_plugin import AdapterNameError, load_adapter

    base, adapter, _ = trained
    with pytest.raises(AdapterNameError, match=r"use load_pretrained\(base_path, adapter_dir\)"):
        load_adapter(prepare_model(base, bits=4), adapter)
