"""Adapter artifacts: saving, loading and merging, in the PEFT file format.

Layout of one saved adapter set. With several named adapters, ``default`` goes to the folder itself
and every other one to a sub-folder named after it (peft's convention; load one of those with
``load_adapter(base, folder_or_repo, subfolder=name, adapter_name=name)``).

* LoRA / DoRA, with any ``modules_to_save`` heads: peft's own pair, ``adapter_config.json``
  (``peft_type: "LORA"``) + ``adapter_model.safetensors`` with keys
  ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` / ``.lora_magnitude_vector``
  and ``base_model.model.<head path>.<param>`` for the trained heads.
* A soft prompt without LoRA: peft's ``PROMPT_TUNING`` pair (``prompt_embeddings`` of shape
  ``(num_virtual_tokens, token_dim)``; heads under ``base_model.<head path>.<param>``).
* What peft has no format for, bottleneck adapters and a soft prompt *next to* LoRA (a peft
  adapter holds one method), goes to this package's own pair beside peft's:
  ``hf_peft_plugin_config.json`` + ``hf_peft_plugin_adapter.safetensors`` (keys
  ``prompt_embeddings``, ``base_model.model.<block>.bottleneck_{attn,ffn}.{down,up}.{weight,bias}``
  and, for a bottleneck-only adapter, its heads as in the LoRA file).

Why: the peft pair always holds the part peft understands, so ``PeftModel.from_pretrained``, vLLM,
TGI or llama.cpp's converter load the LoRA of a combined adapter unchanged (and never look at the
extra files), while this package loads the whole set.

Only safetensors is read or written: ``adapter_model.bin`` is a pickle, which can run code when
loaded, and is refused. Every file goes to a temporary file in its folder and is moved into place
with ``os.replace``, so an interrupted save leaves the previous file whole. A load validates the
files against the model (paths, shapes, ranks, hidden size) before changing anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import safetensors
import safetensors.torch
import torch
from torch import nn

from .bottleneck import MODULE_NAMES, BottleneckAdapter, bottleneck_width
from .config import BottleneckConfig, LoraConfig, PromptTuningConfig, QuantizationConfig
from .errors import AdapterLoadError, AdapterNameError, ConfigError, MergeError, TargetModulesError
from .heads import TrainableCopy
from .lora import LoraLinear, plain_linear, was_conv1d
from .names import validate_adapter_name
from .prompt import PROMPT_MODULE, SoftPrompt
from .quantization import (
    adopt_or_quantize,
    dequantized_weight,
    freeze_backbone,
    is_linear,
    is_quantized_linear,
    linear_shape,
    requantized_like,
)
from .state import STATE_ATTRIBUTE, TASK_HEADS, AdapterState, adapter_state, infer_task_type, require_state
from .targeting import (
    AdapterPlan,
    activate_adapters,
    adapter_layers,
    apply_adapter_plan,
    head_paths,
    plan_adapter_set,
    suffix_matches,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
EXTRAS_CONFIG_NAME = "hf_peft_plugin_config.json"
EXTRAS_WEIGHTS_NAME = "hf_peft_plugin_adapter.safetensors"
ARTIFACT_FILES = (CONFIG_NAME, WEIGHTS_NAME, EXTRAS_CONFIG_NAME, EXTRAS_WEIGHTS_NAME)
EXTRAS_FORMAT_VERSION = 1
#: Key prefixes peft uses: tuners (LoRA) wrap the model twice, prompt learning once.
LORA_PREFIX = "base_model.model."
PROMPT_PREFIX = "base_model."
PROMPT_KEY = "prompt_embeddings"
#: safetensors metadata entry naming the base model class, checked on load.
BASE_CLASS_METADATA = "hf_peft_plugin.base_model_class"

_INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}
_PROMPT_INIT_TO_PEFT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}

# peft 0.21 LoraConfig fields, by what loading does with them.
_LORA_FIELDS_USED = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "rank_pattern", "alpha_pattern", "use_rslora",
    "use_dora", "init_lora_weights", "modules_to_save", "base_model_name_or_path",
}  # fmt: skip
#: Targets come from the tensor names, so the selectors are informational; the rest is bookkeeping.
_LORA_FIELDS_INFORMATIONAL = {
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "revision",
    "inference_mode", "peft_version", "auto_mapping", "megatron_core", "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
#: Features this package does not implement: loadable only while off (None / False / "none" / empty).
_LORA_FIELDS_MUST_BE_OFF = {
    "bias", "lora_bias", "use_qalora", "layer_replication", "trainable_token_indices", "target_parameters",
    "alora_invocation_tokens", "megatron_config", "loftq_config", "eva_config", "corda_config", "arrow_config",
    "kasa_config", "velora_config", "monteclora_config", "lora_ga_config", "use_bdlora",
}  # fmt: skip
_PROMPT_FIELDS_USED = {
    "peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_transformer_submodules", "prompt_tuning_init",
    "prompt_tuning_init_text", "tokenizer_name_or_path", "modules_to_save", "base_model_name_or_path",
}  # fmt: skip
_PROMPT_FIELDS_INFORMATIONAL = {
    "num_attention_heads", "num_layers", "revision", "inference_mode", "peft_version", "auto_mapping",
    "tokenizer_kwargs",
}  # fmt: skip
_EXTRAS_FIELDS = {
    "hf_peft_plugin_format",
    "task_type",
    "base_model_name_or_path",
    "base_model_class",
    "prompt",
    "bottleneck",
    "modules_to_save",
}
#: init_lora_weights values whose base model is the untouched one (the weights come from the file).
_PEFT_INITS_PLAIN = (True, False, "gaussian", "eva", "orthogonal")


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
        if is_main_process:
            save_adapter(self, save_directory)

    def save_adapter(self, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
        save_adapter(self, save_directory, adapter_name)

    def load_adapter(self, path_or_repo: str | os.PathLike, adapter_name: str = "default", **kwargs: Any) -> nn.Module:
        return load_adapter(self, path_or_repo, adapter_name=adapter_name, **kwargs)

    def get_adapter_state_dict(
        self, adapter_name: str | None = None, state_dict: Any = None
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the keys :func:`save_adapter` writes (``None``: the first active one)."""
        state = require_state(self)
        name = adapter_name or (state.active[0] if state.active else next(iter(state.adapters)))
        files = _adapter_files(self, state, name).values()
        return {k: v for f in files if isinstance(f, _Tensors) for k, v in f.tensors.items()}

    def active_adapters(self) -> list[str]:
        return list(require_state(self).active)

    def enable_adapters(self) -> None:
        for _, layer in adapter_layers(self):
            layer.adapters_disabled = False

    def disable_adapters(self) -> None:
        """Until :meth:`enable_adapters`, compute what the base model computes (transformers' API;
        ``with hf_peft_plugin.disable_adapters(model):`` is the scoped form)."""
        for _, layer in adapter_layers(self):
            layer.adapters_disabled = True

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
        aware = _ADAPTER_AWARE_CLASSES.get(cls)
        if aware is None:
            aware = type(
                cls.__name__, (AdapterModelMixin, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
            )
            _ADAPTER_AWARE_CLASSES[cls] = aware
        model.__class__ = aware
    setattr(model, STATE_ATTRIBUTE, state)
    model._hf_peft_config_loaded = True


def _base_class(model: nn.Module) -> type:
    state = adapter_state(model)
    return state.original_class if state is not None and state.original_class is not None else type(model)


# -- saving --------------------------------------------------------------------------------------


@dataclass
class _Tensors:
    """A safetensors file to write: tensors plus header metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, adapter_name: str | None = None) -> None:
    """Write adapter ``adapter_name`` (``None``: every adapter) of ``model`` to ``save_directory``.

    ``default`` lands in ``save_directory`` itself, any other adapter in ``save_directory/<name>``.
    Only the adapter tensors are written, never the frozen base weights.
    """
    state = require_state(model)
    names = list(state.adapters) if adapter_name is None else [adapter_name]
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise AdapterNameError(f"Unknown adapter(s) {unknown}; this model has {list(state.adapters)}.")
    root = Path(save_directory)
    # Everything is built before the first byte is written: a bad adapter fails the whole save early.
    planned = [(root if name == "default" else root / name, _adapter_files(model, state, name)) for name in names]
    for directory, files in planned:
        directory.mkdir(parents=True, exist_ok=True)
        for filename, content in files.items():
            if isinstance(content, _Tensors):
                write_atomically(directory / filename, lambda tmp, c=content: _save_safetensors(c, tmp))
            else:
                text = json.dumps(content, indent=2, sort_keys=True) + "\n"
                write_atomically(directory / filename, lambda tmp, t=text: Path(tmp).write_text(t, encoding="utf-8"))
        for stale in set(ARTIFACT_FILES) - set(files):  # e.g. the extras of an earlier save of another kind
            with contextlib.suppress(FileNotFoundError):
                (directory / stale).unlink()


def _save_safetensors(content: _Tensors, path: str) -> None:
    safetensors.torch.save_file(content.tensors, path, metadata=content.metadata)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """``write`` a temporary file next to ``path``, flush it to disk, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _adapter_files(model: nn.Module, state: AdapterState, name: str) -> dict[str, dict | _Tensors]:
    """File name -> JSON object or tensors, for one adapter set (see the module docstring)."""
    spec = state.adapters[name]
    # One metadata key only: safetensors writes a map's keys in random order, and identical
    # adapters must give identical bytes (or every unchanged push would make a new commit).
    metadata = {"format": "pt"}
    files: dict[str, dict | _Tensors] = {}
    extras: dict[str, Any] = {}
    extra_tensors: dict[str, torch.Tensor] = {}
    heads = _head_tensors(model, spec.modules_to_save, name)
    if spec.lora is not None:
        files[CONFIG_NAME] = _lora_config_json(model, state, name)
        tensors = _lora_tensors(model, spec.lora_targets, name)
        tensors.update({LORA_PREFIX + k: v for k, v in heads.items()})
        files[WEIGHTS_NAME] = _Tensors(tensors, metadata)
        if spec.prompt is not None:
            extras["prompt"] = _prompt_json(spec.prompt, _soft_prompt(model, name))
            extra_tensors[PROMPT_KEY] = _soft_prompt(model, name)
    elif spec.prompt is not None:
        files[CONFIG_NAME] = _prompt_config_json(model, state, name)
        tensors = {PROMPT_KEY: _soft_prompt(model, name), **{PROMPT_PREFIX + k: v for k, v in heads.items()}}
        files[WEIGHTS_NAME] = _Tensors(tensors, metadata)
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
            base_model_class=_base_class(model).__name__,
        )
        files[EXTRAS_CONFIG_NAME] = extras
        files[EXTRAS_WEIGHTS_NAME] = _Tensors(extra_tensors, metadata)
    return files


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
    cls = _base_class(model)
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
        "init_lora_weights": _INIT_TO_PEFT[cfg.init],
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
        "prompt_tuning_init": "RANDOM" if init == "text" and not tokenizer else _PROMPT_INIT_TO_PEFT[init],
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


