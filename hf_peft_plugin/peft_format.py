"""The adapter file format (peft's, plus this package's extras): names, field tables and parsing.

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

Only safetensors is read: ``adapter_model.bin`` is a pickle, which can run code when loaded, and is
refused. Everything here reads files only, no model: :func:`read_artifact` parses and checks one
adapter folder on its own; :mod:`~hf_peft_plugin.loading` then checks it against a model.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import torch

from .config import BottleneckConfig, LoraConfig, PromptTuningConfig
from .errors import AdapterLoadError, ConfigError

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
#: safetensors metadata entries of the weights this package writes: the adapter's name, and the
#: SHA-256 of the config file written with them (a config from another save is caught on load).
ADAPTER_NAME_METADATA = "hf_peft_plugin.adapter_name"
CONFIG_HASH_METADATA = "hf_peft_plugin.config_sha256"
#: safetensors metadata entry: how the base was quantized in training (JSON: bits, quant_type,
#: double_quant, compute_dtype), read by :func:`hf_peft_plugin.load_pretrained`. peft and vLLM
#: ignore safetensors metadata, so the files stay exactly peft's format.
QUANTIZATION_METADATA = "hf_peft_plugin.quantization"
CONFIG_FOR_WEIGHTS = {WEIGHTS_NAME: CONFIG_NAME, EXTRAS_WEIGHTS_NAME: EXTRAS_CONFIG_NAME}

INIT_TO_PEFT = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}
PROMPT_INIT_TO_PEFT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}

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

# -- reading -------------------------------------------------------------------------------------


@dataclass
class Artifact:
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
    #: What is loadable but suspicious (a config from another save, NaN/inf tensors): a warning,
    #: an error with ``strict=True``.
    problems: list[str] = field(default_factory=list)


def adapter_config_file(directory: Path) -> Path | None:
    """The config that makes ``directory`` an adapter folder (peft's, else this package's own), or ``None``."""
    return next((directory / n for n in (CONFIG_NAME, EXTRAS_CONFIG_NAME) if (directory / n).is_file()), None)


def adapter_subfolders(directory: Path) -> list[str]:
    """Names of the sub-folders of ``directory`` that are adapter folders (``save_adapter`` puts
    every adapter but ``default`` in one)."""
    return sorted(d.name for d in directory.iterdir() if d.is_dir() and adapter_config_file(d) is not None)


def read_artifact(directory: Path) -> Artifact:
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
    artifact = Artifact(directory)
    if peft_config_file.is_file():
        config = _read_json(peft_config_file)
        tensors, metadata = _read_safetensors(_weights_file(directory, WEIGHTS_NAME))
        _check_integrity(artifact, config, peft_config_file, directory / WEIGHTS_NAME, tensors, metadata)
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
        _check_integrity(artifact, extras_config, extras_config_file, directory / EXTRAS_WEIGHTS_NAME, tensors, metadata)
        artifact.base_class = (
            artifact.base_class or extras_config.get("base_model_class") or metadata.get(BASE_CLASS_METADATA)
        )
        _parse_extras(artifact, extras_config, tensors)
    return artifact


def canonical_json(config: Any) -> bytes:
    """How this package writes a config file."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")


#: Config fields that describe where the adapter comes from rather than what its weights compute:
#: users edit them (a local copy of the base, a new tokenizer path), so they are left out of the hash.
_NOT_HASHED = {
    "base_model_name_or_path", "base_model_class", "revision", "inference_mode", "peft_version", "auto_mapping",
    "task_type", "tokenizer_name_or_path", "tokenizer_kwargs",
}  # fmt: skip


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of what in ``config`` decides how the weights are read (rank, scaling, modules, ...)."""
    return hashlib.sha256(canonical_json({k: v for k, v in config.items() if k not in _NOT_HASHED})).hexdigest()


def _check_integrity(
    artifact: Artifact,
    config: dict[str, Any],
    config_path: Path,
    weights_path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
) -> None:
    stamped = metadata.get(CONFIG_HASH_METADATA)
    if stamped is not None and stamped != config_hash(config):
        artifact.problems.append(
            f"{config_path.name} is not the config that was saved with {weights_path.name} (it was edited, or "
            "written by another program or save, afterwards), so the weights may be read with the wrong rank or "
            "scaling. If you did not edit it, save the adapter again"
        )
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        artifact.problems.append(
            f"{weights_path.name} holds NaN or infinite values in {bad[:5]}{' (+more)' if len(bad) > 5 else ''}: "
            "the training that produced it diverged, and the model would output NaN. Use an earlier checkpoint"
        )


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
        raise AdapterLoadError(f"{path} is not valid JSON ({exc}); the file is corrupted.") from exc
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
        ) from exc
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


def _int(config: dict[str, Any], path: Path, key: str, minimum: int = 1) -> int:
    """``config[key]`` as a whole number >= ``minimum`` (``true`` is not a number; ``8.0`` is 8)."""
    value = config[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdapterLoadError(f"{path}: {key} must be a whole number >= {minimum}; it is {value!r}.")
    return value


def _number(value: Any, path: Path, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterLoadError(f"{path}: {key} must be a number; it is {value!r}.")
    return value


def _flag(config: dict[str, Any], path: Path, key: str) -> bool:
    value = config.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):  # "false" would be truthy
        raise AdapterLoadError(f"{path}: {key} must be true or false; it is {value!r}.")
    return value


def _pattern(config: dict[str, Any], path: Path, key: str, whole: bool) -> dict[str, Any]:
    """peft's ``rank_pattern``/``alpha_pattern``: a JSON object of module-name pattern -> rank/alpha."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterLoadError(
            f"{path}: {key} must be a JSON object mapping module-name patterns to "
            f"{'ranks' if whole else 'alphas'}, e.g. {{\"q_proj\": 8}}; it is {value!r}."
        )
    if whole:
        return {str(k): _int_entry(v, path, key, k) for k, v in value.items()}
    return {str(k): _number(v, path, f"{key}[{k!r}]") for k, v in value.items()}


