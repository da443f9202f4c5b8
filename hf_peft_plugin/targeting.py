"""Which modules an adapter touches, and putting adapter layers in their place.

Every module that carries adapters follows one small protocol, :class:`AdapterLayer`, so the
model-level API (activate, disable, delete) never needs to know what kind of adapter it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from .bottleneck import InsertionPoint, bottleneck_width, inject_bottlenecks, insertion_points
from .config import DEFAULT_KEEP_FULL_PRECISION, BottleneckConfig, LoraConfig, PromptTuningConfig
from .errors import AdapterNameError, ConfigError, MergeError, TargetModulesError
from .heads import TrainableCopy
from .lora import LoraLinear
from .prompt import check_prompt_supported, ensure_soft_prompt, initial_prompt, soft_prompt_of
from .quantization import is_linear, is_quantized_linear
from .state import TASK_HEADS, AdapterSpec, AdapterState


@runtime_checkable
class AdapterLayer(Protocol):
    """What every adapter-bearing module offers to the model-level API."""

    adapters_disabled: bool
    active_adapters: tuple[str, ...]

    def adapter_names(self) -> list[str]: ...

    def bind_state(self, state: AdapterState) -> None: ...

    def delete_adapter(self, name: str) -> None: ...

    def adapter_parameters(self, name: str) -> list[nn.Parameter]: ...


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


def _parent_and_child(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, child = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), child


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, child = _parent_and_child(model, path)
    setattr(parent, child, new)


def suffix_matches(path: str, names: Sequence[str]) -> bool:
    """peft's list semantics: a name matches the module path itself or its last components."""
    return any(path == n or path.endswith("." + n) for n in names)


def selector_matches(path: str, selector: str | Sequence[str]) -> bool:
    if isinstance(selector, str):
        return re.fullmatch(selector, path) is not None
    return suffix_matches(path, selector)


def _head_names(model: nn.Module) -> set[str]:
    """Paths of output heads that 'all-linear' must leave alone."""
    heads = set()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, module in model.named_modules():
        if module is output or path.rpartition(".")[2] in DEFAULT_KEEP_FULL_PRECISION:
            heads.add(path)
    return heads


def linear_layers(model: nn.Module) -> list[str]:
    """Paths of every linear layer (incl. quantized ones and LoRA-wrapped ones)."""
    paths = []
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear):
            paths.append(path)
        elif is_linear(module) and not _inside_adapter_layer(path, model):
            paths.append(path)
    return paths


def _inside_adapter_layer(path: str, model: nn.Module) -> bool:
    """True for the parts of adapter layers: LoRA's base layer, a bottleneck's projections, ..."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:i])), AdapterLayer):
            return True
    return False


def lora_targets(model: nn.Module, config: LoraConfig, exclude: Sequence[str] = ()) -> list[str]:
    """The module paths ``config`` adapts; raises :class:`TargetModulesError` when none match."""
    candidates = linear_layers(model)
    heads = _head_names(model)
    if config.target_modules == "all-linear":
        chosen = [p for p in candidates if p not in heads and not suffix_matches(p, exclude)]
    else:
        chosen = [p for p in candidates if selector_matches(p, config.target_modules)]
        _reject_non_linear_matches(model, config.target_modules, chosen)
    if config.exclude_modules is not None:
        chosen = [p for p in chosen if not selector_matches(p, config.exclude_modules)]
    if not chosen:
        names = sorted({p.rpartition(".")[2] for p in candidates})
        raise TargetModulesError(
            f"LoraConfig.target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
            f"matches no linear layer of {type(model).__name__}. Its linear layers are named: {names}. "
            "Pass some of these names, a regex over full module paths, or 'all-linear'."
        )
    return chosen


def _reject_non_linear_matches(model: nn.Module, selector: str | Sequence[str], chosen: list[str]) -> None:
    chosen_set = set(chosen)
    bad = [
        f"{path} ({type(module).__name__})"
        for path, module in model.named_modules()
        if path
        and path not in chosen_set
        and selector_matches(path, selector)
        and not _inside_adapter_layer(path, model)
        and not isinstance(module, (LoraLinear, TrainableCopy))
        and len(list(module.children())) == 0
    ]
    if bad and not chosen:
        raise TargetModulesError(
            f"LoraConfig.target_modules={selector!r} matches modules LoRA cannot wrap: {bad[:8]}. "
            "LoRA wraps nn.Linear, transformers' Conv1D and bitsandbytes' Linear4bit/Linear8bitLt."
        )


def inject_lora(model: nn.Module, name: str, config: LoraConfig, paths: Sequence[str]) -> None:
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            replace_module(model, path, module)
        module.add_adapter(
            name,
            r=config.rank_for(path),
            scaling=config.scaling_for(path),
            dropout=config.dropout,
            use_dora=config.use_dora,
            init=config.init,
        )


def head_paths(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Paths of the modules named by ``modules_to_save`` (suffix match, outermost only)."""
    found: list[str] = []
    for path, module in model.named_modules():
        if isinstance(module, TrainableCopy) and suffix_matches(path, names):
            found.append(path)
        elif suffix_matches(path, names) and not any(path.startswith(f + ".") for f in found):
            if not _inside_adapter_layer(path, model):
                found.append(path)
    return found


