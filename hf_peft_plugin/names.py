"""Adapter names double as folder names in saved artifacts and as keys of ``nn.ModuleDict``s,
so they are checked in one place, before anything is built."""

from __future__ import annotations

import re

from torch import nn

from .errors import AdapterNameError

_VALID_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def validate_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _VALID_NAME.match(name):
        raise AdapterNameError(
            f"Adapter name {name!r} is not allowed: use letters, digits, '_' or '-' (no '.', no path "
            "separators: the name becomes a folder name when saved and a module key in memory)."
        )
    if hasattr(nn.ModuleDict(), name):
        raise AdapterNameError(
            f"Adapter name {name!r} clashes with an attribute of torch.nn.Module; pick another name."
        )
