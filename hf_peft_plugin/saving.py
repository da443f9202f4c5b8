"""Saving adapters to folders in the format of :mod:`~hf_peft_plugin.peft_format`.

Each adapter folder is written as one unit by :mod:`~hf_peft_plugin.atomic`: an interrupted or
concurrent save leaves the whole previous adapter or the whole new one, never a mix.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import safetensors
import safetensors.torch
import torch
from torch import nn

from .adapter_class import base_class
from .atomic import folder_lock, remove_folder, write_folder
from .bottleneck import BottleneckAdapter, bottleneck_width
from .config import BottleneckConfig, PromptTuningConfig
from .errors import AdapterNameError
from .heads import TrainableCopy
from .lora import LoraLinear
from .peft_format import (
    ADAPTER_NAME_METADATA,
    ARTIFACT_FILES,
    CONFIG_FOR_WEIGHTS,
    CONFIG_HASH_METADATA,
    CONFIG_NAME,
    EXTRAS_CONFIG_NAME,
    EXTRAS_FORMAT_VERSION,
    EXTRAS_WEIGHTS_NAME,
    INIT_TO_PEFT,
    LORA_PREFIX,
    PROMPT_INIT_TO_PEFT,
    PROMPT_KEY,
    PROMPT_PREFIX,
    WEIGHTS_NAME,
    QUANTIZATION_METADATA,
    adapter_subfolders,
    canonical_json,
    config_hash,
)
from .prompt import PROMPT_MODULE, SoftPrompt
from .state import AdapterState, require_state
from .targeting import suffix_matches


@dataclass
class Tensors:
    """A safetensors file to write: tensors plus header metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write adapter ``adapter_name`` (``None``: every adapter) of ``model`` to ``save_directory``.

    ``default`` lands in ``save_directory`` itself, any other adapter in ``save_directory/<name>``.
    Only the adapter tensors are written, never the frozen base weights. Each adapter folder is
    written as one unit (see :mod:`~hf_peft_plugin.atomic`): a reader, or a save killed halfway,
    sees the whole previous adapter or the whole new one. Saving every adapter (``None``) also
    removes what an earlier save left for adapters the model no longer has, so the folder holds
    exactly the model's adapters.
    """
    write_adapters(model, save_directory, adapter_name)


def write_adapters(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    extra_files: Callable[[Path], dict[str, bytes]] | None = None,
) -> None:
    """:func:`save_adapter`, plus ``extra_files(root)`` (name -> bytes) written with the root's adapter,
    in the same unit (what a Trainer checkpoint needs to resume)."""
    state = require_state(model)
    names = list(state.adapters) if adapter_name is None else [adapter_name]
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise AdapterNameError(f"Unknown adapter(s) {unknown}; this model has {list(state.adapters)}.")
    root = Path(save_directory)
    # Everything is built before the first byte is written: a bad adapter fails the whole save early.
    planned = {
        root if name == "default" else root / name: serialize(adapter_files(model, state, name), name) for name in names
    }
    if adapter_name is None:
        planned.setdefault(root, {})  # the root's leftovers of an earlier save go too
    if extra_files is not None:
        planned.setdefault(root, {}).update(extra_files(root))
    for directory in planned:
        directory.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as locks:
        for directory in sorted(planned, key=lambda d: str(d.resolve())):  # one order: no deadlock
            locks.enter_context(folder_lock(directory, exclusive=True))
        for directory, files in planned.items():
            write_folder(directory, files, remove=ARTIFACT_FILES)
        if adapter_name is None:
            for stale in _stale_adapter_folders(root, names):
                remove_folder(root / stale)


def _stale_adapter_folders(root: Path, names: list[str]) -> list[str]:
    """Sub-folders an earlier :func:`save_adapter` of a whole set wrote for an adapter not in ``names``.

    Recognised by the adapter name stamped in their weights (equal to the folder name), so a
    sub-folder that holds something else (a Trainer checkpoint, an adapter saved there on its own)
    is kept.
    """
    stale = []
    for sub in adapter_subfolders(root):
        if sub in names:
            continue
        with contextlib.suppress(Exception):  # unreadable: not ours to judge, keep it
            stamped = {
                safetensors.safe_open(str(root / sub / w), framework="pt").metadata().get(ADAPTER_NAME_METADATA)
                for w in (WEIGHTS_NAME, EXTRAS_WEIGHTS_NAME)
                if (root / sub / w).is_file()
            }
            if stamped == {sub}:
                stale.append(sub)
    return stale


def serialize(files: dict[str, dict | Tensors], name: str) -> dict[str, bytes]:
    """The bytes of each file. Weights carry the adapter's name and the SHA-256 of their config, so a
    config rewritten by someone else is caught on load."""
    out: dict[str, bytes] = {}
    for filename, content in files.items():
        if isinstance(content, Tensors):
            config = files[CONFIG_FOR_WEIGHTS[filename]]
            metadata = {**content.metadata, ADAPTER_NAME_METADATA: name, CONFIG_HASH_METADATA: config_hash(config)}
            out[filename] = safetensors_bytes(content.tensors, metadata)
        else:
            out[filename] = canonical_json(content)
    return out


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file with its metadata in sorted order: safetensors writes the map in random
    order, and identical adapters must give identical bytes (or every unchanged push would make a
    new commit)."""
    data = safetensors.torch.save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data must stay 8-byte aligned
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def adapter_files(model: nn.Module, state: AdapterState, name: str) -> dict[str, dict | Tensors]:
    """File name -> JSON object or tensors, for one adapter set (see the module docstring)."""
    spec = state.adapters[name]
    metadata = {"format": "pt", QUANTIZATION_METADATA: _quantization_json(state)}
    files: dict[str, dict | Tensors] = {}
    extras: dict[str, Any] = {}
    extra_tensors: dict[str, torch.Tensor] = {}
    heads = _head_tensors(model, spec.modules_to_save, name)
    if spec.lora is not None:
        files[CONFIG_NAME] = _lora_config_json(model, state, name)
        tensors = _lora_tensors(model, spec.lora_targets, name)
        tensors.update({LORA_PREFIX + k: v for k, v in heads.items()})
        files[WEIGHTS_NAME] = Tensors(tensors, metadata)
        if spec.prompt is not None:
            extras["prompt"] = _prompt_json(spec.prompt, _soft_prompt(model, name))
            extra_tensors[PROMPT_KEY] = _soft_prompt(model, name)
    elif spec.prompt is not None:
        files[CONFIG_NAME] = _prompt_config_json(model, state, name)
        tensors = {PROMPT_KEY: _soft_prompt(model, name), **{PROMPT_PREFIX + k: v for k, v in heads.items()}}
        files[WEIGHTS_NAME] = Tensors(tensors, metadata)
    elif heads:
        extras["modules_to_save"] = list(spec.modules_to_save)
        extra_tensors.update({LORA_PREFIX + k: v for k, v in heads.items()})
    if spec.bottleneck is not None:
        extras["bottleneck"] = _bottleneck_json(spec.bottleneck, bottleneck_width(model, spec.bottleneck))
        extra_tensors.update(_bottleneck_tensors(model, name))
    if extras:
        extras.update(
            hf_peft_plugin_format=EXTRAS_FORMAT_VERSION,
            task_type=state.task_type,
            base_model_name_or_path=state.base_model_name_or_path,
            base_model_class=base_class(model).__name__,
        )
        files[EXTRAS_CONFIG_NAME] = extras
        files[EXTRAS_WEIGHTS_NAME] = Tensors(extra_tensors, metadata)
    return files


