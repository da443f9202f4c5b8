"""LoRA dropout on CPU (:mod:`hf_peft_plugin.dropout`): the same distribution as ``nn.Dropout``
from a quarter of the random draws, a bool mask, seeded and replayed by checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hf_peft_plugin import LoraConfig, prepare_model
from hf_peft_plugin.dropout import LoraDropout, keep_mask
from hf_peft_plugin.lora import LoraLinear
from tiny_models import tiny_llama

N = 1 << 22


@pytest.mark.parametrize(
    "p",
    [
        0.05,
        12.5 / 256,  # half-way between two byte levels: only right if tied bytes are refined
        0.25,  # a multiple of 1/256: no refinement, ties are kept
        0.5,
        0.9,
    ],
)
def test_each_element_is_dropped_with_probability_p(p):
    torch.manual_seed(0)
    keep = keep_mask((N,), p)
    assert keep.dtype == torch.bool and keep.shape == (N,)
    # Each byte of a 64-bit draw feeds one element: every lane must be uniform (the top bit too).
    lanes = (~keep).view(-1, 8).double().mean(0)
    lane_error = 5 * math.sqrt(p * (1 - p) / (N / 8))
    assert (lanes - p).abs().max().item() < lane_error, lanes
    overall = (~keep).double().mean().item()
    assert abs(overall - p) < 5 * math.sqrt(p * (1 - p) / N), overall


def test_tied_bytes_get_their_own_draw():
    # At 12.5/256 an element whose byte equals 12 is dropped half the time: kept always would give
    # 12/256, dropped always 13/256, both ~18 standard errors from 12.5/256 at this size.
    torch.manual_seed(1)
    drops = (~keep_mask((N,), 12.5 / 256)).double().mean().item()
    assert abs(drops - 12.5 / 256) < abs(drops - 12 / 256) / 4
    assert abs(drops - 12.5 / 256) < abs(drops - 13 / 256) / 4


@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (9,), (2, 0, 4)])
def test_any_shape(shape):
    keep = keep_mask(shape, 0.3)
    assert keep.shape == shape


def test_masks_are_seeded_and_independent():
    torch.manual_seed(7)
    first, second = keep_mask((4096,), 0.3), keep_mask((4096,), 0.3)
    torch.manual_seed(7)
    assert torch.equal(keep_mask((4096,), 0.3), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_backward_scale_the_kept_elements(dtype):
    p = 0.2
    dropout = LoraDropout(p).train()
    x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
    out = dropout(x)
    assert out.dtype == dtype
    kept = out != 0
    assert 0.7 < kept.float().mean().item() < 0.9
    torch.testing.assert_close(out[kept], x[kept] * (1 / (1 - p)), rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(kept, grad * (1 / (1 - p)), 0), rtol=0, atol=0)


def test_only_a_bool_mask_is_saved():
    saved: list[torch.dtype] = []

    def pack(t):
        saved.append(t.dtype)
        return t

    x = torch.randn(32, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        LoraDropout(0.1).train()(x)
    assert saved == [torch.bool]


def test_eval_and_zero_p_are_the_identity():
    x = torch.randn(8, 8)
    assert LoraDropout(0.5).eval()(x) is x
    assert torch.equal(LoraDropout(0.0).train()(x), x)


def _lora_grads(gradient_checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = prepare_model(
        tiny_llama(),
        bits=4,
        lora=LoraConfig(r=4, alpha=8, dropout=0.3, target_modules="all-linear"),
        gradient_checkpointing=gradient_checkpointing,
    )
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    assert isinstance(layer.lora_dropout["default"], LoraDropout)
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointing_replays_the_masks():
    # Checkpointing restores the RNG state before it recomputes a block, so the recompute draws the
    # masks of the forward; different masks would show as different LoRA gradients.
    plain, checkpointed = _lora_grads(False), _lora_grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for n, g in plain.items() if "lora_B" in n)


def test_same_distribution_as_nn_dropout_on_a_layer_input():
    # The LoRA hidden's mean over many draws matches nn.Dropout's: the scale is 1 / (1 - p).
    torch.manual_seed(0)
    x, weight = torch.randn(16, 32), torch.randn(4, 32)
    ours = torch.stack([LoraDropout(0.4).train()(x) @ weight.t() for _ in range(4000)]).mean(0)
    theirs = torch.stack([nn.Dropout(0.4).train()(x) @ weight.t() for _ in range(4000)]).mean(0)
    exact = x @ weight.t()
    assert (ours - exact).abs().max() < 0.35 and (theirs - exact).abs().max() < 0.35
