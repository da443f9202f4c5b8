"""Loading a trained adapter for inference in one call: the base quantized as it was in training,
the adapter on top (``load_pretrained``)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .config import QuantizationConfig
from .errors import AdapterLoadError
from .loading import _adapter_directory, load_adapter
from .model import load_base_model
from .peft_format import CONFIG_NAME, EXTRAS_CONFIG_NAME, EXTRAS_WEIGHTS_NAME, QUANTIZATION_METADATA, WEIGHTS_NAME


class _Recorded:
    def __repr__(self) -> str:
        return "RECORDED"


#: Default of :func:`load_pretrained`'s quantization arguments: take what the adapter recorded.
RECORDED: Any = _Recorded()
_FIELDS = ("bits", "quant_type", "double_quant", "compute_dtype")


def recorded_quantization(directory: str | os.PathLike) -> dict[str, Any] | None:
    """How the base was quantized when the adapter in ``directory`` was saved (``bits``,
    ``quant_type``, ``double_quant``, ``compute_dtype``), or ``None`` for an adapter that does not
    say (saved by peft, or by an older version of this package)."""
    for name in (WEIGHTS_NAME, EXTRAS_WEIGHTS_NAME):
        path = Path(directory) / name
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(QUANTIZATION_METADATA)
            if text:
                record = json.loads(text)
                if record.get("compute_dtype"):
                    record["compute_dtype"] = getattr(torch, record["compute_dtype"])
                return record
    return None


def load_pretrained(
    base: str | os.PathLike | None,
    adapter: str | os.PathLike,
    *,
    bits: int | None = RECORDED,
    quant_type: str = RECORDED,
    double_quant: bool = RECORDED,
    compute_dtype: torch.dtype | None = RECORDED,
    revision: str | None = None,
    token: str | bool | None = None,
    subfolder: str | None = None,
    strict: bool = False,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """The base model loaded (and quantized) as the adapter was trained, with the adapter on top,
    in eval mode: ready for ``generate`` or ``pipeline("text-generation", model=..., tokenizer=...)``.

    ``adapter``: a folder ``save_adapter``/the Trainer wrote, or a Hub repo id (``revision``,
    ``token``, ``subfolder`` as in :func:`load_adapter`). ``base``: a local path or Hub id (``None``:
    the ``base_model_name_or_path`` the adapter records). ``bits``, ``quant_type``,
    ``double_quant``, ``compute_dtype``: by default what the adapter recorded when it was saved
    (this package records them in the weights file's metadata); a value you pass wins, with a
    warning when it differs from the record. An adapter that records nothing (peft's) loads on
    ``prepare_model``'s defaults (4-bit NF4, double quantization). A base that does not look like the
    one the adapter was trained on warns (an :class:`AdapterLoadError` with ``strict=True``), as
    :func:`load_adapter` does. ``from_pretrained_kwargs`` (``device_map``, ``revision`` of the base...)
    go to ``from_pretrained``.
    """
    directory = _adapter_directory(adapter, subfolder, revision, token)
    config_file = next((directory / n for n in (CONFIG_NAME, EXTRAS_CONFIG_NAME) if (directory / n).is_file()), None)
    if config_file is None:
        raise AdapterLoadError(f"{directory} holds no {CONFIG_NAME}: pass the folder (or repo) save_adapter wrote.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if base is None:
        base = config.get("base_model_name_or_path")
        if not base:
            raise AdapterLoadError(f"The adapter in {directory} does not name its base model; pass base=<path or Hub id>.")

    record = recorded_quantization(directory)
    given = {"bits": bits, "quant_type": quant_type, "double_quant": double_quant, "compute_dtype": compute_dtype}
    defaults = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": None}
    chosen = {}
    for field in _FIELDS:
        value = given[field]
        saved = record[field] if record is not None and field in record else defaults[field]
        if value is RECORDED:
            chosen[field] = saved
            continue
        if record is not None and field in record and value != record[field]:
            warnings.warn(
                f"The adapter in {directory} was trained with {field}={record[field]!r}; loading with "
                f"{field}={value!r} as you asked (outputs will differ from training's).",
                UserWarning,
                stacklevel=2,
            )
        chosen[field] = value
    quant = QuantizationConfig(
        bits=chosen["bits"],
        quant_type=chosen["quant_type"],
        double_quant=chosen["double_quant"],
        compute_dtype=chosen["compute_dtype"],
    )
    task_type = config.get("task_type") or "CAUSAL_LM"
    model, _, _ = load_base_model(os.fspath(base), quant, task_type, dict(from_pretrained_kwargs))
    return load_adapter(model, directory, strict=strict).eval()
