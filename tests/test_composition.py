"""Several named adapter sets on one backbone: isolation, composition, combination, bad names."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_peft_plugin import (
    AdapterNameError,
    BottleneckConfig,
    ConfigError,
    LoraConfig,
    PromptTuningConfig,
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    prepare_model,
    set_active_adapters,
    trainable_parameters,
)
from hf_peft_plugin.config import QuantizationConfig
from hf_peft_plugin.lora import LoraLinear
from hf_peft_plugin.model import combine_lora
from hf_peft_plugin.quantization import quantize_model
from hf_peft_plugin.targeting import adapter_layers

from tiny_models import tiny_bert_classifier, tiny_llama, token_batch, train_copy_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LORA = LoraConfig(r=4, alpha=8)
PROMPT = PromptTuningConfig(num_virtual_tokens=3)
BOTTLENECK = BottleneckConfig(reduction_factor=8)
Q_PROJ = "model.layers.0.self_attn.q_proj"


def everything(bits: int | None = 4, name: str = "a") -> nn.Module:
    torch.manual_seed(0)
    return prepare_model(tiny_llama(), bits=bits, adapter_name=name, lora=LORA, prompt=PROMPT, bottleneck=BOTTLENECK)


def parameters_of(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to adapter ``name``, found through the AdapterLayer protocol."""
    ids = {
        id(p)
        for _, layer in adapter_layers(model)
        if name in layer.adapter_names()
        for p in layer.adapter_parameters(name)
    }
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def randomize(model: nn.Module, name: str, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in parameters_of(model, name).values():
            p.normal_(0, 0.1)



def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- composition ---------------------------------------------------------------------------------


def test_lora_prompt_and_bottleneck_train_together_under_the_trainer(tmp_path):
    counts = {}
    for kind, kwargs in {
        "lora": {"lora": LORA},
        "prompt": {"prompt": PROMPT},
        "bottleneck": {"bottleneck": BOTTLENECK},
    }.items():
        counts[kind] = trainable_parameters(prepare_model(tiny_llama(), bits=4, **kwargs)).trainable
    model = everything()
    assert counts["prompt"] == 3 * 64
    assert trainable_parameters(model).trainable == sum(counts.values())
    losses = train_copy_task(model, tmp_path / "out")
    assert losses[-1] < losses[0] - 0.2, losses


def test_training_one_adapter_leaves_the_other_bit_for_bit_unchanged(tmp_path):
    model = everything(bits=None, name="b")
    add_adapter(model, "a", lora=LORA, prompt=PROMPT, bottleneck=BOTTLENECK)
    set_active_adapters(model, ["a"])
    b_before = {n: p.detach().clone() for n, p in parameters_of(model, "b").items()}
    a_before = {n: p.detach().clone() for n, p in parameters_of(model, "a").items()}
    assert len(b_before) == len(a_before) > 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(a_before)
    train_copy_task(model, tmp_path / "out", steps=6)
    for n, p in parameters_of(model, "b").items():
        assert torch.equal(p, b_before[n]), n
        assert p.grad is None and not p.requires_grad, n
    changed = [n for n, p in parameters_of(model, "a").items() if not torch.equal(p, a_before[n])]
    assert len(changed) == len(a_before)  # every part of a trained (LoRA A and B, prompt, bottleneck)


def test_two_lora_sets_on_one_layer_add_their_deltas_only_when_both_are_active():
    model = prepare_model(tiny_llama(), bits=None, adapter_name="a", lora=LORA)
    add_adapter(model, "b", lora=LoraConfig(r=2, alpha=2))
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    layer = model.get_submodule(Q_PROJ)
    x = torch.randn(3, 64)
    with torch.no_grad():
        with disable_adapters(model):
            base = layer(x)
        outputs = {}
        for active in (["a"], ["b"], ["a", "b"]):
            set_active_adapters(model, active)
            outputs["+".join(active)] = layer(x)
    delta_a, delta_b = (x @ layer.delta_weight(n).T for n in ("a", "b"))
    assert torch.allclose(outputs["a"], base + delta_a, atol=1e-6)
    assert torch.allclose(outputs["b"], base + delta_b, atol=1e-6)
    assert torch.allclose(outputs["a+b"], base + delta_a + delta_b, atol=1e-6)
    assert not torch.allclose(outputs["a"], outputs["a+b"])


def test_disable_adapters_gives_the_quantized_base_exactly():
    reference = copy.deepcopy(tiny_llama())
    quantize_model(reference, QuantizationConfig(bits=4), torch.float32)
    model = everything()
    randomize(model, "a")
    ids = token_batch()
    assert logits(model, ids).shape[1] == 3 + 12
    with disable_adapters(model):
        assert torch.equal(logits(model, ids), logits(reference, ids))
    set_active_adapters(model, [])
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_delete_adapter_removes_every_part_and_keeps_the_other():
    model = everything(bits=None, name="a")
    add_adapter(model, "b", lora=LORA, prompt=PROMPT, bottleneck=BOTTLENECK)
    randomize(model, "b")
    set_active_adapters(model, ["b"])
    ids = token_batch()
    with_b = logits(model, ids)
    delete_adapter(model, "a")
    assert not any(".a." in n or n.endswith(".a") for n, _ in model.named_parameters())
    assert active_adapters(model) == ["b"]
    assert torch.equal(logits(model, ids), with_b)
    delete_adapter(model, "b")
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model, ids), logits(tiny_llama(), ids))


