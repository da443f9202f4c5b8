"""Whole modules trained per adapter (peft's ``modules_to_save``), e.g. a classification head.

The original module is kept frozen beside one trainable copy per adapter, so disabling or
switching adapters gives back the original head exactly. The in-memory names
(``original_module``, ``modules_to_save.<adapter>``) are peft's, which keeps the file-format
mapping trivial.
"""

from __future__ import annotations

import copy
from torch import nn

from .errors import AdapterNameError
from .state import ReadsAdapterState


class TrainableCopy(ReadsAdapterState, nn.Module):
    """Routes the forward to the active adapter's copy of ``original_module`` (active and disabled
    as the model's :class:`~hf_peft_plugin.state.AdapterState` says)."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise AdapterNameError(f"adapter {name!r} already has a copy of this module")
        trained = copy.deepcopy(self.original_module)
        for p in trained.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = trained
        self._state_changed()

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self._state_changed()

    def routed_module(self) -> nn.Module:
        """The module the forward runs: the first active adapter's copy (two active copies of one
        head cannot both answer), or the original when none is active or adapters are disabled."""
        if self.adapters_disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, *args, **kwargs):
        return self.routed_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "_modules" not in self.__dict__:  # half-built (unpickling, deepcopy): nothing to route to
                raise
            # Model code reads attributes of its head (``classifier.out_features``, ``.weight``):
            # those of the module that computes, i.e. the trained copy while it is active.
            return getattr(self.routed_module(), name)