def inject_trainable_copies(model: nn.Module, name: str, names: Sequence[str]) -> list[str]:
    paths = head_paths(model, names)
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, TrainableCopy):
            module = TrainableCopy(module)
            replace_module(model, path, module)
        module.add_adapter(name)
    return paths


@dataclass
class AdapterPlan:
    """One adapter set with every selection resolved and validated, the model not yet touched."""

    name: str
    task_type: str
    lora: LoraConfig | None = None
    lora_targets: list[str] = field(default_factory=list)
    head_names: tuple[str, ...] = ()
    heads: list[str] = field(default_factory=list)
    prompt: PromptTuningConfig | None = None
    prompt_init: torch.Tensor | None = None
    bottleneck: BottleneckConfig | None = None
    bottleneck_points: list[InsertionPoint] = field(default_factory=list)
    bottleneck_width: int = 0


def plan_adapter_set(
    model: nn.Module,
    name: str,
    *,
    task_type: str,
    lora: LoraConfig | None = None,
    prompt: PromptTuningConfig | None = None,
    bottleneck: BottleneckConfig | None = None,
) -> AdapterPlan:
    """Resolve what adding ``name`` would change; raises on any bad selection and changes nothing.

    Planning only reads module paths and the input embeddings, so a plan made before quantizing
    the model still applies afterwards.
    """
    if lora is None and prompt is None and bottleneck is None:
        raise ConfigError("An adapter needs at least one of lora=LoraConfig(...), prompt=..., bottleneck=....")
    if lora is not None and lora.modules_to_save is not None:
        head_names = tuple(lora.modules_to_save)
    else:
        head_names = TASK_HEADS.get(task_type, ())
    plan = AdapterPlan(
        name=name, task_type=task_type, lora=lora, prompt=prompt, bottleneck=bottleneck, head_names=head_names
    )
    plan.lora_targets = lora_targets(model, lora, exclude=head_names) if lora is not None else []
    if lora is not None and lora.init == "pissa":
        layers = [model.get_submodule(p) for p in plan.lora_targets]
        quantized = [p for p, m in zip(plan.lora_targets, layers) if is_quantized_linear(getattr(m, "base_layer", m))]
        if quantized:
            raise ConfigError(
                f"LoraConfig(init='pissa') rewrites the base weights, which the quantized layers {quantized[:3]} "
                "cannot take exactly. Use init='default' on a quantized model, or PiSSA on an unquantized one."
            )
    plan.heads = head_paths(model, head_names)
    if lora is not None and lora.modules_to_save and not plan.heads:
        raise TargetModulesError(
            f"LoraConfig.modules_to_save={list(lora.modules_to_save)} matches no module of {type(model).__name__}."
        )
    if prompt is not None:
        check_prompt_supported(model, task_type, prompt)
        soft_prompt_of(model)  # raises if the attribute is taken by something else
        plan.prompt_init = initial_prompt(prompt, model.get_input_embeddings())
    if bottleneck is not None:
        plan.bottleneck_width = bottleneck_width(model, bottleneck)
        plan.bottleneck_points = insertion_points(model, bottleneck)
    return plan


