"""Loading a saved adapter (this package's or peft's) onto a model: plan every tensor against
the model first, then attach, so a failed load leaves the model exactly as it was.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter_class import base_class, make_adapter_aware
from .atomic import reading
from .bottleneck import MODULE_NAMES
from .config import QuantizationConfig
from .errors import AdapterLoadError, AdapterNameError, ConfigError, TargetModulesError
from .lora import LoraLinear
from .matmul import resolve_fast_frozen_matmul
from .names import validate_adapter_name
from .peft_format import ARTIFACT_FILES, CONFIG_NAME, Artifact, read_artifact
from .quantization import adopt_or_quantize, freeze_backbone, is_linear, is_quantized_linear, linear_shape
from .state import NORM_HOOKS, TASK_HEADS, AdapterState, adapter_state, infer_task_type
from .targeting import AdapterPlan, activate_adapters, apply_adapter_plan, head_paths, plan_adapter_set


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
    fast_frozen_matmul: bool | None = None,
) -> nn.Module:
    """Attach a saved adapter (this package's or peft's) to ``model``; returns ``model``.

    ``path_or_repo``: a local folder, or a Hub repo id (``revision``/``token`` as in
    ``huggingface_hub``); ``subfolder`` picks an adapter saved next to others (``"fr"`` for the
    ``fr/`` folder ``save_adapter`` writes for an adapter named ``fr``). On a plain transformers
    model the adapter becomes its only, active adapter; on a prepared model it is added next to the
    others, inactive (activate it with ``set_active_adapters``). ``is_trainable=False`` freezes it
    and puts the model in eval mode (as peft does); ``True`` resumes training. A base model that
    does not look like the one the adapter was saved for, a config that is not the one saved with
    the weights, or weights holding NaN/inf, are warnings naming the problem; errors with
    ``strict=True``. Everything is checked before the model is touched: on error it is left exactly
    as it was. ``fast_frozen_matmul``: as in ``prepare_model``, for a model not prepared before (a
    prepared one keeps its own setting).
    """
    state = adapter_state(model)
    if state is not None and fast_frozen_matmul is not None:
        raise ConfigError(
            "fast_frozen_matmul is prepare_model's setting on a prepared model; leave it None here (the model "
            "keeps the one it was prepared with)."
        )
    fast_matmul = resolve_fast_frozen_matmul(fast_frozen_matmul) if state is None else False
    validate_adapter_name(adapter_name)
    if state is not None and adapter_name in state.adapters:
        raise AdapterNameError(
            f"This model already has an adapter named {adapter_name!r}; pass another adapter_name or "
            "delete_adapter() it first. (prepare_model attaches a fresh LoRA named 'default': to put a saved "
            "adapter on a quantized base for inference, use load_pretrained(base_path, adapter_dir).)"
        )
    if state is not None and state.merged:
        raise AdapterLoadError(
            f"The model's adapters {state.merged} are merged; call unmerge_adapters(model) first."
        )
    directory = _adapter_directory(path_or_repo, subfolder, revision, token)
    if directory.is_dir():
        with reading(directory):  # never between the files of a save (see hf_peft_plugin.atomic)
            artifact = read_artifact(directory)
    else:
        artifact = read_artifact(directory)  # says that it does not exist
    task_type = state.task_type if state is not None else infer_task_type(model)
    _check_base(model, artifact, task_type, strict)
    plan = _plan(model, artifact, task_type, adapter_name)
    _check_problems(artifact, strict)  # after the precise errors (shapes, base): they say more
    _attach(model, state, plan, is_trainable, fast_matmul)
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
    except HFValidationError as exc:
        raise AdapterLoadError(f"{repo_id} is neither a local folder nor a valid Hub repo id.") from exc
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise AdapterLoadError(
            f"{repo_id} is not a local folder, and downloading it from the Hub failed ({type(exc).__name__}: {exc})."
        ) from exc


def _check_problems(artifact: Artifact, strict: bool) -> None:
    if not artifact.problems:
        return
    message = f"The adapter in {artifact.directory} looks damaged: " + "; ".join(artifact.problems) + "."
    if strict:
        raise AdapterLoadError(message + " (strict=True)")
    warnings.warn(message + " Loading it anyway; pass strict=True to make this an error.", UserWarning, stacklevel=3)


def _check_base(model: nn.Module, artifact: Artifact, task_type: str, strict: bool) -> None:
    problems = []
    saved_name, name = artifact.base_model_name_or_path, getattr(model.config, "_name_or_path", "") or ""
    if saved_name and name and not _same_model_name(saved_name, name):
        problems.append(f"it was saved for base model {saved_name!r}, this model is {name!r}")
    class_name = base_class(model).__name__
    if artifact.base_class and artifact.base_class != class_name:
        problems.append(f"it was saved from a {artifact.base_class}, this model is a {class_name}")
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


def _plan(model: nn.Module, artifact: Artifact, task_type: str, name: str) -> _Plan:
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
        raise AdapterLoadError(f"The adapter in {artifact.directory} cannot be attached to this model: {exc}") from exc
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


def _check_lora_shapes(model: nn.Module, artifact: Artifact) -> None:
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


def _check_prompt_width(model: nn.Module, artifact: Artifact) -> None:
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
    artifact: Artifact, path: str, tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
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


def _attach(model: nn.Module, state: AdapterState | None, plan: _Plan, is_trainable: bool, fast_matmul: bool) -> None:
    name = plan.adapters.name
    fresh = state is None
    if fresh:
        model, quant, dtype = adopt_or_quantize(model, QuantizationConfig(bits=None))
        state = AdapterState(
            task_type=plan.adapters.task_type,
            base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
            quantization=quant if quant.bits is not None else None,
            compute_dtype=dtype,
            fast_frozen_matmul=fast_matmul,
        )
        # The same model prepare_model makes.
        state.add_hooks(NORM_HOOKS, freeze_backbone(model, quantized=quant.bits is not None))
    spec = apply_adapter_plan(model, plan.adapters, state)
    spec.trainable = is_trainable
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
    state.adapters[name] = spec
    if fresh:
        make_adapter_aware(model, state)
    activate_adapters(model, state, [name] if fresh else state.active)  # every adapter keeps its flag
    if not is_trainable:
        model.eval()
