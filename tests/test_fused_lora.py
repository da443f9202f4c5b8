"""The fused LoRA path (base + LoRA as one autograd node) computes what the unfused path computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_peft_plugin import LoraConfig, prepare_model
from hf_peft_plugin import lora as lora_module
from hf_peft_plugin.config import QuantizationConfig
from hf_peft_plugin.lora import LoraLinear
from hf_peft_plugin.quantization import frozen_dense_weight, quantized_layer
from tiny_models import perturb_trainable, tiny_llama, token_batch


def _layer(bits: int | None, bias: bool, dropout: float) -> LoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(32, 48, bias=bias).requires_grad_(False)
    if bits is not None:
        base = quantized_layer(base, QuantizationConfig(bits=bits), torch.float32)
    layer = LoraLinear(base)
    for name, r in (("a", 4), ("b", 2)):
        layer.add_adapter(name, r=r, scaling=2.0 / r, dropout=dropout)
        nn.init.normal_(layer.lora_B[name].weight, std=0.1)
    layer.set_active_adapters(["a", "b"])
    return layer.train()


def _run(layer: LoraLinear, x: torch.Tensor, fused: bool, monkeypatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    monkeypatch.setattr(lora_module, "FUSED", fused)
    layer.zero_grad()
    x = x.clone().requires_grad_()
    torch.manual_seed(1)  # the same dropout masks on both paths
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), {"x": x.grad, **grads}


@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_path_matches_the_unfused_one(bits, bias, dropout, monkeypatch):
    layer = _layer(bits, bias, dropout)
    assert frozen_dense_weight(layer.base_layer, torch.zeros(2, 32)) is not None
    x = torch.randn(3, 5, 32)
    out_ref, grads_ref = _run(layer, x, False, monkeypatch)
    out, grads = _run(layer, x, True, monkeypatch)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    assert set(grads) == set(grads_ref) and len(grads) == 5  # x, and A and B of both adapters
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_fused_path_applies_only_where_it_is_exact():
    x = torch.zeros(2, 32)
    linear = nn.Linear(32, 48).requires_grad_(False)
    assert frozen_dense_weight(linear, x) is not None
    assert frozen_dense_weight(linear, x.bfloat16()) is None  # half-precision compute: unfused
    int8 = quantized_layer(linear, QuantizationConfig(bits=8), torch.float32)
    assert frozen_dense_weight(int8.train(), x) is not None  # CPU training: bitsandbytes dequantizes too
    assert frozen_dense_weight(int8.eval(), x) is None  # eval: bitsandbytes' int8 kernel, run as is
    assert frozen_dense_weight(int8.train(), x.to("meta")) is None  # other devices: the same
    assert frozen_dense_weight(quantized_layer(linear, QuantizationConfig(bits=4), torch.bfloat16), x) is None
    assert frozen_dense_weight(nn.Linear(32, 48), x) is None  # a trainable weight
    layer = _layer(4, False, 0.0)
    calls = []
    original = layer.base_layer.forward
    layer.base_layer.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    layer(torch.randn(2, 32, requires_grad=True))
    assert calls == []  # fused: the bitsandbytes layer's own forward is not called
    with torch.no_grad():
        layer(torch.randn(2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(2, 32, requires_grad=True))
    assert calls == [1, 1]  # no grad, or autocast: the layer as is


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_fused_training_step_equals_unfused(gradient_checkpointing, monkeypatch):
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4, dropout=0.0), gradient_checkpointing=gradient_checkpointing)
    model = perturb_trainable(model).train()
    ids = token_batch()
    results = []
    for fused in (False, True):
        monkeypatch.setattr(lora_module, "FUSED", fused)
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_ref, grads_ref), (loss, grads) = results
    torch.testing.assert_close(loss, loss_ref, atol=1e-6, rtol=0)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-5, rtol=1e-4, msg=name)