def test_only_one_soft_prompt_can_be_active():
    model = everything(bits=None)
    add_adapter(model, "b", prompt=PROMPT)
    add_adapter(model, "c", bottleneck=BOTTLENECK)
    with pytest.raises(ConfigError, match=r"\['a', 'b'\] each carry a soft prompt"):
        set_active_adapters(model, ["a", "b"])
    assert active_adapters(model) == ["a"]
    set_active_adapters(model, ["a", "c"])  # one prompt, two bottlenecks: fine
    assert model(input_ids=token_batch()).logits.shape[1] == 3 + 12


# -- combine_lora --------------------------------------------------------------------------------


def two_loras(b_rank: int = 4, b_targets=("q_proj", "v_proj")) -> nn.Module:
    model = prepare_model(
        tiny_llama(), bits=None, adapter_name="a", lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    add_adapter(model, "b", lora=LoraConfig(r=b_rank, alpha=4, target_modules=list(b_targets)))
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoraLinear)}


def test_cat_reproduces_the_weighted_sum_of_deltas():
    model = two_loras(b_rank=2, b_targets=("q_proj",))
    combine_lora(model, {"a": 0.7, "b": 0.3}, name="mix", method="cat")
    for path, layer in lora_layers(model).items():
        expected = 0.7 * layer.delta_weight("a") + (0.3 * layer.delta_weight("b") if "b" in layer.r else 0)
        assert torch.allclose(layer.delta_weight("mix"), expected, atol=1e-7, rtol=1e-5), path
        assert layer.r["mix"] == (6 if path.endswith("q_proj") else 4)
    spec = model._hf_peft_plugin_state.adapters["mix"]
    assert spec.lora.r == 6 and set(spec.lora.rank_pattern.values()) == {4}
    assert all(
        spec.lora.scaling_for(p) == 1.0 and spec.lora.rank_for(p) == lora_layers(model)[p].r["mix"]
        for p in spec.lora_targets
    )
    assert active_adapters(model) == ["a"]  # the mix starts inactive, and frozen
    assert not any(p.requires_grad for p in parameters_of(model, "mix").values())


def test_cat_with_unit_weights_equals_both_adapters_active():
    model = two_loras()
    combine_lora(model, {"a": 1.0, "b": 1.0}, name="mix")
    ids = token_batch()
    set_active_adapters(model, ["a", "b"])
    both = logits(model, ids)
    set_active_adapters(model, ["mix"])
    assert torch.allclose(logits(model, ids), both, atol=1e-5)


def test_linear_averages_a_and_b_which_is_not_the_weighted_sum_of_deltas():
    model = two_loras()
    combine_lora(model, {"a": 0.7, "b": 0.3}, name="mix", method="linear")
    combine_lora(model, {"a": 0.5}, name="a_half", method="linear")
    layer = lora_layers(model)[Q_PROJ]
    a, b = ({n: getattr(layer, f"lora_{m}")[n].weight for n in ("a", "b")} for m in ("A", "B"))
    ca, cb = (0.7 * layer.scaling["a"]) ** 0.5, (0.3 * layer.scaling["b"]) ** 0.5
    expected = (ca * b["a"] + cb * b["b"]) @ (ca * a["a"] + cb * a["b"])
    assert layer.r["mix"] == 4
    assert torch.allclose(layer.delta_weight("mix"), expected, atol=1e-6)
    weighted_sum = 0.7 * layer.delta_weight("a") + 0.3 * layer.delta_weight("b")
    assert not torch.allclose(layer.delta_weight("mix"), weighted_sum, atol=1e-3)
    assert torch.allclose(layer.delta_weight("a_half"), 0.5 * layer.delta_weight("a"), atol=1e-6)