# -- reading -------------------------------------------------------------------------------------


@dataclass
class _Artifact:
    """What one adapter folder holds, parsed and checked on its own (no model involved yet)."""

    directory: Path
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    base_class: str | None = None
    lora: LoraConfig | None = None
    prompt: PromptTuningConfig | None = None
    bottleneck: BottleneckConfig | None = None
    head_names: tuple[str, ...] = ()
    #: LoRA module path -> {"lora_A": ..., "lora_B": ..., "lora_magnitude_vector": ...}
    lora_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: Keys not yet assigned to a module (heads, bottleneck parts), prefix removed.
    module_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    prompt_weight: torch.Tensor | None = None
    #: token_dim recorded in the config, checked against the model's hidden size.
    token_dim: int | None = None


def adapter_config_file(directory: Path) -> Path | None:
    """The config that makes ``directory`` an adapter folder (peft's, else this package's own), or ``None``."""
    return next((directory / n for n in (CONFIG_NAME, EXTRAS_CONFIG_NAME) if (directory / n).is_file()), None)


def adapter_subfolders(directory: Path) -> list[str]:
    """Names of the sub-folders of ``directory`` that are adapter folders (``save_adapter`` puts
    every adapter but ``default`` in one)."""
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and adapter_config_file(d) is not None)


