"""What a prepared model remembers about its adapters: one small object, stored on the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .config import BottleneckConfig, LoraConfig, PromptTuningConfig, QuantizationConfig

STATE_ATTRIBUTE = "_hf_peft_plugin_state"

#: peft's task types, with the transformers auto class that loads each from a path.
TASK_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "FEATURE_EXTRACTION": "AutoModel",
}

#: Heads trained in full for each task (peft adds the same ones for classification).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def infer_task_type(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("LMHeadModel", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION"


@dataclass
class AdapterSpec:
    """One named adapter set: any subset of LoRA, soft prompt and bottleneck adapters."""

    lora: LoraConfig | None = None
    prompt: PromptTuningConfig | None = None
    bottleneck: BottleneckConfig | None = None
    #: Paths of the layers the LoRA part wraps, and of the whole modules trained alongside.
    lora_targets: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()

    @property
    def methods(self) -> list[str]:
        return [m for m in ("lora", "prompt", "bottleneck") if getattr(self, m) is not None]


@dataclass
class AdapterState:
    task_type: str
    base_model_name_or_path: str | None
    quantization: QuantizationConfig | None
    compute_dtype: torch.dtype
    adapters: dict[str, AdapterSpec] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    #: The class the model had before :func:`~hf_peft_plugin.adapter_class.make_adapter_aware`.
    original_class: type | None = None


def adapter_state(model: nn.Module) -> AdapterState | None:
    return getattr(model, STATE_ATTRIBUTE, None)


def require_state(model: nn.Module) -> AdapterState:
    state = adapter_state(model)
    if state is None:
        raise TypeError(
            f"{type(model).__name__} carries no hf_peft_plugin adapters; call prepare_model(model, ...) "
            "or load_adapter(model, path) first."
        )
    return state