def apply_adapter_plan(model: nn.Module, plan: AdapterPlan, state: AdapterState) -> AdapterSpec:
    """Make the changes ``plan`` describes; every new adapter layer reads ``state``."""
    if plan.lora is not None:
        inject_lora(model, plan.name, plan.lora, plan.lora_targets)
    inject_trainable_copies(model, plan.name, plan.head_names)
    if plan.prompt is not None:
        ensure_soft_prompt(model, plan.task_type, state).add_adapter(plan.name, plan.prompt_init)
    if plan.bottleneck is not None:
        inject_bottlenecks(model, plan.name, plan.bottleneck, plan.bottleneck_points, plan.bottleneck_width, state)
    for _, layer in adapter_layers(model):
        layer.bind_state(state)
    return AdapterSpec(
        lora=plan.lora,
        prompt=plan.prompt,
        bottleneck=plan.bottleneck,
        lora_targets=tuple(plan.lora_targets),
        modules_to_save=tuple(plan.heads),
    )


def attach_adapter_set(
    model: nn.Module,
    name: str,
    state: AdapterState,
    *,
    task_type: str,
    lora: LoraConfig | None = None,
    prompt: PromptTuningConfig | None = None,
    bottleneck: BottleneckConfig | None = None,
) -> AdapterSpec:
    """Add one named adapter set to ``model``. Every selection is resolved before anything is
    modified, so a bad config leaves the model as it was."""
    plan = plan_adapter_set(model, name, task_type=task_type, lora=lora, prompt=prompt, bottleneck=bottleneck)
    return apply_adapter_plan(model, plan, state)


def activate_adapters(
    model: nn.Module, state: AdapterState, names: str | Sequence[str], *, trainable: bool | None = None
) -> None:
    """Make ``names`` the active adapters; only those active and trainable get ``requires_grad``.

    ``trainable=None`` keeps each adapter's flag; ``True``/``False`` sets it for ``names``.
    """
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise AdapterNameError(f"Unknown adapter(s) {unknown}; this model has {list(state.adapters)}.")
    if state.merged and names != state.active:
        raise MergeError(
            f"Adapters {state.merged} are merged into the base weights; call unmerge_adapters(model) before "
            "changing the active adapters."
        )
    prompted = [n for n in names if state.adapters[n].prompt is not None]
    if len(prompted) > 1:
        raise ConfigError(
            f"Adapters {prompted} each carry a soft prompt, and only one soft prompt can be active at a time "
            "(which would come first is not defined). Activate at most one of them."
        )
    if trainable is not None:
        for n in names:
            state.adapters[n].trainable = bool(trainable)
    state.active = names
    for _, layer in adapter_layers(model):
        for adapter in layer.adapter_names():
            spec = state.adapters.get(adapter)
            train = adapter in names and spec is not None and spec.trainable
            for p in layer.adapter_parameters(adapter):
                p.requires_grad_(train)


def remove_empty_adapter_modules(model: nn.Module, state: AdapterState) -> None:
    """Drop soft-prompt and bottleneck modules left without adapters, and their hooks (through the
    handles kept in ``state``)."""
    for path, layer in list(adapter_layers(model)):
        if layer.adapter_names() or path not in state.hooks:
            continue
        state.remove_hooks(path)
        parent, child = _parent_and_child(model, path)
        delattr(parent, child)