def _read_artifact(directory: Path) -> _Artifact:
    peft_config_file, extras_config_file = directory / CONFIG_NAME, directory / EXTRAS_CONFIG_NAME
    if not directory.is_dir():
        raise AdapterLoadError(f"{directory} does not exist.")
    if adapter_config_file(directory) is None:
        subfolders = adapter_subfolders(directory)
        hint = (
            f" It holds adapters in sub-folders {subfolders}: pass subfolder={subfolders[0]!r} (one per folder)."
            if subfolders
            else " Pass the folder that save_adapter (or peft's save_pretrained) wrote."
        )
        raise AdapterLoadError(f"{directory} holds no adapter: {CONFIG_NAME} is missing.{hint}")
    artifact = _Artifact(directory)
    if peft_config_file.is_file():
        config = _read_json(peft_config_file)
        tensors, metadata = _read_safetensors(_weights_file(directory, WEIGHTS_NAME))
        artifact.base_class = (config.get("auto_mapping") or {}).get("base_model_class") or metadata.get(
            BASE_CLASS_METADATA
        )
        peft_type = config.get("peft_type")
        if peft_type == "LORA":
            _parse_lora(artifact, config, tensors)
        elif peft_type == "PROMPT_TUNING":
            _parse_prompt(artifact, config, tensors)
        elif peft_type is None:
            raise AdapterLoadError(f"{peft_config_file} lacks the required field 'peft_type'.")
        else:
            raise AdapterLoadError(
                f"{peft_config_file} has peft_type={peft_type!r}, which hf_peft_plugin cannot load: it loads "
                "'LORA' (including DoRA) and 'PROMPT_TUNING' adapters. Load this one with peft itself."
            )
    if extras_config_file.is_file():
        tensors, metadata = _read_safetensors(_weights_file(directory, EXTRAS_WEIGHTS_NAME))
        extras_config = _read_json(extras_config_file)
        artifact.base_class = (
            artifact.base_class or extras_config.get("base_model_class") or metadata.get(BASE_CLASS_METADATA)
        )
        _parse_extras(artifact, extras_config, tensors)
    return artifact


def _weights_file(directory: Path, name: str) -> Path:
    path = directory / name
    if path.is_file():
        return path
    if (directory / PICKLE_WEIGHTS_NAME).exists():
        raise AdapterLoadError(
            f"{directory} holds {PICKLE_WEIGHTS_NAME}, a pickle file, which can run arbitrary code when loaded and is "
            "never opened here. Convert it in an environment you trust, e.g. with peft: "
            "`PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)`, "
            f"which writes {WEIGHTS_NAME}."
        )
    raise AdapterLoadError(
        f"{path} is missing: the adapter folder holds a config but no weights (only safetensors is read; a pickle "
        f"{PICKLE_WEIGHTS_NAME} never is)."
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{path} is not valid JSON ({exc}); the file is corrupted.") from None
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{path} must hold a JSON object; it holds a {type(config).__name__}.")
    return config


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type, or OSError, for broken files
        raise AdapterLoadError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is truncated or corrupted. "
            "Save or download the adapter again."
        ) from None
    return tensors, metadata