def _int_entry(value: Any, path: Path, key: str, name: str) -> int:
    return _int({f"{key}[{name!r}]": value}, path, f"{key}[{name!r}]")


def _config_error(path: Path, exc: ConfigError) -> AdapterLoadError:
    return AdapterLoadError(f"{path} holds an invalid setting: {exc}")


def _common_fields(artifact: Artifact, config: dict[str, Any]) -> None:
    artifact.task_type = artifact.task_type or config.get("task_type")
    artifact.base_model_name_or_path = artifact.base_model_name_or_path or config.get("base_model_name_or_path")
    artifact.head_names += tuple(config.get("modules_to_save") or ())


def _parse_lora(artifact: Artifact, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
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
            r=_int(config, path, "r"),
            alpha=_number(config["lora_alpha"], path, "lora_alpha"),
            dropout=_number(config.get("lora_dropout") or 0.0, path, "lora_dropout"),
            rank_pattern=_pattern(config, path, "rank_pattern", whole=True),
            alpha_pattern=_pattern(config, path, "alpha_pattern", whole=False),
            use_rslora=_flag(config, path, "use_rslora"),
            use_dora=_flag(config, path, "use_dora"),
            init="pissa" if init == "pissa" else "default",
        )
    except ConfigError as exc:
        raise _config_error(path, exc) from exc
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


def _parse_prompt(artifact: Artifact, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
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
    n, token_dim = _int(config, path, "num_virtual_tokens"), _int(config, path, "token_dim")
    artifact.prompt = _prompt_config(path, n, init, text, tokenizer, weight)
    artifact.prompt_weight, artifact.token_dim = weight, token_dim
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
        raise _config_error(path, exc) from exc
    if weight.dim() != 2 or weight.shape[0] != n:
        raise AdapterLoadError(
            f"{path.parent}: the soft prompt has shape {tuple(weight.shape)}, but num_virtual_tokens={n} needs "
            f"({n}, token_dim)."
        )
    return config


def _parse_extras(artifact: Artifact, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    path = artifact.directory / EXTRAS_CONFIG_NAME
    _check_fields(config, path, _EXTRAS_FIELDS, set())
    _require(config, path, ("hf_peft_plugin_format",))
    version = config["hf_peft_plugin_format"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise AdapterLoadError(
            f"{path}: hf_peft_plugin_format must be a whole number (this version writes {EXTRAS_FORMAT_VERSION}); "
            f"it is {version!r} ({type(version).__name__}). The file was not written by hf_peft_plugin, or was edited."
        )
    if version > EXTRAS_FORMAT_VERSION:
        raise AdapterLoadError(
            f"{path} was written in hf_peft_plugin format {version}, newer than the format {EXTRAS_FORMAT_VERSION} "
            "this version reads. Upgrade hf_peft_plugin."
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
        n, token_dim = _int(prompt, path, "num_virtual_tokens"), _int(prompt, path, "token_dim")
        artifact.prompt = _prompt_config(path, n, init, text, tokenizer, weight)
        artifact.prompt_weight, artifact.token_dim = weight, token_dim
    if config.get("bottleneck") is not None:
        bottleneck = config["bottleneck"]
        if not isinstance(bottleneck, dict):
            raise AdapterLoadError(f"{path}: bottleneck must be a JSON object of settings; it is {bottleneck!r}.")
        layers = bottleneck.get("layers")
        if layers is not None and (
            not isinstance(layers, list) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
        ):
            raise AdapterLoadError(
                f"{path}: bottleneck.layers must be null (every block) or a list of block indices such as [0, 2]; "
                f"it is {layers!r}."
            )
        try:
            artifact.bottleneck = BottleneckConfig(**{**bottleneck, "layers": None if layers is None else tuple(layers)})
        except (ConfigError, TypeError, ValueError) as exc:
            raise AdapterLoadError(f"{path} holds an invalid bottleneck setting: {exc}") from exc
    for key, tensor in tensors.items():
        if not key.startswith(LORA_PREFIX):
            raise AdapterLoadError(f"{artifact.directory / EXTRAS_WEIGHTS_NAME} holds unexpected tensor {key!r}.")
        artifact.module_tensors[key[len(LORA_PREFIX) :]] = tensor
