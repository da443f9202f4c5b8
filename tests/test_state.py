"""Adapter state and plan-then-apply: each check runs before the model changes, and layer
defects found in review (issue 14) stay fixed."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from torch import nn

import hf_peft_plugin as hp
from hf_peft_plugin import ConfigError, LoraConfig, MergeError, NotATransformersModelError, prepare_model
from hf_peft_plugin.lora import LoraLinear
from hf_peft_plugin.state import require_state
from hf_peft_plugin.targeting import adapter_layers

from tiny_models import tiny_bert_classifier, tiny_llama, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def module_types(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules()]


def lora_names(model: nn.Module) -> dict[str, list[str]]:
    return {p: list(m.lora_A) for p, m in model.named_modules() if isinstance(m, LoraLinear)}


def train_lora_b(model: nn.Module, std: float = 0.3) -> None:
    """Move every LoRA away from identity, as training would."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std)


# -- refused up front, the model untouched ---------------------------------------------------------


def test_a_plain_torch_module_is_refused_before_quantizing():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(NotATransformersModelError, match="PreTrainedModel"):
        prepare_model(model, bits=4)
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]


def test_pissa_on_a_quantized_base_is_refused_before_anything_changes(tmp_path):
    model = tiny_llama()
    before = module_types(model)
    with pytest.raises(ConfigError, match="pissa"):
        prepare_model(model, bits=4, lora=LoraConfig(init="pissa"))
    assert module_types(model) == before  # neither quantized nor wrapped
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="pissa"):
        prepare_model(str(tmp_path), bits=4, lora=LoraConfig(init="pissa"))
    prepared = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=2))
    layers = lora_names(prepared)
    with pytest.raises(ConfigError, match="pissa"):
        hp.add_adapter(prepared, "p", lora=LoraConfig(init="pissa"))
    assert lora_names(prepared) == layers and list(require_state(prepared).adapters) == ["default"]


def test_add_adapter_on_a_merged_model_is_refused_before_attaching():
    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=2))
    hp.merge_adapters(model)
    layers = lora_names(model)
    with pytest.raises(MergeError, match="unmerge_adapters"):
        hp.add_adapter(model, "b", lora=LoraConfig(r=2))
    assert lora_names(model) == layers and list(require_state(model).adapters) == ["default"]


# -- layer numerics --------------------------------------------------------------------------------


def test_pissa_with_dora_is_the_identity_at_init():
    base, ids = tiny_llama(), token_batch()
    model = prepare_model(copy.deepcopy(base), bits=None, lora=LoraConfig(r=4, init="pissa", use_dora=True))
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-4, atol=1e-4)


def test_trainable_copy_exposes_the_trained_head():
    model = prepare_model(tiny_bert_classifier(), bits=None, lora=LoraConfig(r=2))
    head = model.classifier
    trained = head.modules_to_save["default"]
    assert head.weight is trained.weight and head.weight.requires_grad
    with hp.disable_adapters(model):
        assert head.weight is head.original_module.weight


# -- devices ---------------------------------------------------------------------------------------


def test_device_map_names_its_device_type(tmp_path):
    from hf_peft_plugin.model import device_map_type

    assert device_map_type("cpu") == device_map_type({"": "cpu"}) == device_map_type(None) == "cpu"
    assert device_map_type(torch.device("cpu")) == device_map_type({"a": "cpu", "b": "disk"}) == "cpu"
    assert device_map_type("cuda:1") == device_map_type(0) == "cuda"
    assert device_map_type("mps") == "mps" and device_map_type({"a": "cpu", "b": "xpu:0"}) == "xpu"
    with pytest.raises(ConfigError, match="device_map"):
        device_map_type("gpu please")
    # A CPU map spelled another way loads here (it used to be taken for CUDA and refused).
    tiny_llama().save_pretrained(tmp_path)
    model = prepare_model(str(tmp_path), bits=4, lora=LoraConfig(r=2), device_map={"": torch.device("cpu")})
    assert require_state(model).compute_dtype in (torch.float32, torch.bfloat16)
    assert logits(model, token_batch()).isfinite().all()