def _check_fields(
    config: dict[str, Any], path: Path, used: set[str], informational: set[str], off: set[str] = frozenset()
) -> None:
    unsupported = {k: v for k, v in config.items() if k in off and not _is_off(v)}
    if unsupported:
        raise AdapterLoadError(
            f"{path} turns on {unsupported}: features hf_peft_plugin does not implement, so this adapter would not "
            "compute what it was trained to. Load it with peft."
        )
    unknown = sorted(set(config) - used - informational - off)
    if unknown:
        warnings.warn(f"{path}: ignoring unknown field(s) {unknown}.", UserWarning, stacklevel=4)


def _is_off(value: Any) -> bool:
    return value is None or value is False or value == "none" or value == {} or value == []


def _require(config: dict[str, Any], path: Path, names: tuple[str, ...]) -> None:
    missing = [n for n in names if config.get(n) is None]
    if missing:
        raise AdapterLoadError(f"{path} lacks the required field(s) {missing}; the file is incomplete.")


def _config_error(path: Path, exc: ConfigError) -> AdapterLoadError:
    return AdapterLoadError(f"{path} holds an invalid setting: {exc}")


def _common_fields(artifact: _Artifact, config: dict[str, Any]) -> None:
    artifact.task_type = artifact.task_type or config.get("task_type")
    artifact.base_model_name_or_path = artifact.base_model_name_or_path or config.get("base_model_name_or_path")
    artifact.head_names += tuple(config.get("modules_to_save") or ())


