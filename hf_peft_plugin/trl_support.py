"""TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ``GRPOTrainer``) with a prepared model.

TRL special-cases ``peft.PeftModel`` in two places that matter here, and a prepared model is not
one (this package never imports peft):

* **The QLoRA cast.** Every TRL trainer casts each trainable parameter to bf16 when the model has
  ``is_loaded_in_4bit``/``is_loaded_in_8bit`` set (the QLoRA block of ``trl/trainer/sft_trainer.py``,
  and the same lines in the DPO, GRPO, RLOO, KTO and reward trainers), whatever ``bf16`` says. That
  happens in the trainer's ``__init__``, before ``Trainer.__init__`` fires ``on_init_end`` and long
  before the optimizer exists. :func:`restore_adapter_dtypes` casts the adapter back to the dtype
  this package gave it; :class:`~hf_peft_plugin.callback.AdapterCallback` calls it at
  ``on_init_end``, so passing the callback is all it takes.
* **The reference model.** Without ``ref_model`` TRL's ``DPOTrainer`` loads a second, unquantized
  copy of the base from ``config._name_or_path`` unless the model is a ``PeftModel``. Given a
  ``ref_model`` instance it uses it as is. :func:`reference_model` is such an instance that owns no
  weights: the policy's own modules, run with their adapters disabled.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .bottleneck import ADAPTER_DTYPE
from .errors import ConfigError
from .heads import TrainableCopy
from .lora import LORA_DTYPE, LoraLinear
from .model import disable_adapters
from .state import adapter_state
from .targeting import adapter_layers


def _intended_dtypes(model: nn.Module) -> list[tuple[str, nn.Parameter, torch.dtype]]:
    """Every floating adapter parameter with the dtype this package creates it in: float32 for
    LoRA/DoRA, soft prompts and bottlenecks; a trained head copy keeps its original head's dtype."""
    found = []
    for path, layer in adapter_layers(model):
        for name in layer.adapter_names():
            if isinstance(layer, TrainableCopy):
                original = dict(layer.original_module.named_parameters())
                for key, param in layer.modules_to_save[name].named_parameters():
                    if key in original and param.is_floating_point():
                        found.append((f"{path}.{name}.{key}", param, original[key].dtype))
                continue
            dtype = LORA_DTYPE if isinstance(layer, LoraLinear) else ADAPTER_DTYPE
            for i, param in enumerate(layer.adapter_parameters(name)):
                if param.is_floating_point():
                    found.append((f"{path}[{name}][{i}]", param, dtype))
    return found


def restore_adapter_dtypes(model: nn.Module) -> list[str]:
    """Cast adapter parameters that someone else cast (TRL's QLoRA block casts them to bf16) back
    to the dtype this package created them in; returns the parameters it changed.

    It replaces ``param.data``, as TRL does, so the ``Parameter`` objects (and anything holding
    them) stay the same. Call it before the optimizer's first step: Adam's state takes the
    parameter's dtype then.
    """
    changed = []
    for name, param, dtype in _intended_dtypes(model):
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
            if param.grad is not None:
                param.grad = param.grad.to(dtype)
            changed.append(name)
    return changed


class ReferenceModelMixin:
    """A weight-sharing view of a prepared model that computes the base model: every call runs the
    shared modules in eval mode with all adapters disabled, then puts both back as they were."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        modes = [(m, m.training) for m in self.modules()]
        with disable_adapters(self):
            try:
                for module, _ in modes:
                    module.training = False
                return super().__call__(*args, **kwargs)
            finally:
                for module, mode in modes:
                    module.training = mode

    def train(self, mode: bool = True) -> nn.Module:
        # The modules are the policy's: ``ref.eval()`` must not switch the policy to eval mode.
        self.training = mode
        return self


_REFERENCE_CLASSES: dict[type, type] = {}


def reference_model(model: nn.Module) -> nn.Module:
    """The frozen reference for ``DPOTrainer(ref_model=...)``: ``model`` with its adapters disabled,
    sharing every parameter and buffer with it (no second copy of the base is loaded or stored).

    It computes exactly what the quantized base computes (what ``with disable_adapters(model)``
    gives), so at step 0 the policy equals the reference: DPO's loss is ln 2 and the rewards are 0.
    It is a model of the same class (``config``, ``get_output_embeddings`` and ``base_model`` are the
    policy's), so TRL patches and calls it like any reference model. Its calls are meant to run
    under ``torch.no_grad()``, as TRL runs them. ``sync_ref_model=True`` makes no sense with it (the
    weights it would blend are the policy's own).

    Example::

        trainer = DPOTrainer(model=model, ref_model=reference_model(model), args=DPOConfig(...), ...)
    """
    state = adapter_state(model)
    if state is None:
        raise ConfigError(
            f"reference_model() needs a model that carries hf_peft_plugin adapters; this {type(model).__name__} has "
            "none, so disabling them would give the model itself. Call prepare_model(model, ...) or "
            "load_adapter(model, path) first (or, for full fine-tuning, pass ref_model=None to the trainer)."
        )
    if not state.adapters or not any(layer.adapter_names() for _, layer in adapter_layers(model)):
        raise ConfigError(
            "reference_model() was given a prepared model whose adapters were all deleted; add one with "
            "add_adapter(model, name, ...) before training against a reference."
        )
    if isinstance(model, ReferenceModelMixin):
        return model
    cls = type(model)
    ref_cls = _REFERENCE_CLASSES.get(cls)
    if ref_cls is None:
        ref_cls = type(cls.__name__, (ReferenceModelMixin, cls), {"__module__": cls.__module__})
        _REFERENCE_CLASSES[cls] = ref_cls
    ref = copy.copy(model)  # a new object whose __dict__ holds the same modules, config and state
    for key, value in list(ref.__dict__.items()):
        # Own containers (children, hooks) so that what TRL sets on the reference (its patched
        # ``forward``, hooks) stays off the policy; their contents are the policy's modules.
        if isinstance(value, dict):
            ref.__dict__[key] = copy.copy(value)
    ref.__dict__.pop("forward", None)  # a forward patched onto the policy is bound to the policy
    ref.__class__ = ref_cls
    ref.training = False
    return ref