def _quantization_json(state: AdapterState) -> str:
    q = state.quantization
    record: dict[str, Any] = {"bits": None if q is None else q.bits, "compute_dtype": str(state.compute_dtype).removeprefix("torch.")}
    if q is not None and q.bits == 4:
        record.update(quant_type=q.quant_type, double_quant=q.double_quant)
    return json.dumps(record, sort_keys=True)


def _saved(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous()


def _lora_tensors(model: nn.Module, targets: tuple[str, ...], name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in targets:
        layer = model.get_submodule(path)
        key = LORA_PREFIX + path
        tensors[f"{key}.lora_A.weight"] = _saved(layer.lora_A[name].weight)
        tensors[f"{key}.lora_B.weight"] = _saved(layer.lora_B[name].weight)
        if name in layer.lora_magnitude_vector:
            tensors[f"{key}.lora_magnitude_vector"] = _saved(layer.lora_magnitude_vector[name])
    return tensors


def _head_tensors(model: nn.Module, paths: tuple[str, ...], name: str) -> dict[str, torch.Tensor]:
    """``<head path>.<key>`` -> tensor of the adapter's trained copy (state dict, as peft saves it)."""
    tensors = {}
    for path in paths:
        trained = model.get_submodule(path).modules_to_save[name]
        tensors.update({f"{path}.{k}": _saved(v) for k, v in trained.state_dict().items()})
    return tensors


def _soft_prompt(model: nn.Module, name: str) -> torch.Tensor:
    return _saved(getattr(model, PROMPT_MODULE).embeddings[name])


def _bottleneck_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for path, module in model.named_modules():
        if isinstance(module, BottleneckAdapter) and name in module.down:
            for part in ("down", "up"):
                for k, v in getattr(module, part)[name].state_dict().items():
                    tensors[f"{LORA_PREFIX}{path}.{part}.{k}"] = _saved(v)
    return tensors


def _auto_mapping(model: nn.Module) -> dict[str, str]:
    """peft's own field for the base model's class; the load-time architecture check reads it."""
    cls = base_class(model)
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def _lora_config_json(model: nn.Module, state: AdapterState, name: str) -> dict[str, Any]:
    spec = state.adapters[name]
    cfg = spec.lora
    layers = [model.get_submodule(p) for p in spec.lora_targets]
    return {
        "peft_type": "LORA",
        "task_type": state.task_type,
        "base_model_name_or_path": state.base_model_name_or_path,
        "auto_mapping": _auto_mapping(model),
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _peft_target_modules(model, spec.lora_targets),
        "exclude_modules": None,
        "rank_pattern": dict(cfg.rank_pattern),
        "alpha_pattern": dict(cfg.alpha_pattern),
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": INIT_TO_PEFT[cfg.init],
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers),
        "bias": "none",
        "lora_bias": False,
        "modules_to_save": list(spec.modules_to_save) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _peft_target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The short names (``["q_proj", "v_proj"]``) when peft's suffix matching picks exactly
    ``targets`` from the base model by them, else the full paths: either way peft adapts the same
    layers, and servers such as vLLM see the familiar short form."""
    short = sorted({p.rpartition(".")[2] for p in targets})
    matched = {p for p in _base_module_paths(model) if suffix_matches(p, short)}
    return short if matched == set(targets) else sorted(targets)


def _base_module_paths(module: nn.Module, prefix: str = "") -> list[str]:
    """Module paths as peft sees them in the base model: wrappers stand for what they wrap, and
    adapter modules (which the base model does not have) are left out."""
    paths = []
    for name, child in module.named_children():
        path = prefix + name
        if isinstance(child, LoraLinear):
            paths.append(path)
        elif isinstance(child, TrainableCopy):
            paths += [path, *_base_module_paths(child.original_module, path + ".")]
        elif not _is_adapter_module(child):
            paths += [path, *_base_module_paths(child, path + ".")]
    return paths


def _is_adapter_module(module: nn.Module) -> bool:
    return isinstance(module, (BottleneckAdapter, SoftPrompt))


def _prompt_json(cfg: PromptTuningConfig, prompt: torch.Tensor) -> dict[str, Any]:
    return {
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "init": cfg.init,
        "init_text": cfg.init_text,
        "tokenizer_name_or_path": cfg.tokenizer_name_or_path,
    }


def _prompt_config_json(model: nn.Module, state: AdapterState, name: str) -> dict[str, Any]:
    spec = state.adapters[name]
    prompt = _soft_prompt(model, name)
    text_config = model.config.get_text_config()
    init, tokenizer = spec.prompt.init, spec.prompt.tokenizer_name_or_path
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": state.task_type,
        "base_model_name_or_path": state.base_model_name_or_path,
        "auto_mapping": _auto_mapping(model),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        # peft's TEXT init needs the tokenizer's name; without one, RANDOM (the prompt is in the file anyway).
        "prompt_tuning_init": "RANDOM" if init == "text" and not tokenizer else PROMPT_INIT_TO_PEFT[init],
        "prompt_tuning_init_text": spec.prompt.init_text,
        "tokenizer_name_or_path": tokenizer,
        "tokenizer_kwargs": None,
        "modules_to_save": list(spec.modules_to_save) or None,
    }


def _bottleneck_json(cfg: BottleneckConfig, width: int) -> dict[str, Any]:
    return {
        "reduction_factor": cfg.reduction_factor,
        "bottleneck_size": width,
        "non_linearity": cfg.non_linearity,
        "placement": cfg.placement,
        "layers": None if cfg.layers is None else list(cfg.layers),
    }
