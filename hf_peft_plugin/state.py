"""What a prepared model remembers about its adapters: one small object, stored on the model.

:class:`AdapterState` is the single source of which adapters are active, disabled, merged and
trainable, and it holds the handles of every hook the package registered. Adapter layers keep a
reference to it (:class:`ReadsAdapterState`) and derive their view from it, cached until the state
changes, so no layer carries a flag of its own that could disagree with the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import BottleneckConfig, LoraConfig, PromptTuningConfig, QuantizationConfig

STATE_ATTRIBUTE = "_hf_peft_plugin_state"
#: Owner key in :attr:`AdapterState.hooks` of the norms' dtype hooks (``freeze_backbone``).
NORM_HOOKS = "norms"

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
    #: Whether the adapter trains while active (peft's ``inference_mode`` is its negation).
    trainable: bool = True

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
    #: True: every layer computes what the base model computes (merged adapters included).
    disabled: bool = False
    #: Adapters folded into the base weights by ``merge_adapters`` (the forward then skips them).
    merged: list[str] = field(default_factory=list)
    #: Handles of the hooks the package registered, by owner (a module path, or ``"norms"``).
    hooks: dict[str, list[RemovableHandle]] = field(default_factory=dict)
    #: GEMMs with a frozen weight use the CPU's bf16 mode (:mod:`~hf_peft_plugin.matmul`).
    fast_frozen_matmul: bool = False
    #: Bumped on every change of ``active``/``disabled``/``merged``: layers re-derive their view then.
    version: int = 0

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _ROUTING_FIELDS:
            value = bool(value) if name == "disabled" else list(value)
            object.__setattr__(self, "version", self.__dict__.get("version", 0) + 1)
        object.__setattr__(self, name, value)

    def add_hooks(self, owner: str, handles: list[RemovableHandle]) -> None:
        self.hooks.setdefault(owner, []).extend(handles)

    def remove_hooks(self, owner: str) -> None:
        """Remove the hooks registered for ``owner`` through their handles."""
        for handle in self.hooks.pop(owner, []):
            handle.remove()


_ROUTING_FIELDS = ("active", "disabled", "merged")
_STANDALONE = "STANDALONE_LAYER"
#: The state of a layer not yet bound to any (no adapter active); never changed.
_UNBOUND = AdapterState("UNBOUND_LAYER", None, None, torch.float32)


class ReadsAdapterState:
    """For adapter layers: ``active_adapters``, ``adapters_disabled`` and ``merged_adapters`` read
    from the model's :class:`AdapterState` (bound with :meth:`bind_state`), restricted to the
    adapters this layer has. The view is rebuilt only when the state's version changes; a forward
    checks it with :meth:`_view_is_current` (two attribute reads and a comparison) and then reads
    plain attributes (``_run``: the adapters to compute). A layer used on its own gets a private state."""

    _adapter_state: AdapterState = _UNBOUND
    _view_version: int = -1
    _active: tuple[str, ...] = ()
    _merged: tuple[str, ...] = ()
    _disabled: bool = False
    #: What the forward adds: the active adapters, or none when disabled or merged.
    _run: tuple[str, ...] = ()

    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def bind_state(self, state: AdapterState) -> None:
        self._adapter_state = state
        self._view_version = -1

    def _state_changed(self) -> None:
        """Call after adding or deleting an adapter of this layer: the view must be rebuilt."""
        self._view_version = -1

    def _refresh_view(self) -> None:
        state = self._adapter_state
        own = set(self.adapter_names())
        self._active = tuple(n for n in state.active if n in own)
        self._merged = tuple(n for n in state.merged if n in own)
        self._disabled = state.disabled
        self._run = () if state.disabled or self._merged else self._active
        self._view_version = state.version

    def _routing(self) -> None:
        if self._view_version != self._adapter_state.version:
            self._refresh_view()

    @property
    def active_adapters(self) -> tuple[str, ...]:
        self._routing()
        return self._active

    @property
    def merged_adapters(self) -> tuple[str, ...]:
        self._routing()
        return self._merged

    @property
    def adapters_disabled(self) -> bool:
        self._routing()
        return self._disabled

    def set_active_adapters(self, names: list[str] | tuple[str, ...]) -> None:
        """Route a layer used on its own, outside a prepared model (which routes through its state:
        ``hf_peft_plugin.set_active_adapters(model, names)``)."""
        from .errors import ConfigError

        if self._adapter_state.task_type not in (_STANDALONE, _UNBOUND.task_type):
            raise ConfigError(
                "This layer belongs to a prepared model; use hf_peft_plugin.set_active_adapters(model, names)."
            )
        if self._adapter_state is _UNBOUND:
            self.bind_state(AdapterState(_STANDALONE, None, None, torch.float32))
        self._adapter_state.active = list(names)


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
