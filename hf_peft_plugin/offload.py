"""Activation offloading: gradient checkpointing that keeps each block's saved input in host memory.

With (non-reentrant) gradient checkpointing the forward keeps, per decoder block, only the block's
input hidden states -- ``layers x tokens x hidden`` values that dominate the device memory at long
contexts. ``prepare_model(..., gradient_checkpointing=True, offload_activations=True)`` wraps each
checkpointed block in :class:`OffloadHooks`, saved-tensor hooks under which the tensors the
checkpoint saves (its inputs; the recompute's own tensors are the checkpoint's business) are
copied to pinned host memory, asynchronously on CUDA, and copied back when the backward
recomputes that block. The numbers are unchanged: the backward reads back the same bits.

On a CPU model there is no device memory to free: tensors already on the host are kept as they
are (no copy), so the option costs and changes nothing there, and says so once in the log.

transformers has its own ``offload=True`` (``activation_checkpointing_enable``); its pinned copies
fail on a CPU-only torch and are dropped when the Trainer re-enables checkpointing
(``TrainingArguments(activation_checkpointing=True)``). The prepared model's
``activation_checkpointing_enable`` (:func:`keeping_offload`) therefore re-applies this offload, and
accepts ``offload=True`` on any device.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Attribute of a prepared model holding its :class:`OffloadStats` when offloading is on.
OFFLOAD_ATTRIBUTE = "_hf_peft_plugin_offload"


@dataclass
class OffloadStats:
    """What the hooks did (for tests and diagnostics). ``copy_host_tensors`` also copies tensors
    already on the host, which exercises the copy path on a CPU-only machine."""

    copy_host_tensors: bool = False
    packed: int = 0
    copied_bytes: int = 0


class OffloadHooks(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors not on the CPU go to (pinned) host memory and come back for the backward."""

    def __init__(self, stats: OffloadStats) -> None:
        def pack(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
            stats.packed += 1
            if tensor.device.type == "cpu" and not stats.copy_host_tensors:
                return tensor.device, tensor
            pin = tensor.device.type == "cuda" and not tensor.is_sparse
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
            host.copy_(tensor, non_blocking=pin)
            stats.copied_bytes += tensor.numel() * tensor.element_size()
            return tensor.device, host

        def unpack(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
            device, tensor = packed
            return tensor.to(device, non_blocking=tensor.is_pinned())

        super().__init__(pack, unpack)


def _offloaded(inner: Callable[..., Any], stats: OffloadStats, function: Callable[..., Any], *args: Any, **kwargs: Any):
    with OffloadHooks(stats):
        return inner(function, *args, **kwargs)


def enable_activation_offload(model: nn.Module, stats: OffloadStats | None = None) -> OffloadStats:
    """Wrap the checkpoint function of every checkpointed module of ``model`` (idempotent)."""
    stats = stats or getattr(model, OFFLOAD_ATTRIBUTE, None) or OffloadStats()
    wrapped = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if not getattr(module, "gradient_checkpointing", False) or func is None:
            continue
        if isinstance(func, functools.partial) and func.func is _offloaded:
            func = func.args[0]
        module._gradient_checkpointing_func = functools.partial(_offloaded, func, stats)
        wrapped += 1
    if not wrapped:
        from .errors import ConfigError

        raise ConfigError(
            f"offload_activations needs gradient checkpointing, and {type(model).__name__} has no checkpointed "
            "blocks; pass gradient_checkpointing=True (or drop offload_activations)."
        )
    setattr(model, OFFLOAD_ATTRIBUTE, stats)
    if all(p.device.type == "cpu" for p in model.parameters()):
        logger.info(
            "hf_peft_plugin: offload_activations on a CPU model keeps activations where they are (host memory "
            "already); it frees memory only on an accelerator."
        )
    return stats


def keeping_offload(original: Callable[..., Any]) -> Callable[..., Any]:
    """A prepared model's ``activation_checkpointing_enable``: transformers' own without its
    ``offload`` (pinned copies that fail on CPU-only torch), then this module's offload when asked
    for or when the model was prepared with it."""

    @functools.wraps(original)
    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        original(self, activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=False)
        if offload or getattr(self, OFFLOAD_ATTRIBUTE, None) is not None:
            enable_activation_offload(self)

    return activation_checkpointing_enable