def _parse_lora(artifact: _Artifact, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    path = artifact.directory / CONFIG_NAME
    _check_fields(config, path, _LORA_FIELDS_USED, _LORA_FIELDS_INFORMATIONAL, _LORA_FIELDS_MUST_BE_OFF)
    _require(config, path, ("r", "lora_alpha"))
    init = config.get("init_lora_weights", True)
    if init not in _PEFT_INITS_PLAIN and init != "pissa":
        raise AdapterLoadError(
            f"{path} has init_lora_weights={init!r}: that initialisation rewrites the base weights in a way "
            "hf_peft_plugin cannot reproduce, so the adapter only fits peft's modified base. Load it with peft."
        )
    try:
        artifact.lora = LoraConfig(
            r=config["r"],
            alpha=config["lora_alpha"],
            dropout=config.get("lora_dropout") or 0.0,
            rank_pattern=dict(config.get("rank_pattern") or {}),
            alpha_pattern=dict(config.get("alpha_pattern") or {}),
            use_rslora=bool(config.get("use_rslora", False)),
            use_dora=bool(config.get("use_dora", False)),
            init="pissa" if init == "pissa" else "default",
        )
    except ConfigError as exc:
        raise _config_error(path, exc) from None
    _common_fields(artifact, config)
    suffixes = {
        ".lora_A.weight": "lora_A",
        ".lora_B.weight": "lora_B",
        ".lora_magnitude_vector": "lora_magnitude_vector",
    }
    for key, tensor in tensors.items():
        if not key.startswith(LORA_PREFIX):
            raise AdapterLoadError(
                f"{artifact.directory / WEIGHTS_NAME} holds {key!r}, which does not start with {LORA_PREFIX!r}: "
                "not a peft LoRA file."
            )
        key = key[len(LORA_PREFIX) :]
        for suffix, part in suffixes.items():
            if key.endswith(suffix):
                artifact.lora_weights.setdefault(key[: -len(suffix)], {})[part] = tensor
                break
        else:
            if re.search(r"\.lora_[A-Za-z_]+(\.|$)", key):
                raise AdapterLoadError(
                    f"{artifact.directory / WEIGHTS_NAME} holds {key!r}: a LoRA variant (LoRA bias, embedding or "
                    "convolution LoRA) that hf_peft_plugin does not implement. Load it with peft."
                )
            artifact.module_tensors[key] = tensor
    if not artifact.lora_weights:
        raise AdapterLoadError(f"{artifact.directory / WEIGHTS_NAME} holds no LoRA weights.")


def _parse_prompt(artifact: _Artifact, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    path = artifact.directory / CONFIG_NAME
    _check_fields(config, path, _PROMPT_FIELDS_USED, _PROMPT_FIELDS_INFORMATIONAL)
    _require(config, path, ("num_virtual_tokens", "token_dim"))
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise AdapterLoadError(
            f"{path} has num_transformer_submodules={submodules}: a soft prompt for an encoder-decoder model, which "
            "hf_peft_plugin does not support (decoder-only and encoder-only models only)."
        )
    if PROMPT_KEY not in tensors:
        raise AdapterLoadError(f"{artifact.directory / WEIGHTS_NAME} has no {PROMPT_KEY!r} tensor.")
    weight = tensors.pop(PROMPT_KEY)
    init = "vocab" if config.get("prompt_tuning_init") == "SAMPLE_VOCAB" else "random"
    text, tokenizer = config.get("prompt_tuning_init_text"), config.get("tokenizer_name_or_path")
    artifact.prompt = _prompt_config(path, config["num_virtual_tokens"], init, text, tokenizer, weight)
    artifact.prompt_weight, artifact.token_dim = weight, config["token_dim"]
    _common_fields(artifact, config)
    for key, tensor in tensors.items():
        if not key.startswith(PROMPT_PREFIX):
            raise AdapterLoadError(f"{artifact.directory / WEIGHTS_NAME} holds unexpected tensor {key!r}.")
        artifact.module_tensors[key[len(PROMPT_PREFIX) :]] = tensor


def _prompt_config(
    path: Path, n: Any, init: str, init_text: str | None, tokenizer: str | None, weight: torch.Tensor
) -> PromptTuningConfig:
    """A text init would need the tokenizer object; the prompt comes from the file, so a text init
    is loaded as ``"random"`` and its text and tokenizer name are kept for the record."""
    try:
        config = PromptTuningConfig(
            num_virtual_tokens=n, init=init, init_text=init_text, tokenizer_name_or_path=tokenizer
        )
    except ConfigError as exc:
        raise _config_error(path, exc) from None
    if weight.dim() != 2 or weight.shape[0] != n:
        raise AdapterLoadError(
            f"{path.parent}: the soft prompt has shape {tuple(weight.shape)}, but num_virtual_tokens={n} needs "
            f"({n}, token_dim)."
        )
    return config


def _parse_extras(artifact: _Artifact, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    path = artifact.directory / EXTRAS_CONFIG_NAME
    _check_fields(config, path, _EXTRAS_FIELDS, set())
    _require(config, path, ("hf_peft_plugin_format",))
    if not isinstance(config["hf_peft_plugin_format"], int) or config["hf_peft_plugin_format"] > EXTRAS_FORMAT_VERSION:
        raise AdapterLoadError(
            f"{path} was written in hf_peft_plugin format {config['hf_peft_plugin_format']}; this version reads "
            f"format {EXTRAS_FORMAT_VERSION}. Upgrade hf_peft_plugin."
        )
    _common_fields(artifact, config)
    if config.get("prompt") is not None:
        if artifact.prompt is not None:
            raise AdapterLoadError(f"{artifact.directory} holds two soft prompts (in {CONFIG_NAME} and {path.name}).")
        prompt = config["prompt"]
        if not isinstance(prompt, dict) or PROMPT_KEY not in tensors:
            raise AdapterLoadError(
                f"{path} describes a soft prompt, but {EXTRAS_WEIGHTS_NAME} holds no {PROMPT_KEY!r}."
            )
        _require(prompt, path, ("num_virtual_tokens", "token_dim"))
        weight = tensors.pop(PROMPT_KEY)
        init = prompt.get("init") if prompt.get("init") in ("random", "vocab") else "random"
        text, tokenizer = prompt.get("init_text"), prompt.get("tokenizer_name_or_path")
        artifact.prompt = _prompt_config(path, prompt["num_virtual_tokens"], init, text, tokenizer, weight)
        artifact.prompt_weight, artifact.token_dim = weight, prompt["token_dim"]
    if config.get("bottleneck") is not None:
        try:
            artifact.bottleneck = BottleneckConfig(**config["bottleneck"])
        except (ConfigError, TypeError) as exc:
            raise AdapterLoadError(f"{path} holds an invalid bottleneck setting: {exc}") from None
    for key, tensor in tensors.items():
        if not key.startswith(LORA_PREFIX):
            raise AdapterLoadError(f"{artifact.directory / EXTRAS_WEIGHTS_NAME} holds unexpected tensor {key!r}.")
        artifact.module_tensors[key[len(LORA_PREFIX) :]] = tensor


# -- loading -------------------------------------------------------------------------------------


def load_adapter(
    model: nn.Module,
    path_or_repo: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    is_trainable: bool = False,
    adapter_name: str = "default",
    subfolder: str | None = None,
    strict: bool = False,
) -> nn.Module:
    """Attach a saved adapter (this package's or peft's) to ``model``; returns ``model``.

    ``path_or_repo``: a local folder, or a Hub repo id (``revision``/``token`` as in
    ``huggingface_hub``); ``subfolder`` picks an adapter saved next to others (``"fr"`` for the
    ``fr/`` folder ``save_adapter`` writes for an adapter named ``fr``). On a plain transformers
    model the adapter becomes its only, active adapter; on a prepared model it is added next to the
    others, inactive (activate it with ``set_active_adapters``). ``is_trainable=False`` freezes it
    and puts the model in eval mode (as peft does); ``True`` resumes training. A base model that
    does not look like the one the adapter was saved for is a warning, an error with
    ``strict=True``. Everything is checked before the model is touched: on error it is left exactly
    as it was.
    """
    validate_adapter_name(adapter_name)
    state = adapter_state(model)
    if state is not None and adapter_name in state.adapters:
        raise AdapterNameError(
            f"This model already has an adapter named {adapter_name!r}; pass another adapter_name or "
            "delete_adapter() it first."
        )
    merged = [p for p, m in model.named_modules() if isinstance(m, LoraLinear) and m.merged_adapters]
    if merged:
        raise AdapterLoadError(
            f"The model's adapters are merged (e.g. {merged[0]}); call unmerge_adapters(model) first."
        )
    artifact = _read_artifact(_adapter_directory(path_or_repo, subfolder, revision, token))
    task_type = state.task_type if state is not None else infer_task_type(model)
    _check_base(model, artifact, task_type, strict)
    _attach(model, state, _plan(model, artifact, task_type, adapter_name), is_trainable)
    return model


def _adapter_directory(
    path_or_repo: str | os.PathLike, subfolder: str | None, revision: str | None, token: str | bool | None
) -> Path:
    parts = Path(subfolder or "").parts
    if subfolder is not None and (not parts or Path(subfolder).is_absolute() or ".." in parts):
        raise AdapterLoadError(f"subfolder={subfolder!r} must be a relative folder inside the adapter folder or repo.")
    local = Path(path_or_repo).expanduser()
    if local.is_dir():
        return local.joinpath(*parts)
    if local.exists():
        raise AdapterLoadError(f"{local} is a file; pass the folder that holds {CONFIG_NAME}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    repo_id = os.fspath(path_or_repo)
    prefix = "/".join(parts) + "/" if parts else ""
    try:
        patterns = [prefix + name for name in ARTIFACT_FILES]
        return Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)).joinpath(
            *parts
        )
    except HFValidationError:
        raise AdapterLoadError(f"{repo_id} is neither a local folder nor a valid Hub repo id.") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise AdapterLoadError(
            f"{repo_id} is not a local folder, and downloading it from the Hub failed ({type(exc).__name__}: {exc})."
        ) from None


def _check_base(model: nn.Module, artifact: _Artifact, task_type: str, strict: bool) -> None:
    problems = []
    saved_name, name = artifact.base_model_name_or_path, getattr(model.config, "_name_or_path", "") or ""
    if saved_name and name and not _same_model_name(saved_name, name):
        problems.append(f"it was saved for base model {saved_name!r}, this model is {name!r}")
    base_class = _base_class(model).__name__
    if artifact.base_class and artifact.base_class != base_class:
        problems.append(f"it was saved from a {artifact.base_class}, this model is a {base_class}")
    if artifact.task_type and artifact.task_type != task_type:
        problems.append(f"it was saved for task {artifact.task_type}, this model does {task_type}")
    if not problems:
        return
    message = f"The adapter in {artifact.directory} may not fit this model: " + "; ".join(problems) + "."
    if strict:
        raise AdapterLoadError(message + " (strict=True)")
    warnings.warn(message + " Loading it anyway; pass strict=True to make this an error.", UserWarning, stacklevel=3)


def _same_model_name(a: str, b: str) -> bool:
    """Equal ids, or a Hub id and a local copy of it (same last component)."""
    a, b = a.rstrip("/\\"), b.rstrip("/\\")
    return a == b or re.split(r"[/\\]", a)[-1] == re.split(r"[/\\]", b)[-1]


@dataclass
class _Plan:
    """Where every tensor of the artifact goes, resolved against the model (not yet touched)."""

    adapters: AdapterPlan
    lora_weights: dict[str, dict[str, torch.Tensor]]
    head_weights: dict[str, dict[str, torch.Tensor]]
    bottleneck_weights: dict[str, dict[str, torch.Tensor]]


def _plan(model: nn.Module, artifact: _Artifact, task_type: str, name: str) -> _Plan:
    """Check every tensor against the model and say where it goes. Reads the model, never writes it."""
    lora = artifact.lora
    remaining = dict(artifact.module_tensors)
    if lora is not None:
        _check_lora_shapes(model, artifact)
        # The tensor names give the layers; their exact paths select exactly those, whatever
        # selector (peft's "all-linear", a regex, layers_to_transform, ...) chose them when saved.
        lora.target_modules = tuple(sorted(artifact.lora_weights))
        names = tuple(dict.fromkeys(artifact.head_names + TASK_HEADS.get(task_type, ())))
        head_weights = _take_heads(head_paths(model, names), remaining)
        lora.modules_to_save = tuple(head_weights)  # the heads are the ones the file holds
    else:  # adapters without LoRA get the task's heads
        head_weights = _take_heads(head_paths(model, TASK_HEADS.get(task_type, ())), remaining)
    try:
        adapters = plan_adapter_set(
            model, name, task_type=task_type, lora=lora, prompt=artifact.prompt, bottleneck=artifact.bottleneck
        )
    except (ConfigError, TargetModulesError) as exc:
        raise AdapterLoadError(f"The adapter in {artifact.directory} cannot be attached to this model: {exc}") from None
    if artifact.prompt is not None:
        _check_prompt_width(model, artifact)
        adapters.prompt_init = artifact.prompt_weight.to(adapters.prompt_init.device)
    bottleneck_weights = {}
    if artifact.bottleneck is not None:
        bottleneck_weights = _take_bottleneck(model, adapters, remaining)
    if remaining:
        raise AdapterLoadError(
            f"The adapter in {artifact.directory} holds {_some(sorted(remaining))}, which belong to no adapted layer "
            f"and to none of the trained modules this adapter has on this model ({adapters.heads}; modules_to_save="
            f"{list(artifact.head_names)}): it was saved for another model."
        )
    for path, tensors in head_weights.items():
        module = model.get_submodule(path)
        _check_state_dict(artifact, path, tensors, (getattr(module, "original_module", module)).state_dict())
    for path, tensors in bottleneck_weights.items():
        _check_state_dict(artifact, path, tensors, _bottleneck_reference(model, adapters.bottleneck_width))
    return _Plan(adapters, artifact.lora_weights, head_weights, bottleneck_weights)


def _check_lora_shapes(model: nn.Module, artifact: _Artifact) -> None:
    cfg = artifact.lora
    missing, errors = [], []
    for path, parts in sorted(artifact.lora_weights.items()):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            missing.append(path)
            continue
        if not (isinstance(module, LoraLinear) or is_linear(module)):
            errors.append(f"{path} is a {type(module).__name__}, not a linear layer LoRA can wrap")
            continue
        if cfg.init == "pissa" and is_quantized_linear(getattr(module, "base_layer", module)):
            errors.append(f"{path}: a PiSSA adapter rewrites its base weight, which a quantized layer cannot take")
        in_f, out_f = (
            (module.in_features, module.out_features) if isinstance(module, LoraLinear) else linear_shape(module)
        )
        r = cfg.rank_for(path)
        expected = {"lora_A": (r, in_f), "lora_B": (out_f, r)}
        if cfg.use_dora:
            expected["lora_magnitude_vector"] = (out_f,)
        for part, shape in expected.items():
            if part not in parts:
                errors.append(f"{path}: {part} is missing from the file")
            elif tuple(parts[part].shape) != shape:
                errors.append(
                    f"{path}: {part} has shape {tuple(parts[part].shape)} in the file, but this model needs {shape} "
                    f"(layer in={in_f}, out={out_f}, r={r} from the config)"
                )
        extra = set(parts) - set(expected)
        if extra:
            errors.append(f"{path}: {sorted(extra)} in the file, but the config has use_dora={cfg.use_dora}")
    if missing:
        saved_for = f" ({artifact.base_model_name_or_path!r})" if artifact.base_model_name_or_path else ""
        raise AdapterLoadError(
            f"The adapter in {artifact.directory} adapts modules {type(model).__name__} does not have: "
            f"{_some(missing)}. It was saved for another model{saved_for}."
        )
    if errors:
        raise AdapterLoadError(
            f"The adapter in {artifact.directory} does not fit this model: " + "; ".join(errors[:8]) + "."
        )


def _some(items: list[str], n: int = 5) -> str:
    return str(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _check_prompt_width(model: nn.Module, artifact: _Artifact) -> None:
    hidden = model.get_input_embeddings().weight.shape[1]
    if artifact.token_dim != hidden or artifact.prompt_weight.shape[1] != hidden:
        raise AdapterLoadError(
            f"The soft prompt in {artifact.directory} has token_dim {artifact.token_dim} (tensor shape "
            f"{tuple(artifact.prompt_weight.shape)}), but this model's embeddings have hidden size {hidden}: it was "
            "saved for another base model."
        )


def _take_heads(candidates: list[str], remaining: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Move the tensors of each head in ``candidates`` out of ``remaining``, grouped by head."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key in list(remaining):
        owner = max((p for p in candidates if key.startswith(p + ".")), key=len, default=None)
        if owner is not None:
            grouped.setdefault(owner, {})[key[len(owner) + 1 :]] = remaining.pop(key)
    return grouped


def _take_bottleneck(
    model: nn.Module, adapters: AdapterPlan, remaining: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    grouped = {}
    for point in adapters.bottleneck_points:
        path = f"{point.block}.{MODULE_NAMES[point.placement]}"
        grouped[path] = {k[len(path) + 1 :]: remaining.pop(k) for k in list(remaining) if k.startswith(path + ".")}
    return grouped


def _bottleneck_reference(model: nn.Module, width: int) -> dict[str, torch.Tensor]:
    """Shapes of one bottleneck adapter's tensors, as saved (``down.weight``, ...)."""
    hidden = model.config.get_text_config().hidden_size
    shapes = {"down.weight": (width, hidden), "down.bias": (width,), "up.weight": (hidden, width), "up.bias": (hidden,)}
    return {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}


def _check_state_dict(
    artifact: _Artifact, path: str, tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> None:
    missing, unexpected = sorted(set(reference) - set(tensors)), sorted(set(tensors) - set(reference))
    if missing or unexpected:
        raise AdapterLoadError(
            f"The adapter in {artifact.directory} does not fit {path}: tensors {missing} are missing from the file, "
            f"{unexpected} are not in this model."
        )
    for key, tensor in tensors.items():
        if tensor.shape != reference[key].shape:
            raise AdapterLoadError(
                f"The adapter in {artifact.directory} does not fit {path}.{key}: shape {tuple(tensor.shape)} in the "
                f"file, {tuple(reference[key].shape)} in this model (it was saved for another base model)."
            )


def _attach(model: nn.Module, state: AdapterState | None, plan: _Plan, is_trainable: bool) -> None:
    name = plan.adapters.name
    fresh = state is None
    if fresh:
        model, quant, dtype = adopt_or_quantize(model, QuantizationConfig(bits=None))
        freeze_backbone(model, quantized=quant.bits is not None)  # the same model prepare_model makes
    spec = apply_adapter_plan(model, plan.adapters)
    with torch.no_grad():
        for path, parts in plan.lora_weights.items():
            layer = model.get_submodule(path)
            layer.lora_A[name].weight.copy_(parts["lora_A"])
            layer.lora_B[name].weight.copy_(parts["lora_B"])
            if "lora_magnitude_vector" in parts:
                layer.lora_magnitude_vector[name].copy_(parts["lora_magnitude_vector"])
        for path, tensors in plan.head_weights.items():
            model.get_submodule(path).modules_to_save[name].load_state_dict(tensors)
        for path, tensors in plan.bottleneck_weights.items():
            module = model.get_submodule(path)
            for part in ("down", "up"):
                part_tensors = {k.partition(".")[2]: v for k, v in tensors.items() if k.startswith(part + ".")}
                getattr(module, part)[name].load_state_dict(part_tensors)
    if fresh:
        state = AdapterState(
            task_type=plan.adapters.task_type,
            base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
            quantization=quant if quant.bits is not None else None,
            compute_dtype=dtype,
            adapters={name: spec},
        )
        make_adapter_aware(model, state)
        activate_adapters(model, state, [name], trainable=is_trainable)
    else:
        state.adapters[name] = spec
        activate_adapters(model, state, state.active)
    if not is_trainable:
        for _, layer in adapter_layers(model):
            if name in layer.adapter_names():
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(False)
        model.eval()


# -- merging -------------------------------------------------------------------------------------


def merge_adapters(model: nn.Module) -> None:
    """Fold the active LoRA adapters into the base weights in place, for faster inference.

    Soft prompts and bottleneck adapters keep running as they are. On a quantized base each merged
    layer is requantized (lossy for inference); :func:`unmerge_adapters` restores the exact original.
    """
    require_state(model)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Undo :func:`merge_adapters` exactly, e.g. to train again or switch adapters."""
    require_state(model)
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.unmerge()


def merge_and_unload(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, *, requantize: bool = False, keep_unmergeable: bool = False
) -> nn.Module:
    """Fold the active adapters into the weights and return the plain transformers model (in place).

    Each 4/8-bit base weight is dequantized, the LoRA/DoRA delta added in float32, and the layer
    becomes a plain ``nn.Linear`` (GPT-2: ``Conv1D``) of ``dtype``; trained heads replace the
    originals. The model gets its own class back, loses every trace of this package and of its
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
    _remove_adapter_modules(model)
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
        model.__class__ = state.original_class
        delattr(model, STATE_ATTRIBUTE)
        model.__dict__.pop("_hf_peft_config_loaded", None)
    if not requantize:
        _forget_quantization(model)
    model.config.dtype = dtype
    return model


def _replace_children(module: nn.Module, replace: Callable[[nn.Module], nn.Module | None]) -> None:
    """Depth-first: a child that ``replace`` maps to a module is swapped for it, and the replacement
    (not the child) is visited further."""
    for name, child in list(module.named_children()):
        new = replace(child)
        if new is not None:
            setattr(module, name, new)
        _replace_children(child if new is None else new, replace)


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters to ``dtype``, except packed quantized weights. Buffers (e.g. rotary
    frequencies) stay as the model made them, which is what ``from_pretrained(dtype=...)`` gives."""
    for module in model.modules():
        quantized = is_quantized_linear(module)
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and not (quantized and name == "weight"):
                param.data = param.data.to(dtype)


def _remove_adapter_modules(model: nn.Module) -> None:
    """Drop the now-empty soft-prompt and bottleneck modules, and the hooks that ran them."""
    empty = [(p, m) for p, m in adapter_layers(model) if not m.adapter_names()]
    owners = {id(m) for _, m in empty}
    for path, _ in empty:
        parent_path, _, child = path.rpartition(".")
        delattr(model.get_submodule(parent_path) if parent_path else model, child)
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if id(getattr(hook, "__self__", None)) in owners:
                    del hooks[key]
                    for flags in (
                        "_forward_pre_hooks_with_kwargs",
                        "_forward_hooks_with_kwargs",
                        "_forward_hooks_always_called",
                    ):
                        getattr(module, flags, {}).pop(key, None)


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
