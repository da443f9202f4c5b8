"""Load a quantized base straight into FSDP shards, one decoder block at a time.

Why. ``from_pretrained`` builds the whole quantized model in each process before anything can be
sharded, so with FSDP every rank still needs the memory of the full base once: a 70B model in 4-bit
(~35 GB) cannot be loaded onto a 24 GB GPU even though its shard (17.5 GB on 2 ranks) fits. Here
the model is built on the meta device, then each block is read from the safetensors files, each of
its linear layers quantized as it arrives (the full-precision copy of one layer at a time), and the
block sharded with ``fully_shard`` before the next is read. A rank therefore holds its shards of the
blocks done so far plus one quantized block: about ``1/N`` of the base, not all of it.

Every rank reads the same files (the OS page cache shares them between the processes of one
machine) and quantizes the same tensors the same way, so the shards fit together without a
broadcast. Loading consumes no random numbers, so adapters initialised afterwards come out as they
would after ``from_pretrained``.

:func:`streamable` says when this applies (a local folder or Hub repository of safetensors whose
names match the model's); otherwise ``prepare_model(fsdp=True)`` loads with ``from_pretrained`` and
shards after.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import ShardingError
from .quantization import QuantizationConfig, freeze_backbone, is_quantized_linear, quantizable_linears, quantized_layer

logger = logging.getLogger(__name__)

#: Set on a model loaded here: a :class:`ShardedLoad` describing what the load held.
LOAD_ATTRIBUTE = "hf_peft_plugin_sharded_load"

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


@dataclass(frozen=True)
class ShardedLoad:
    """What a rank held while loading: the most at any point, and what it holds once loaded.

    Counted from the tensors themselves (a DTensor by its local shard), after each layer arrives.
    ``full_bytes`` is what one rank would hold after a whole-model load (every shard complete)."""

    peak_bytes: int
    final_bytes: int
    full_bytes: int
    units: int


def checkpoint_files(path: str) -> dict[str, str] | None:
    """Tensor name -> safetensors file in a local model folder; ``None`` when it has none."""
    if not os.path.isdir(path):
        return None
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, _SINGLE)
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    return None


def _skeleton(path: str, auto_class: Any, dtype: torch.dtype, kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, **kwargs)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = auto_class.from_config(config, dtype=dtype)
    return model.eval()  # as from_pretrained returns it


def _missing_names(model: nn.Module, files: dict[str, str]) -> list[str]:
    """Persistent tensors of ``model`` that no file holds (a tied copy of a held tensor is fine)."""
    state = model.state_dict(keep_vars=True)
    held = {id(t) for name, t in state.items() if name in files}
    return [name for name, t in state.items() if name not in files and id(t) not in held]


#: ``from_pretrained`` arguments streaming honours: where the files come from, and remote code.
_HUB_ARGUMENTS = ("revision", "token", "cache_dir", "local_files_only")
_STREAM_ARGUMENTS = (*_HUB_ARGUMENTS, "trust_remote_code")


def _local_folder(path: str, kwargs: dict[str, Any]) -> str | None:
    """``path`` itself when it is a folder; for a Hub id, its config and safetensors files fetched
    into the Hub cache (each rank asks; the cache's locks make one download); else ``None``."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in _HUB_ARGUMENTS if k in kwargs}
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"], **hub)
    except Exception as exc:  # noqa: BLE001  not an id, offline, no such repo: from_pretrained, next, says which
        logger.info("prepare_model(fsdp=True): could not fetch %s for streaming: %s", path, type(exc).__name__)
        return None


def streamable(path: str, auto_class: Any, dtype: torch.dtype, kwargs: dict[str, Any]) -> tuple[nn.Module, dict] | None:
    """The meta skeleton and the file index when ``path`` (a local folder or a Hub id) can be
    streamed into shards, else ``None`` with a log line saying why (``prepare_model`` then loads the
    whole model on each rank and shards it after)."""
    unsupported = sorted(set(kwargs) - set(_STREAM_ARGUMENTS))
    folder = None if unsupported else _local_folder(path, kwargs)
    files = None if folder is None else checkpoint_files(folder)
    why = None
    if unsupported:
        why = f"it was given from_pretrained arguments streaming does not take ({unsupported})"
    elif files is None:
        why = "it is neither a local folder nor a Hub repository of safetensors files"
    if why is None:
        model = _skeleton(folder, auto_class, dtype, {k: v for k, v in kwargs.items() if k == "trust_remote_code"})
        model.config._name_or_path = path  # the id the adapter's config names, not the cache folder
        missing = _missing_names(model, files)
        if not missing:
            return model, files
        why = f"its files do not hold {missing[:3]} under the model's own names"
    logger.warning(
        "prepare_model(fsdp=True): %s cannot be loaded block by block into shards: %s. Loading the "
        "whole model on each rank, then sharding it (each rank needs the memory of the full base once).",
        path,
        why,
    )
    return None


class _Reader:
    """Reads single tensors from the checkpoint's files. A file stays mapped only until
    :meth:`close` (called after each unit), so the pages already read stop counting towards the
    process's resident memory instead of adding up to the whole checkpoint."""

    def __init__(self, files: dict[str, str]) -> None:
        self._files = files
        self._open: dict[str, Any] = {}

    def __call__(self, name: str) -> torch.Tensor:
        """The tensor as stored; it may view the mapped file, so callers copy it (``copy=True``):
        a view would keep the whole mapping, and every page read through it, resident."""
        from safetensors import safe_open

        file = self._files[name]
        if file not in self._open:
            self._open[file] = safe_open(file, framework="pt")
        return self._open[file].get_tensor(name)

    def close(self) -> None:
        self._open.clear()


def _materialize(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    read: _Reader,
    quantize: dict[str, nn.Module],
    quant: QuantizationConfig,
    compute_dtype: torch.dtype,
    device: torch.device,
    done: dict[int, torch.Tensor],
    on_layer: Any,
) -> None:
    """Give ``modules`` their real tensors from the checkpoint, quantizing the linears in ``quantize``
    as they arrive. ``done`` maps a meta tensor to its real one, so tied weights stay tied."""
    for path, module in modules:
        if path in quantize:
            for name in ("weight", "bias"):
                if getattr(module, name, None) is not None:
                    key = f"{path}.{name}"
                    value = read(key).to(device=device, dtype=getattr(module, name).dtype, copy=True)
                    setattr(module, name, nn.Parameter(value, requires_grad=False))
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, quantized_layer(module, quant, compute_dtype))
            module.weight = module.bias = None  # the full-precision copy goes now, not at the end
            on_layer()
            continue
        prefix = f"{path}." if path else ""
        nonpersistent = module._non_persistent_buffers_set
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for name, meta in list(tensors.items()):
                if meta is None or meta.device.type != "meta":
                    continue
                if id(meta) in done:
                    tensors[name] = done[id(meta)]
                    continue
                if kind == "_buffers" and name in nonpersistent:
                    real = torch.empty_like(meta, device=device)  # filled by the model's initialiser below
                else:
                    real = read(prefix + name).to(device=device, dtype=meta.dtype, copy=True)
                if kind == "_parameters":
                    real = nn.Parameter(real, requires_grad=False)
                tensors[name] = done[id(meta)] = real
        if any(n in nonpersistent for n in module._buffers):
            model._init_weights(module)  # e.g. rotary inv_freq, computed from the config
        on_layer()