def test_combine_lora_bad_input_changes_nothing():
    model = two_loras(b_rank=2)
    add_adapter(model, "p", prompt=PROMPT)
    add_adapter(model, "dora", lora=LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    before = set(model.state_dict())
    cases = [
        (AdapterNameError, "already exists", dict(weights={"a": 1.0}, name="b")),
        (AdapterNameError, "not allowed", dict(weights={"a": 1.0}, name="x/y")),
        (AdapterNameError, "Unknown adapter 'zzz'", dict(weights={"a": 1.0, "zzz": 1.0}, name="mix")),
        (ConfigError, "method must be 'cat' or 'linear'", dict(weights={"a": 1.0}, name="mix", method="svd")),
        (ConfigError, "needs the adapters to combine", dict(weights={}, name="mix")),
        (ConfigError, "finite number", dict(weights={"a": float("nan")}, name="mix")),
        (ConfigError, "needs equal ranks", dict(weights={"a": 0.5, "b": 0.5}, name="mix", method="linear")),
        (ConfigError, r"'p' has \['prompt'\]", dict(weights={"a": 0.5, "p": 0.5}, name="mix")),
        (ConfigError, "with DoRA", dict(weights={"dora": 1.0}, name="mix")),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            combine_lora(model, **kwargs)
    assert set(model.state_dict()) == before
    assert list(model._hf_peft_plugin_state.adapters) == ["a", "b", "p", "dora"]


def test_combine_lora_refuses_two_trained_heads():
    model = prepare_model(tiny_bert_classifier(), bits=None, adapter_name="a", lora=LORA)
    add_adapter(model, "b", lora=LORA)
    with pytest.raises(ConfigError, match=r"each train their own copy of \['classifier'\]"):
        combine_lora(model, {"a": 0.5, "b": 0.5}, name="mix")
    add_adapter(model, "c", lora=LoraConfig(r=4, modules_to_save=()))
    randomize(model, "a")
    combine_lora(model, {"a": 1.0, "c": 0.0}, name="mix")
    head = model.classifier.modules_to_save
    assert torch.equal(head["mix"].weight, head["a"].weight)  # a's trained head is carried over


# -- names -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/b", "a\\b", "../up", "..", "", "with space", ".hidden"])
def test_adapter_names_with_path_separators_are_rejected(name):
    model = everything(bits=None)
    with pytest.raises(AdapterNameError, match="not allowed"):
        add_adapter(model, name, lora=LORA)
    with pytest.raises(AdapterNameError, match="not allowed"):
        prepare_model(tiny_llama(), bits=None, adapter_name=name, lora=LORA)


@pytest.mark.parametrize("name", ["v1.2", "train", "half"])
def test_names_that_cannot_be_module_keys_are_rejected_before_anything_is_built(name):
    model = everything(bits=None)
    layers_before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(AdapterNameError):
        add_adapter(model, name, lora=LORA)
    assert {n: type(m) for n, m in model.named_modules()} == layers_before


def test_existing_and_unknown_names_are_rejected():
    model = everything(bits=None)
    with pytest.raises(AdapterNameError, match="'a' already exists"):
        add_adapter(model, "a", bottleneck=BOTTLENECK)
    with pytest.raises(AdapterNameError, match=r"Unknown adapter\(s\) \['nope'\]"):
        set_active_adapters(model, ["a", "nope"])
    with pytest.raises(AdapterNameError, match="Unknown adapter 'nope'"):
        delete_adapter(model, "nope")
    assert active_adapters(model) == ["a"]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(bottleneck=BottleneckConfig(reduction_factor=100)), ConfigError),
        (dict(lora=LORA, bottleneck=BottleneckConfig(layers=[7])), ConfigError),
        (dict(lora=LORA, prompt=PromptTuningConfig(num_virtual_tokens=500)), ConfigError),
    ],
)
def test_a_failed_add_adapter_leaves_the_model_as_it_was(kwargs, error):
    model = everything(bits=None)
    keys, modules = set(model.state_dict()), [type(m) for m in model.modules()]
    with pytest.raises(error):
        add_adapter(model, "new", **kwargs)
    assert set(model.state_dict()) == keys and [type(m) for m in model.modules()] == modules
    assert list(model._hf_peft_plugin_state.adapters) == ["a"]