# -- configs and the planner -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0, True, "16"])
def test_alpha_pattern_values_are_checked_like_alpha(bad):
    with pytest.raises(ConfigError, match="alpha"):
        LoraConfig(alpha_pattern={"q_proj": bad})
    with pytest.raises(ConfigError, match="alpha"):
        LoraConfig(alpha=bad)


@pytest.mark.parametrize("bad", [float("nan"), 4.0, 0, True, "8"])
def test_rank_pattern_values_are_checked_like_r(bad):
    with pytest.raises(ConfigError, match="rank_pattern"):
        LoraConfig(rank_pattern={"q_proj": bad})


def test_patterns_must_be_dicts():
    with pytest.raises(ConfigError, match="rank_pattern must be a dict"):
        LoraConfig(rank_pattern="abc")
    with pytest.raises(ConfigError, match="alpha_pattern must be a dict"):
        LoraConfig(alpha_pattern=["q_proj"])


def test_memory_estimate_reads_the_active_adapter_whatever_its_name():
    from hf_peft_plugin.memory import _block
    from hf_peft_plugin.targeting import linear_layers

    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=4, use_dora=True), adapter_name="mine")
    block = _block(model, "model.layers.0", linear_layers(model), [])
    assert {lin.rank for lin in block.linears} == {4} and all(lin.dora for lin in block.linears)


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", -64), ("num_hidden_layers", 1e9), ("num_hidden_layers", 10**9), ("vocab_size", 0)],
)
def test_planner_refuses_hostile_dimensions_quickly(tmp_path, capsys, field, value):
    from hf_peft_plugin.cli import main

    config = tiny_llama().config.to_dict()
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    assert main(["plan", str(tmp_path), "--budget", "8GiB"]) == 2
    assert main(["estimate", str(tmp_path)]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert field in err and "positive integer" in err


def test_planner_reports_other_config_failures_as_exit_2(tmp_path, capsys):
    from hf_peft_plugin.cli import main

    config = tiny_llama().config.to_dict()
    config["num_attention_heads"] = 7  # 64 is not a multiple of 7: transformers refuses the config
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["estimate", str(tmp_path)]) == 2
    assert "invalid" in capsys.readouterr().err


# -- AdapterState is the single source -------------------------------------------------------------


@pytest.mark.parametrize("bits", [None, 4])
def test_disabled_means_the_base_even_when_merged(bits):
    ids = token_batch()
    model = prepare_model(tiny_llama(), bits=bits, lora=LoraConfig(r=4))
    with hp.disable_adapters(model):
        base = logits(model, ids)
    train_lora_b(model)
    adapted = logits(model, ids)
    hp.merge_adapters(model)
    assert (logits(model, ids) - base).abs().max() > 0.1
    with hp.disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    model.disable_adapters()  # transformers' unscoped form
    assert torch.equal(logits(model, ids), base)
    model.enable_adapters()
    hp.unmerge_adapters(model)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-5)


def test_layers_read_the_models_state_and_keep_no_flags_of_their_own():
    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=2))
    hp.add_adapter(model, "b", bottleneck=hp.BottleneckConfig(reduction_factor=8))
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        assert not {"active_adapters", "adapters_disabled", "merged_adapters"} & set(vars(layer))
    hp.set_active_adapters(model, ["default", "b"])
    assert all(layer.active_adapters for layer in layers)
    copy_ = copy.deepcopy(model)  # the copy routes through its own state
    hp.set_active_adapters(copy_, ["b"])
    with hp.disable_adapters(model):
        assert all(layer.adapters_disabled for layer in layers)
    assert not any(layer.adapters_disabled for layer in layers)
    assert require_state(model).active == ["default", "b"] and require_state(copy_).active == ["b"]
    assert model.model.layers[0].self_attn.q_proj.active_adapters == ("default",)
    assert copy_.model.layers[0].self_attn.q_proj.active_adapters == ()


def test_changing_the_active_adapters_of_a_merged_model_is_refused():
    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=2))
    hp.add_adapter(model, "b", lora=LoraConfig(r=2))
    hp.merge_adapters(model)
    with pytest.raises(MergeError, match="unmerge_adapters"):
        hp.set_active_adapters(model, ["b"])
    with pytest.raises(MergeError, match="unmerge_adapters"):
        hp.delete_adapter(model, "default")
    assert require_state(model).active == ["default"] == require_state(model).merged


