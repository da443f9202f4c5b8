"""The file format is peft's: what this package saves, peft loads, and what peft saves, this package
loads, with the same logits. peft is installed only for tests; the package never imports it."""

from __future__ import annotations

import shutil

import bitsandbytes as bnb
import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from hf_peft_plugin import BottleneckConfig, LoraConfig, PromptTuningConfig, prepare_model
from hf_peft_plugin.config import QuantizationConfig
from hf_peft_plugin.loading import load_adapter
from hf_peft_plugin.quantization import load_quantized_model, quantize_model, unpack_cpu_4bit
from hf_peft_plugin.saving import save_adapter

from tiny_models import perturb_trainable, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_classifier}
#: name: (model, bits, our config, the equivalent peft config)
LORA_CASES = {
    "llama": ("llama", None, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
              peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-linear": ("llama", None, LoraConfig(r=2, alpha=4),
                         peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")),
    "gpt2-conv1d": ("gpt2", None, LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"]),
                    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "gpt2-trained-lm-head": (
        "gpt2", None, LoraConfig(r=4, alpha=8, target_modules=["c_attn"], modules_to_save=["lm_head"]),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["lm_head"],
                        fan_in_fan_out=True)),
    "bert-seq-cls-head": ("bert", None, LoraConfig(r=4, alpha=8, target_modules=["query", "value"]),
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")),
    "dora": ("llama", None, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)),
    "rank-alpha-pattern-rslora": (
        "llama", None,
        LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2},
                   alpha_pattern={r"layers\.1\.self_attn\.q_proj": 16}, use_rslora=True),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 2},
                        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 16}, use_rslora=True)),
    "pissa": ("llama", None, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init="pissa"),
              peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")),
    "llama-4bit": ("llama", 4, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2-4bit-dora": ("gpt2", 4, LoraConfig(r=4, alpha=8, target_modules=["c_attn"], use_dora=True),
                       peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True)),
}  # fmt: skip


def base(arch: str, bits: int | None) -> nn.Module:
    model = FACTORIES[arch]()
    if bits is not None:
        quantize_model(model, QuantizationConfig(bits=bits), torch.float32)
    return model.eval()





def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batch()).logits


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_loads_what_we_save(case, tmp_path):
    arch, bits, ours, _ = LORA_CASES[case]
    model = perturb_trainable(prepare_model(FACTORIES[arch](), bits=bits, lora=ours))
    save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base(arch, bits), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_we_load_what_peft_saves(case, tmp_path):
    arch, bits, _, theirs_config = LORA_CASES[case]
    theirs = perturb_trainable(peft.get_peft_model(base(arch, bits), theirs_config))
    theirs.save_pretrained(tmp_path)
    model = load_adapter(base(arch, bits), tmp_path)
    torch.testing.assert_close(logits(model), logits(theirs), rtol=0, atol=1e-5)


def test_4bit_base_loaded_by_transformers_both_ways(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    quant = QuantizationConfig(bits=4)

    def quantized_base():
        model = load_quantized_model(str(tmp_path / "base"), quant, torch.float32, AutoModelForCausalLM).eval()
        for module in model.modules():  # as prepare_model does: no bf16-only CPU fast path (see quantization.py)
            if isinstance(module, bnb.nn.Linear4bit):
                unpack_cpu_4bit(module)
        return model

    ours = perturb_trainable(prepare_model(str(tmp_path / "base"), bits=4, compute_dtype=torch.float32, lora=LoraConfig(r=4)))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(quantized_base(), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-5)

    theirs = perturb_trainable(peft.get_peft_model(quantized_base(), peft.LoraConfig(r=4, target_modules="all-linear")), seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(
        logits(load_adapter(quantized_base(), tmp_path / "theirs")), logits(theirs), rtol=0, atol=1e-5
    )


PROMPT_ARCHS = {"llama": "CAUSAL_LM", "bert": "SEQ_CLS"}


@pytest.mark.parametrize("arch", sorted(PROMPT_ARCHS))
def test_prompt_tuning_both_ways(arch, tmp_path):
    ours = perturb_trainable(prepare_model(FACTORIES[arch](), bits=None, prompt=PromptTuningConfig(num_virtual_tokens=3)))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(base(arch, None), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0, atol=1e-5)

    config = peft.PromptTuningConfig(num_virtual_tokens=3, task_type=PROMPT_ARCHS[arch])
    theirs = perturb_trainable(peft.get_peft_model(base(arch, None), config), seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    model = load_adapter(base(arch, None), tmp_path / "theirs")
    torch.testing.assert_close(logits(model), logits(theirs), rtol=0, atol=1e-5)


def test_peft_loads_the_lora_part_of_a_combined_adapter(tmp_path):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    combined = perturb_trainable(
        prepare_model(tiny_llama(), bits=None, lora=lora, bottleneck=BottleneckConfig(bottleneck_size=8))
    )
    save_adapter(combined, tmp_path / "combined")
    theirs = peft.PeftModel.from_pretrained(tiny_llama().eval(), tmp_path / "combined")

    lora_only = tmp_path / "lora_only"  # the peft pair alone: what peft (and vLLM) read
    lora_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "combined" / name, lora_only / name)
    expected = logits(load_adapter(tiny_llama().eval(), lora_only))
    torch.testing.assert_close(logits(theirs), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(combined), expected, atol=1e-3)  # the bottleneck part does matter
