"""Adapter artifacts: saving, loading and merging in the PEFT file format."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .state import STATE_ATTRIBUTE, AdapterState


class AdapterModelMixin:
    """Mixed into a prepared model's class so that ``save_pretrained`` (which the Trainer calls for
    every checkpoint and for ``save_model``) writes the adapter and never the frozen base weights."""

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, state_dict: Any = None, is_main_process: bool = True, **kwargs: Any
    ) -> None:
        if is_main_process:
            save_adapter(self, save_directory)


_ADAPTER_AWARE_CLASSES: dict[type, type] = {}


def make_adapter_aware(model: nn.Module, state: AdapterState) -> None:
    """Attach ``state`` and swap in a subclass of the model's own class that saves adapters only.

    A subclass (rather than patching the instance) keeps ``isinstance`` checks, ``deepcopy`` and
    the model's own methods working. ``_hf_peft_config_loaded`` is what transformers' Trainer looks
    at to accept a quantized model with adapters attached.
    """
    cls = type(model)
    if not issubclass(cls, AdapterModelMixin):
        state.original_class = cls
        aware = _ADAPTER_AWARE_CLASSES.get(cls)
        if aware is None:
            aware = type(cls.__name__, (AdapterModelMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
            _ADAPTER_AWARE_CLASSES[cls] = aware
        model.__class__ = aware
    setattr(model, STATE_ATTRIBUTE, state)
    model._hf_peft_config_loaded = True


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    raise NotImplementedError("save_adapter: written in the artifacts issue")
