"""Bottleneck adapters: placement discovered from the block structure, identity at init, training."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from hf_peft_plugin import (
    BottleneckConfig,
    ConfigError,
    LoraConfig,
    TargetModulesError,
    add_adapter,
    disable_adapters,
    prepare_model,
    set_active_adapters,
    trainable_parameters,
)
from hf_peft_plugin.bottleneck import BottleneckAdapter, insertion_points
from hf_peft_plugin.config import QuantizationConfig
from hf_peft_plugin.lora import LoraLinear
from hf_peft_plugin.quantization import quantize_model

from tiny_models import CAUSAL_LMS, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ALL_MODELS = {**CAUSAL_LMS, "bert": tiny_bert_classifier}
HIDDEN = 64
#: The sub-layer each placement adapts, per architecture (relative to the block).
SUBLAYERS = {
    "llama": ("self_attn", "mlp"),
    "qwen2": ("self_attn", "mlp"),
    "mistral": ("self_attn", "mlp"),
    "gpt2": ("attn", "mlp"),
    "bert": ("attention.output.dropout", "output.dropout"),
}
BLOCKS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "gpt2": "transformer.h",
    "bert": "bert.encoder.layer",
}


def adapters(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {path: m for path, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def randomize(model: nn.Module, name: str = "default") -> None:
    """Give the adapter non-zero up-projections, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in adapters(model).values():
            for p in module.adapter_parameters(name):
                p.normal_(0, 0.2)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", sorted(ALL_MODELS))
def test_output_equals_the_base_model_at_init_and_sits_on_the_right_sublayers(arch):
    model = prepare_model(ALL_MODELS[arch](), bits=None, bottleneck=BottleneckConfig(reduction_factor=8)).eval()
    ids = token_batch()
    assert torch.equal(logits(model, ids), logits(ALL_MODELS[arch](), ids))
    attn, ffn = SUBLAYERS[arch]
    expected = [f"{BLOCKS[arch]}.{i}.{sub}" for i in range(2) for sub in (attn, ffn)]
    assert [p.sublayer for p in insertion_points(model, BottleneckConfig())] == expected
    assert sorted(adapters(model)) == sorted(
        f"{BLOCKS[arch]}.{i}.bottleneck_{kind}" for i in range(2) for kind in ("attn", "ffn")
    )
    randomize(model)
    assert not torch.allclose(logits(model, ids), logits(ALL_MODELS[arch](), ids))


def test_base_module_paths_do_not_change():
    base = tiny_llama()
    before = set(base.state_dict())
    model = prepare_model(base, bits=None, bottleneck=BottleneckConfig())
    after = set(model.state_dict())
    assert before <= after
    assert all(".bottleneck_" in key for key in after - before)


@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("arch, sublayer", [("llama", "model.layers.1.mlp"), ("gpt2", "transformer.h.0.attn")])
def test_adapter_is_residual_on_the_sublayer_output(arch, sublayer, non_linearity):
    config = BottleneckConfig(bottleneck_size=5, non_linearity=non_linearity)
    model = prepare_model(ALL_MODELS[arch](), bits=None, bottleneck=config).eval()
    randomize(model)
    target = model.get_submodule(sublayer)
    block = model.get_submodule(sublayer.rpartition(".")[0])
    adapter = block.bottleneck_attn if sublayer.endswith("attn") else block.bottleneck_ffn
    seen = {}
    target.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs), with_kwargs=True)
    target.register_forward_hook(lambda m, args, out: seen.update(out=out))  # runs after the adapter's hook
    with torch.no_grad():
        model(input_ids=token_batch(), use_cache=False)
        base = target.forward(*seen["args"], **seen["kwargs"])  # .forward skips the hooks
        adapted, base = (seen["out"][0], base[0]) if isinstance(base, tuple) else (seen["out"], base)
        act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[non_linearity]
        expected = base + adapter.up["default"](act(adapter.down["default"](base)))
    assert adapter.down["default"].out_features == 5
    assert torch.allclose(adapted, expected, atol=1e-6)


