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
