"""Merging: fold LoRA adapters into the base weights, in place or into a plain transformers model."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import MergeError
from .fsdp import require_gathered
from .heads import TrainableCopy
from .lora import LoraLinear, plain_linear, release_quantized, was_conv1d
from .quantization import dequantized_weight, is_quantized_linear, requantized_like
from .state import NORM_HOOKS, STATE_ATTRIBUTE, require_state
from .targeting import adapter_layers, remove_empty_adapter_modules


def merge_adapters(model: nn.Module) -> None:
    """Fold the active LoRA adapters into the base weights in place, for faster inference.

    Soft prompts and bottleneck adapters keep running as they are. On a quantized base each merged
    layer is requantized (lossy for inference); :func:`unmerge_adapters` restores the exact original.
    """
    state = require_state(model)
    require_gathered(model, "merge_adapters")
    if state.merged:
        return
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.merge()
    state.merged = state.active


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` exactly, e.g. to train again or switch adapters."""
    state = require_state(model)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.unmerge()
    state.merged = []


def merge_and_unload(
    model: nn.Module, dtype: torch.dtype | None = None, *, requantize: bool = False, keep_unmergeable: bool = False
) -> nn.Module:
    """Fold the active adapters into the weights and return the plain transformers model (in place).

    Each 4/8-bit base weight is dequantized, the LoRA/DoRA delta added in float32, and the layer
    becomes a plain ``nn.Linear`` (GPT-2: ``Conv1D``) of ``dtype``; trained heads replace the
    originals. ``dtype=None`` keeps the base's dtype (:func:`base_dtype`: what its unquantized
    weights are in, as peft's merge does), so a float32 model stays float32; pass a dtype to cast
    every parameter to it. The model gets its own class back, loses every trace of this package and of its
    quantization (``config.quantization_config``), so ``save_pretrained``/``from_pretrained`` work
    with plain transformers. Inactive adapters are dropped: save them first if you need them.

    ``requantize=True`` quantizes the merged weights back to the base's 4/8-bit format: smaller, but
    it adds a second rounding on top of the first (see the README for the measured error).

    Soft prompts and bottleneck adapters cannot be folded into weights: they raise
    :class:`MergeError` unless ``keep_unmergeable=True``, which folds the LoRA parts and the heads and
    keeps those adapters as they are, on the merged model (which stays adapter-aware, so
    ``save_pretrained`` writes just them; they now belong to the merged base).
    """
    state = require_state(model)
    require_gathered(model, "merge_and_unload")
    if dtype is None:
        dtype = base_dtype(model, state.compute_dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"merge_and_unload(dtype=...) takes a floating torch.dtype such as torch.bfloat16; got {dtype!r}."
        )
    active = [state.adapters[n] for n in state.active]
    unmergeable = [n for n, spec in zip(state.active, active) if spec.prompt is not None or spec.bottleneck is not None]
    if unmergeable and not keep_unmergeable:
        raise MergeError(
            f"Adapter(s) {unmergeable} hold soft prompts or bottleneck adapters, which cannot be folded into "
            "weights. Pass keep_unmergeable=True to fold the LoRA parts and keep those modules, or "
            "delete_adapter() them first."
        )
    for _, layer in list(adapter_layers(model)):  # inactive adapters go; merged layers are unmerged
        if isinstance(layer, LoraLinear):
            layer.unmerge()
        for name in layer.adapter_names():
            if name not in state.active:
                layer.delete_adapter(name)
    state.merged = []

    def unload(module: nn.Module) -> nn.Module | None:
        # Each wrapper folds what its forward computes: the LoRA layer its active adapters, the
        # head wrapper the copy it routes to.
        if isinstance(module, LoraLinear):
            if requantize and is_quantized_linear(module.base_layer):
                if not module.active_adapters:
                    return module.base_layer
                return requantized_like(module.base_layer, module.merged_dense_weight())
            return module.to_plain_layer(dtype)
        if isinstance(module, TrainableCopy):
            return (
                module.modules_to_save[module.active_adapters[0]] if module.active_adapters else module.original_module
            )
        if is_quantized_linear(module) and not requantize:
            return plain_linear(dequantized_weight(module), module.bias, conv1d=was_conv1d(module), dtype=dtype)
        return None

    _replace_children(model, unload)
    remove_empty_adapter_modules(model, state)
    state.remove_hooks(NORM_HOOKS)  # every parameter is cast to dtype below: no fp32 norm to bridge
    _cast_parameters(model, dtype)
    _untie_trained_output_embeddings(model)
    kept = {n: spec for n, spec in state.adapters.items() if n in unmergeable}
    if kept:
        for spec in kept.values():
            spec.lora, spec.lora_targets, spec.modules_to_save = None, (), ()
        state.adapters, state.active = kept, [n for n in state.active if n in kept]
        state.quantization = state.quantization if requantize else None
        state.compute_dtype = dtype
    else:
        for owner in list(state.hooks):  # a plain model again: none of the package's hooks stays
            state.remove_hooks(owner)
        model.__class__ = state.original_class
        delattr(model, STATE_ATTRIBUTE)
        model.__dict__.pop("_hf_peft_config_loaded", None)
    if not requantize:
        _forget_quantization(model)
    model.config.dtype = dtype
    return model


def base_dtype(model: nn.Module, compute_dtype: torch.dtype) -> torch.dtype:
    """The dtype the base model was loaded in: that of its input embeddings (never quantized, never
    upcast by ``prepare_model``, unlike norms), else ``compute_dtype`` (what a 4/8-bit base computes in)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return compute_dtype


def _replace_children(module: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> None:
    """Depth-first: a child that ``replace`` maps to a module is swapped for it, and the replacement
    (not the child) is visited further."""
    for name, child in list(module.named_children()):
        new = replace(child)
        if new is not None:
            setattr(module, name, new)
            kept = {id(m) for m in new.modules()}
            for old in child.modules():  # what the replacement does not reuse goes now, not at the next gc
                if id(old) not in kept and is_quantized_linear(old):
                    release_quantized(old)
        _replace_children(child if new is None else new, replace)


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters to ``dtype``, except packed quantized weights. Buffers (e.g. rotary
    frequencies) stay as the model made them, which is what ``from_pretrained(dtype=...)`` gives."""
    for module in model.modules():
        quantized = is_quantized_linear(module)
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and not (quantized and name == "weight"):
                param.data = param.data.to(dtype)


def _untie_trained_output_embeddings(model: nn.Module) -> None:
    """A trained copy of a tied ``lm_head`` no longer shares the input embeddings: say so in the
    config, or ``from_pretrained`` would tie them again."""
    text_config = model.config.get_text_config()
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(text_config, "tie_word_embeddings", False) and inputs is not None and outputs is not None:
        if outputs.weight is not inputs.weight:
            text_config.tie_word_embeddings = False


def _forget_quantization(model: nn.Module) -> None:
    """What transformers' bitsandbytes loading leaves behind; with it, save_pretrained would
    write a quantization_config that no longer describes the weights."""
    for attr in ("hf_quantizer", "is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        model.__dict__.pop(attr, None)
    for attr in ("quantization_config", "_is_quantized", "_pre_quantization_dtype"):
        model.config.__dict__.pop(attr, None)
