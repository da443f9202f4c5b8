"""The adapter-aware class swap: what makes a prepared model's ``save_pretrained`` (which the
Trainer calls) write only the adapter.

It sits just above the layers and :mod:`~hf_peft_plugin.state`, below saving, loading and
``model.py``, which all call :func:`make_adapter_aware`. The mixin's methods delegate to
:mod:`~hf_peft_plugin.saving` and :mod:`~hf_peft_plugin.loading`, imported when called: those
modules attach adapters through this one, so importing them here at the top would be a cycle.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .loss import chunked_forward, takes_labels
from .offload import keeping_offload
from .state import STATE_ATTRIBUTE, AdapterState, adapter_state, require_state


class AdapterModelMixin:
    """Mixed into a prepared model's class so that ``save_pretrained`` (which the Trainer calls for
    every checkpoint and for ``save_model``) writes the adapter and never the frozen base weights.

    It also replaces the peft-integration methods transformers puts on every model, which would add
    peft's own layers next to ours: ``save_adapter``, ``load_adapter``, ``get_adapter_state_dict``,
    ``active_adapters`` and ``enable_adapters``/``disable_adapters`` (which some model code calls)
    work on this package's adapters; ``add_adapter``, ``set_adapter`` and ``delete_adapter`` raise
    and name the function to use instead. The Trainer calls none of them for a model that is not a
    ``peft.PeftModel``.
    """

    def save_pretrained(
        self, save_directory: str | os.PathLike, *, state_dict: Any = None, is_main_process: bool = True, **kwargs: Any
    ) -> None:
        """Write the adapter (never the base weights). Into a Trainer checkpoint (``checkpoint-N``) it
        also writes what resuming needs (:mod:`~hf_peft_plugin.checkpoints`), in the same unit."""
        from .checkpoints import TRAINABLE_WEIGHTS_NAME, mark_checkpoint_started, trainable_weights, wants_resume_file
        from .saving import write_adapters

        if not is_main_process:
            return
        if not wants_resume_file(self, save_directory):
            write_adapters(self, save_directory)
            return
        os.makedirs(save_directory, exist_ok=True)
        mark_checkpoint_started(save_directory)
        resume_file = {TRAINABLE_WEIGHTS_NAME: trainable_weights(self, save_directory)}
        write_adapters(self, save_directory, extra_files=lambda root: resume_file)

    def save_adapter(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        from .saving import save_adapter

        save_adapter(self, save_directory, adapter_name)

    def load_adapter(self, path_or_repo: str | os.PathLike, adapter_name: str = "default", **kwargs: Any) -> nn.Module:
        from .loading import load_adapter

        return load_adapter(self, path_or_repo, adapter_name=adapter_name, **kwargs)

    def get_adapter_state_dict(
        self, adapter_name: str | None = None, state_dict: Any = None
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the keys :func:`save_adapter` writes (``None``: the first active one)."""
        from .saving import Tensors, adapter_files

        state = require_state(self)
        name = adapter_name or (state.active[0] if state.active else next(iter(state.adapters)))
        files = adapter_files(self, state, name).values()
        return {k: v for f in files if isinstance(f, Tensors) for k, v in f.tensors.items()}

    def active_adapters(self) -> list[str]:
        return list(require_state(self).active)

    def enable_adapters(self) -> None:
        require_state(self).disabled = False

    def disable_adapters(self) -> None:
        """Until :meth:`enable_adapters`, compute what the base model computes (transformers' API;
        ``with hf_peft_plugin.disable_adapters(model):`` is the scoped form)."""
        require_state(self).disabled = True

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The swapped-in class is made at run time, so pickle cannot find it by name (it has the
        # original's qualname): a prepared model pickles as "the adapter-aware class of <the
        # original class>" plus its state, which any process importing this package rebuilds.
        return (_rebuild, (type(self)._hf_peft_plugin_base,), self.__getstate__())

    def add_adapter(self, *args: Any, **kwargs: Any) -> None:
        _not_here("add_adapter", "hf_peft_plugin.add_adapter(model, name, lora=LoraConfig(...))")

    def set_adapter(self, *args: Any, **kwargs: Any) -> None:
        _not_here("set_adapter", "hf_peft_plugin.set_active_adapters(model, names)")

    def delete_adapter(self, *args: Any, **kwargs: Any) -> None:
        _not_here("delete_adapter", "hf_peft_plugin.delete_adapter(model, name)")


def _not_here(method: str, instead: str) -> None:
    raise TypeError(
        f"model.{method}() is transformers' peft integration, which would add peft layers next to this "
        f"package's adapters. Use {instead} instead."
    )


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
        model.__class__ = adapter_aware_class(cls)
    setattr(model, STATE_ATTRIBUTE, state)
    model._hf_peft_config_loaded = True


def adapter_aware_class(cls: type) -> type:
    """The subclass of ``cls`` that prepared models get (one per class, made on first use)."""
    aware = _ADAPTER_AWARE_CLASSES.get(cls)
    if aware is None:
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_hf_peft_plugin_base": cls}
        if takes_labels(cls):  # a causal LM's training loss in chunks, never the full logits (loss.py)
            namespace["forward"] = chunked_forward(cls.forward)
        if hasattr(cls, "activation_checkpointing_enable"):  # keeps activation offload on (offload.py)
            namespace["activation_checkpointing_enable"] = keeping_offload(cls.activation_checkpointing_enable)
        aware = _ADAPTER_AWARE_CLASSES[cls] = type(cls.__name__, (AdapterModelMixin, cls), namespace)
    return aware


def _rebuild(cls: type) -> nn.Module:
    """Unpickling: an empty instance of the adapter-aware class of ``cls``; pickle then sets its state."""
    aware = adapter_aware_class(cls)
    return aware.__new__(aware)


def base_class(model: nn.Module) -> type:
    state = adapter_state(model)
    return state.original_class if state is not None and state.original_class is not None else type(model)