def test_placement_layers_and_width():
    houlsby = prepare_model(tiny_llama(), bits=None, bottleneck=BottleneckConfig(reduction_factor=16))
    pfeiffer = prepare_model(
        tiny_llama(), bits=None, bottleneck=BottleneckConfig(placement="pfeiffer", bottleneck_size=3)
    )
    one_layer = prepare_model(tiny_llama(), bits=None, bottleneck=BottleneckConfig(layers=[1], reduction_factor=4))
    assert sorted(adapters(pfeiffer)) == ["model.layers.0.bottleneck_ffn", "model.layers.1.bottleneck_ffn"]
    assert sorted(adapters(one_layer)) == ["model.layers.1.bottleneck_attn", "model.layers.1.bottleneck_ffn"]

    def per_point(width: int) -> int:
        return HIDDEN * width + width + width * HIDDEN + HIDDEN  # down and up, with biases

    assert trainable_parameters(houlsby).trainable == 4 * per_point(HIDDEN // 16)
    assert trainable_parameters(pfeiffer).trainable == 2 * per_point(3)
    assert trainable_parameters(one_layer).trainable == 2 * per_point(HIDDEN // 4)
    assert all(p.dtype == torch.float32 for p in houlsby.parameters() if p.requires_grad)


def test_disable_and_inactive_give_the_base_model_exactly():
    model = prepare_model(tiny_gpt2(), bits=None, bottleneck=BottleneckConfig(reduction_factor=8)).eval()
    randomize(model)
    ids = token_batch()
    base = logits(tiny_gpt2(), ids)
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    set_active_adapters(model, [])
    assert torch.equal(logits(model, ids), base)
    set_active_adapters(model, ["default"])
    assert not torch.allclose(logits(model, ids), base)


def test_4bit_backbone_equals_quantized_base_at_init_and_trains():
    reference = copy.deepcopy(tiny_llama())
    quantize_model(reference, QuantizationConfig(bits=4), torch.float32)
    model = prepare_model(tiny_llama(), bits=4, bottleneck=BottleneckConfig(reduction_factor=4)).eval()
    ids = token_batch()
    assert torch.equal(logits(model, ids), logits(reference, ids))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(m.up["default"].weight.grad.abs().sum() > 0 for m in adapters(model).values())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # The frozen random head caps how confident any adapter can make the tiny model.
    assert losses[-1] < losses[0] - 0.2, losses


def test_bert_classifier_trains_every_adapter():
    model = prepare_model(tiny_bert_classifier(), bits=None, bottleneck=BottleneckConfig(reduction_factor=8)).train()
    labels = torch.tensor([0, 1])
    model(input_ids=token_batch(), labels=labels).loss.backward()
    for module in adapters(model).values():
        assert module.up["default"].weight.grad.abs().sum() > 0
    assert model.classifier.modules_to_save["default"].weight.grad is not None  # the task head trains too


def test_lora_added_later_leaves_the_bottleneck_projections_alone():
    model = prepare_model(tiny_llama(), bits=None, bottleneck=BottleneckConfig(reduction_factor=8))
    add_adapter(model, "lora", lora=LoraConfig(r=2, target_modules="all-linear"))
    wrapped = [path for path, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped and not any("bottleneck" in path for path in wrapped)
    assert "model.layers.0.mlp.down_proj" in wrapped


# -- bad input -------------------------------------------------------------------------------------


def test_zero_width_bottleneck_is_rejected_before_changing_the_model():
    base = tiny_llama()
    with pytest.raises(ConfigError, match="zero-width bottleneck: hidden_size 64 // reduction_factor 128"):
        prepare_model(base, bits=4, bottleneck=BottleneckConfig(reduction_factor=128))
    assert not adapters(base) and type(base.model.layers[0].mlp.up_proj) is nn.Linear
    with pytest.raises(ConfigError, match="bottleneck_size"):
        BottleneckConfig(bottleneck_size=0)


def test_layers_out_of_range_are_rejected():
    with pytest.raises(ConfigError, match=r"blocks \[2\] that do not exist.*0 to 1"):
        prepare_model(tiny_llama(), bits=None, bottleneck=BottleneckConfig(layers=[0, 2]))


def test_model_without_discoverable_blocks_names_its_type():
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16))
    with pytest.raises(TargetModulesError, match="t5"):
        prepare_model(t5, bits=None, bottleneck=BottleneckConfig())
    assert not adapters(t5)
