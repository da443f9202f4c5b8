"""Activation offloading: the same gradients as checkpointing alone, with the block inputs stored off the device."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_peft_plugin import ConfigError, LoraConfig, prepare_model
from hf_peft_plugin.offload import OFFLOAD_ATTRIBUTE
from tests.tiny_models import perturb_trainable, tiny_llama, token_batch, train_copy_task


def _grads(model):
    model.train()
    model.zero_grad(set_to_none=True)
    ids = token_batch(2, 12)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _prepared(offload: bool, bits: int | None = 4):
    model = prepare_model(
        tiny_llama(), bits=bits, lora=LoraConfig(r=4, alpha=8), gradient_checkpointing=True, offload_activations=offload
    )
    return perturb_trainable(model)


def test_gradients_bit_identical_to_checkpointing_without_offload(caplog):
    with caplog.at_level(logging.INFO, logger="hf_peft_plugin.offload"):
        offloaded = _prepared(True)
    assert any("CPU model" in r.getMessage() for r in caplog.records)
    stats = getattr(offloaded, OFFLOAD_ATTRIBUTE)
    stats.copy_host_tensors = True  # no accelerator here: copy host tensors too, so the copy path runs
    reference = _grads(_prepared(False))
    grads = _grads(offloaded)
    assert grads.keys() == reference.keys()
    for name in grads:
        assert torch.equal(grads[name], reference[name]), name
    hidden = 2 * 12 * offloaded.config.hidden_size * 4
    # each of the 2 checkpointed blocks stored its input hidden states through the hooks
    assert stats.packed >= offloaded.config.num_hidden_layers and stats.copied_bytes >= 2 * hidden


def test_trainer_reenabling_checkpointing_keeps_offload(tmp_path):
    model = _prepared(True, bits=None)
    stats = getattr(model, OFFLOAD_ATTRIBUTE)
    train_copy_task(model, tmp_path, steps=3, activation_checkpointing=True)
    assert stats.packed > 0  # the Trainer's activation_checkpointing_enable() left the offload in place
    plain = _prepared(False, bits=None)
    plain.activation_checkpointing_enable(offload=True)  # transformers' switch works on a CPU-only torch too
    assert getattr(plain, OFFLOAD_ATTRIBUTE).packed == 0
    _grads(plain)
    assert getattr(plain, OFFLOAD_ATTRIBUTE).packed > 0


def test_offload_needs_gradient_checkpointing():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="gradient_checkpointing=True"):
        prepare_model(model, bits=None, offload_activations=True)
    assert not hasattr(model, OFFLOAD_ATTRIBUTE) and type(model).__name__ == "LlamaForCausalLM"
    with pytest.raises(ConfigError, match="offload_activations must be True or False"):
        prepare_model(tiny_llama(), bits=None, gradient_checkpointing=True, offload_activations="yes")