def resident_bytes(model: nn.Module) -> int:
    """Bytes this rank holds for ``model``: real tensors (a DTensor by its local shard) and the
    4-bit quantization constants; meta tensors count nothing."""
    from torch.distributed.tensor import DTensor

    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        local = t.to_local() if isinstance(t, DTensor) else t
        key = local.data_ptr() if local.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += local.numel() * local.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for module in model.modules():
        state = getattr(module, "quant_state", None) if is_quantized_linear(module) else None
        if state is not None:
            nested = getattr(state, "state2", None)
            for t in (state.absmax, getattr(state, "code", None), nested and nested.absmax, nested and nested.code):
                add(t)
    return total


def load_into_shards(
    model: nn.Module,
    files: dict[str, str],
    quant: QuantizationConfig,
    compute_dtype: torch.dtype,
    units: list[tuple[str, nn.Module]],
    device: torch.device,
    shard_unit: Any,
    check_unit: Any,
) -> list[RemovableHandle]:
    """Materialize the meta ``model`` from ``files``: each unit loaded (its linears quantized), frozen
    (norms upcast as :func:`freeze_backbone` does), checked by ``check_unit(unit, path)`` and
    sharded by ``shard_unit(unit)`` before the next one is read; then the rest (embeddings, final
    norm, head), left unsharded for the caller. Tensors are placed on ``device``. Returns the norm
    hooks freezing registered."""
    read = _Reader(files)
    quantize = dict(quantizable_linears(model, quant.skip_modules)) if quant.bits is not None else {}
    done: dict[int, torch.Tensor] = {}
    peak = 0

    def on_layer() -> None:
        nonlocal peak
        peak = max(peak, resident_bytes(model))

    handles: list[RemovableHandle] = []
    for path, unit in units:
        modules = list(unit.named_modules(prefix=path))
        _materialize(model, modules, read, quantize, quant, compute_dtype, device, done, on_layer)
        handles += freeze_backbone(unit, quantized=quant.bits is not None)
        read.close()
        check_unit(unit, path)
        shard_unit(unit)
        on_layer()
    in_a_unit = tuple(path for path, _ in units)
    rest = [(p, m) for p, m in model.named_modules() if not any(p == u or p.startswith(u + ".") for u in in_a_unit)]
    _materialize(model, rest, read, quantize, quant, compute_dtype, device, done, on_layer)
    read.close()
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if left:  # the files were checked against the names up front: this is a bug, not bad input
        raise ShardingError(f"Loading into shards left {left[:3]} on the meta device; load without fsdp=True.")
    final = resident_bytes(model)
    full = final + sum(_gathered_extra(p) for p in model.parameters())
    setattr(model, LOAD_ATTRIBUTE, ShardedLoad(peak_bytes=max(peak, final), final_bytes=final, full_bytes=full, units=len(units)))
    return handles


def _gathered_extra(p: torch.Tensor) -> int:
    """Bytes a sharded parameter would add on this rank if it were whole."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return 0
    return (p.numel() - p.to_local().numel()) * p.element_size()