def trainable_names(model: nn.Module) -> set[str]:
    return {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


def test_trainable_flags_are_kept_by_add_load_and_activate(tmp_path):
    saved = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=2))
    hp.save_adapter(saved, tmp_path)
    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=2))
    hp.set_active_adapters(model, ["default"], trainable=False)
    assert trainable_names(model) == set()
    hp.add_adapter(model, "new", lora=LoraConfig(r=2))
    assert trainable_names(model) == set()  # used to make "default" trainable again
    hp.load_adapter(model, tmp_path, adapter_name="loaded", is_trainable=False)
    hp.set_active_adapters(model, ["default", "new", "loaded"])
    assert trainable_names(model) == {"new"}
    assert [n for n, s in require_state(model).adapters.items() if s.trainable] == ["new"]
    hp.set_active_adapters(model, ["loaded"], trainable=True)
    assert trainable_names(model) == {"loaded"}
    fresh = hp.load_adapter(tiny_llama(), tmp_path, is_trainable=False)
    assert trainable_names(fresh) == set() and not require_state(fresh).adapters["default"].trainable


def norm_hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) for m in model.modules() if "norm" in type(m).__name__.lower()]


def test_merge_and_unload_removes_the_norm_hooks_and_preparing_again_adds_one_each():
    model = prepare_model(tiny_llama().to(torch.bfloat16), bits=4, lora=LoraConfig(r=2))
    assert set(norm_hook_counts(model)) == {1}
    merged = hp.merge_and_unload(model, torch.bfloat16)
    assert set(norm_hook_counts(merged)) == {0}
    again = prepare_model(merged, bits=4, lora=LoraConfig(r=2))
    assert set(norm_hook_counts(again)) == {1}
    assert logits(again, token_batch()).isfinite().all()


def top_level_hook_counts(model: nn.Module) -> list[int]:
    return [
        len(model._forward_pre_hooks),
        len(model._forward_hooks),
        len(model._load_state_dict_pre_hooks),
        len(model._load_state_dict_post_hooks),
    ]


def test_merge_and_unload_removes_every_hook_the_package_registered():
    from hf_peft_plugin.checkpoints import enable_trainable_checkpoint_loading

    plain = tiny_llama()
    before = top_level_hook_counts(plain)
    model = prepare_model(plain, bits=4, lora=LoraConfig(r=2))
    enable_trainable_checkpoint_loading(model)  # what AdapterCallback does at train begin, here twice
    enable_trainable_checkpoint_loading(model)
    assert top_level_hook_counts(model) == [before[0] + 1, before[1], before[2] + 1, before[3] + 1]
    assert {"packing", "checkpoints"} <= set(require_state(model).hooks)
    merged = hp.merge_and_unload(model)
    assert top_level_hook_counts(merged) == before
    assert set(norm_hook_counts(merged)) == {0}


def test_delete_adapter_removes_emptied_modules_and_their_hooks():
    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=2))
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks))  # others' hooks, e.g. packing's
    hp.add_adapter(model, "p", prompt=hp.PromptTuningConfig(num_virtual_tokens=3))
    hp.add_adapter(model, "b", bottleneck=hp.BottleneckConfig(reduction_factor=8, placement="pfeiffer"))
    state = require_state(model)
    assert "prompt_encoder" in state.hooks and len(model._forward_pre_hooks) == len(hooks[0]) + 1
    assert len(model.model.layers[0].mlp._forward_hooks) == 1
    hp.delete_adapter(model, "p")
    hp.delete_adapter(model, "b")
    assert not hasattr(model, "prompt_encoder") and not hasattr(model.model.layers[0], "bottleneck_ffn")
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert len(model.model.layers[0].mlp._forward_hooks) == 0
    assert set(state.hooks) <= {"norms", "packing"}
    ids = token_batch()
    with hp.disable_adapters(model):
        base = logits(model, ids)
    torch.testing.assert_close(logits(model, ids), base)  # LoRA B is zero: still the base
