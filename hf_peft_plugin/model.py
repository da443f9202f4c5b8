"""``prepare_model`` and the model-level adapter API (add, activate, disable, delete, report)."""

from __future__ import annotations

import contextlib
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from .adapter_class import make_adapter_aware
from .config import BottleneckConfig, LoraConfig, PromptTuningConfig, QuantizationConfig
from .errors import AdapterNameError, AlreadyPreparedError, ConfigError, MergeError, NotATransformersModelError
from .fsdp import FSDP_QUANT_STORAGE, check_unit, check_units_exist, require_distributed, shard_model, unit_sharder
from .lora import LoraLinear
from .loss import ChunkedLossConfig, configure_chunked_loss
from .mapped_files import drop_unread_checkpoint_pages
from .matmul import resolve_fast_frozen_matmul
from .offload import OFFLOAD_ATTRIBUTE, OffloadStats
from .names import validate_adapter_name
from .packing import guard_packed_batches
from .sharded_loading import load_into_shards, streamable
from .quantization import (
    Footprint,
    adopt_or_quantize,
    check_bitsandbytes_for,
    default_compute_dtype,
    footprint,
    freeze_backbone,
    is_quantized_linear,
    load_quantized_model,
)
from .state import (
    NORM_HOOKS,
    TASK_AUTO_CLASSES,
    AdapterSpec,
    AdapterState,
    adapter_state,
    infer_task_type,
    require_state,
)
from .targeting import (
    activate_adapters,
    adapter_layers,
    apply_adapter_plan,
    attach_adapter_set,
    plan_adapter_set,
    remove_empty_adapter_modules,
)


def prepare_model(
    model_or_path: nn.Module | str | os.PathLike,
    *,
    bits: int | None = 4,
    lora: LoraConfig | None = None,
    prompt: PromptTuningConfig | None = None,
    bottleneck: BottleneckConfig | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    keep_full_precision: Sequence[str] = (),
    quant_storage: torch.dtype | None = None,
    gradient_checkpointing: bool = False,
    fsdp: bool = False,
    chunked_loss: bool = True,
    loss_chunk_size: int | None = None,
    offload_activations: bool = False,
    fast_frozen_matmul: bool | None = None,
    adapter_name: str = "default",
    task_type: str | None = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Quantize the frozen backbone and attach trainable adapters; returns the same transformers model.

    ``model_or_path`` is a loaded full-precision model (its linear layers are quantized one at a
    time), a model transformers already loaded with a ``BitsAndBytesConfig`` (kept as is), or a
    local path / Hub id (quantized while the weights stream in; ``from_pretrained_kwargs`` such as
    ``num_labels`` or ``revision`` are passed on). With no adapter config, LoRA with
    :class:`LoraConfig` defaults is attached.

    ``chunked_loss`` (default on): a causal LM's training loss is computed ``loss_chunk_size``
    labelled tokens at a time straight from the hidden states, never building the full logits
    (see :mod:`hf_peft_plugin.loss`); ``chunked_loss=False`` keeps transformers' own loss.

    Example::

        model = prepare_model("HuggingFaceTB/SmolLM2-135M", bits=4, lora=LoraConfig(r=16, alpha=32))
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[AdapterCallback()]).train()

    ``fast_frozen_matmul`` (default ``None``: where available): on CPUs with AVX512-BF16/AMX-BF16,
    the frozen weights' float32 GEMMs (LoRA layers' base, forward and input gradient; a frozen
    ``lm_head`` in the chunked loss) run in oneDNN's bf16 mode, float32 in and out, checked once
    against strict float32 (see :mod:`hf_peft_plugin.matmul`); ``False`` leaves them to torch's
    own setting, ``True`` raises where the mode is not available.

    ``fsdp=True`` shards the frozen base across the ranks of ``torch.distributed`` (FSDP2, one unit
    per decoder block; adapters replicated; see :mod:`hf_peft_plugin.fsdp` and docs/distributed.md);
    ``quant_storage`` then defaults to float32, the dtype of the blocks' other frozen tensors.
    """
    if quant_storage is None:
        quant_storage = FSDP_QUANT_STORAGE if fsdp else torch.uint8
    quant = QuantizationConfig(
        bits=bits,
        quant_type=quant_type,
        double_quant=double_quant,
        compute_dtype=compute_dtype,
        quant_storage=quant_storage,
        keep_full_precision=keep_full_precision,
    )
    loss_config = ChunkedLossConfig(enabled=chunked_loss, chunk_size=loss_chunk_size)
    if not isinstance(offload_activations, bool):
        raise ConfigError(f"offload_activations must be True or False; got {offload_activations!r}.")
    if offload_activations and not gradient_checkpointing:
        raise ConfigError(
            "offload_activations keeps the inputs gradient checkpointing saves in host memory; pass "
            "gradient_checkpointing=True with it."
        )
    fast_matmul = resolve_fast_frozen_matmul(fast_frozen_matmul)
    validate_adapter_name(adapter_name)
    if task_type is not None and task_type not in TASK_AUTO_CLASSES:
        raise ConfigError(f"task_type must be one of {sorted(TASK_AUTO_CLASSES)}; got {task_type!r}.")
    if lora is None and prompt is None and bottleneck is None:
        lora = LoraConfig()
    if lora is not None and lora.init == "pissa" and quant.bits is not None:
        raise ConfigError(
            f"LoraConfig(init='pissa') rewrites the base weights, which a {quant.bits}-bit base cannot take exactly. "
            "Use bits=None with PiSSA, or init='default' on a quantized model."
        )

    if fsdp:
        require_distributed("prepare_model(..., fsdp=True)")  # before anything is loaded or changed

    adapters = {"lora": lora, "prompt": prompt, "bottleneck": bottleneck}
    files = None  # set when the model is a meta skeleton streamed into shards below
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        skeleton = meta_skeleton_for_shards(path, quant, task_type or "CAUSAL_LM", from_pretrained_kwargs) if fsdp else None
        if skeleton is not None:
            model, files, dtype = skeleton
        else:
            model, quant, dtype = load_base_model(path, quant, task_type or "CAUSAL_LM", from_pretrained_kwargs)
        task = task_type or infer_task_type(model)
        # Planned on the skeleton when streaming: a bad adapter config fails before any weight is read.
        plan = plan_adapter_set(model, adapter_name, task_type=task, **adapters)
    elif isinstance(model_or_path, nn.Module):
        if from_pretrained_kwargs:
            raise TypeError(f"Unexpected arguments for an already loaded model: {sorted(from_pretrained_kwargs)}.")
        model = model_or_path
        if not isinstance(model, PreTrainedModel):
            raise NotATransformersModelError(
                f"prepare_model takes a transformers model (a PreTrainedModel, e.g. from "
                f"AutoModelForCausalLM.from_pretrained), a local path or a Hub id; got a {type(model).__name__}. "
                "Wrap plain torch modules in a transformers model, or use LoraLinear on the layers directly."
            )
        if adapter_state(model) is not None:
            raise AlreadyPreparedError(
                "This model was already prepared (it carries adapters "
                f"{list(require_state(model).adapters)}); preparing it twice would wrap layers twice. "
                "Use add_adapter(model, name, ...) to add another adapter set."
            )
        task = task_type or infer_task_type(model)
        # Planned before quantizing: a bad adapter config must not leave the model quantized.
        plan = plan_adapter_set(model, adapter_name, task_type=task, **adapters)
        model, quant, dtype = adopt_or_quantize(model, quant)
    else:
        raise TypeError(
            f"prepare_model takes a transformers model, a local path or a Hub id; got {type(model_or_path).__name__}."
        )

    state = AdapterState(
        task_type=task,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
        quantization=quant if quant.bits is not None else None,
        compute_dtype=dtype,
        fast_frozen_matmul=fast_matmul,
    )
    if files is not None:
        units = check_units_exist(model)
        device = _load_device()
        state.add_hooks(NORM_HOOKS, load_into_shards(model, files, quant, dtype, units, device, unit_sharder(device), check_unit))
    state.add_hooks(NORM_HOOKS, freeze_backbone(model, quantized=quant.bits is not None))
    state.adapters[adapter_name] = apply_adapter_plan(model, plan, state)
    make_adapter_aware(model, state)
    guard_packed_batches(model, state)  # padding-free batches: no cache, and a clear error where unsupported
    configure_chunked_loss(model, loss_config)
    set_active_adapters(model, [adapter_name])
    if offload_activations:  # applied by the model's activation_checkpointing_enable (offload.py)
        setattr(model, OFFLOAD_ATTRIBUTE, OffloadStats())
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if fsdp:
        shard_model(model)
    drop_unread_checkpoint_pages(model)  # a CPU model's RSS lets go of what only the loader read (mapped_files.py)
    return model


def load_base_model(
    path: str, quant: QuantizationConfig, task_type: str, kwargs: dict[str, Any]
) -> tuple[nn.Module, QuantizationConfig, torch.dtype]:
    """The base model for ``task_type``, quantized as its weights stream in, on the GPU when there
    is one; also returns the compute dtype picked for that device."""
    import transformers

    auto_class = getattr(transformers, TASK_AUTO_CLASSES[task_type])
    if torch.cuda.is_available():
        kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    device = device_map_type(kwargs.get("device_map"))
    dtype = quant.compute_dtype or default_compute_dtype(device)
    if quant.bits is not None:
        check_bitsandbytes_for(device)
    return load_quantized_model(path, quant, dtype, auto_class, **kwargs), quant, dtype


def _load_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def meta_skeleton_for_shards(
    path: str, quant: QuantizationConfig, task_type: str, kwargs: dict[str, Any]
) -> tuple[nn.Module, dict[str, str], torch.dtype] | None:
    """For ``fsdp=True``: the model on the meta device, its checkpoint's files and the compute dtype,
    when ``path`` can be read block by block straight into shards (see :mod:`.sharded_loading`)."""
    import transformers

    device = _load_device()
    dtype = quant.compute_dtype or default_compute_dtype(device)
    if quant.bits is not None:
        check_bitsandbytes_for(device)
    found = streamable(path, getattr(transformers, TASK_AUTO_CLASSES[task_type]), dtype, kwargs)
    return None if found is None else (*found, dtype)


def device_map_type(device_map: Any) -> str:
    """The device type (``"cpu"``, ``"cuda"``, ``"xpu"``, ...) the weights of ``device_map`` compute on.

    Takes what ``from_pretrained`` takes: ``None``, a device (``"mps"``, ``"cuda:1"``, an index,
    a ``torch.device``), a strategy (``"auto"``, ``"balanced"``, ...) or a dict of those per module.
    Several places: the first accelerator among them (``"cpu"``/``"disk"`` offload compute there).
    """
    if device_map is None:
        return "cpu"
    if isinstance(device_map, Mapping):
        types = [device_map_type(v) for v in device_map.values()]
        return next((t for t in types if t != "cpu"), "cpu")
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, str) and device_map == "disk":
        return "cpu"
    if isinstance(device_map, bool) or not isinstance(device_map, (str, int, torch.device)):
        raise ConfigError(
            f"device_map must be a device ('cpu', 'cuda:0', 0), 'auto' or a dict of those; got {device_map!r}."
        )
    if isinstance(device_map, int):  # an accelerator index, as in from_pretrained
        return torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cuda"
    try:
        return torch.device(device_map).type
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device_map={device_map!r} names no device torch knows ({exc}).") from exc


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant checkpointing, plus the input-grad hook a frozen embedding needs."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


# -- named adapters ------------------------------------------------------------------------------


def add_adapter(
    model: nn.Module,
    name: str,
    *,
    lora: LoraConfig | None = None,
    prompt: PromptTuningConfig | None = None,
    bottleneck: BottleneckConfig | None = None,
) -> None:
    """Add another named adapter set to a prepared model (it starts inactive)."""
    state = require_state(model)
    validate_adapter_name(name)
    if name in state.adapters:
        raise AdapterNameError(f"An adapter named {name!r} already exists; pick another name or delete_adapter() it.")
    _refuse_when_merged(state, f"add adapter {name!r}")
    state.adapters[name] = attach_adapter_set(
        model, name, state, task_type=state.task_type, lora=lora, prompt=prompt, bottleneck=bottleneck
    )
    set_active_adapters(model, state.active)  # each adapter keeps its trainable flag


def _refuse_when_merged(state: AdapterState, action: str) -> None:
    if state.merged:
        raise MergeError(
            f"Cannot {action}: adapters {state.merged} are merged into the base weights. "
            "Call unmerge_adapters(model) first."
        )


def active_adapters(model: nn.Module) -> list[str]:
    return list(require_state(model).active)


def set_active_adapters(model: nn.Module, names: str | Sequence[str], *, trainable: bool | None = None) -> None:
    """Activate ``names`` (their outputs add up); only active, trainable adapters get ``requires_grad``.

    ``trainable=None`` keeps each adapter's flag (adapters start trainable; ``load_adapter(...,
    is_trainable=False)`` starts them frozen); ``True``/``False`` sets it for ``names``.
    """
    activate_adapters(model, require_state(model), names, trainable=trainable)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere; a soft prompt or bottleneck module left without
    adapters goes too, with its hooks."""
    state = require_state(model)
    if name not in state.adapters:
        raise AdapterNameError(f"Unknown adapter {name!r}; this model has {list(state.adapters)}.")
    if name in state.merged:
        raise MergeError(f"Adapter {name!r} is merged into the base weights; call unmerge_adapters(model) first.")
    for _, layer in adapter_layers(model):
        layer.delete_adapter(name)
    del state.adapters[name]
    state.active = [n for n in state.active if n != name]
    remove_empty_adapter_modules(model, state)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block the model computes exactly what the (quantized) base model computes,
    merged adapters included."""
    state = require_state(model)
    previous = state.disabled
    state.disabled = True
    try:
        yield model
    finally:
        state.disabled = previous


# -- combining LoRA sets -------------------------------------------------------------------------


def combine_lora(
    model: nn.Module, weights: Mapping[str, float], name: str, *, method: Literal["cat", "linear"] = "cat"
) -> None:
    """Add adapter ``name`` (inactive) whose LoRA combines the adapters named in ``weights``.

    ``method="cat"``: per layer ``A = [w1 s1 A1; w2 s2 A2; ...]``, ``B = [B1, B2, ...]`` (rank = the
    sum of the ranks), so ``delta_W = sum_i w_i delta_W_i`` exactly: the weighted sum of the deltas.

    ``method="linear"`` (peft's ``add_weighted_adapter(combination_type="linear")``): the A's and the
    B's are each summed with weights ``sqrt(|w_i s_i|)`` (the sign goes on A) at the common rank. This
    is NOT the weighted sum of the deltas: ``(sum_i c_i B_i)(sum_j c_j A_j)`` has cross terms
    ``B_i A_j``; only for a single adapter is it ``w delta_W``. It needs equal ranks at every layer.

    ``s_i`` is each adapter's scaling; the result has scaling 1. Sources must be LoRA-only (no DoRA,
    prompt or bottleneck); a source's trained head copy (``modules_to_save``) is carried over, so at
    most one source may have one.
    """
    state = require_state(model)
    validate_adapter_name(name)
    if name in state.adapters:
        raise AdapterNameError(f"An adapter named {name!r} already exists; pick another name or delete_adapter() it.")
    _refuse_when_merged(state, "combine_lora")
    if method not in ("cat", "linear"):
        raise ConfigError(f"combine_lora method must be 'cat' or 'linear'; got {method!r}.")
    if not weights:
        raise ConfigError("combine_lora needs the adapters to combine, e.g. weights={'a': 0.7, 'b': 0.3}.")
    for source, weight in weights.items():
        if source not in state.adapters:
            raise AdapterNameError(f"Unknown adapter {source!r}; this model has {list(state.adapters)}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ConfigError(f"combine_lora weight for {source!r} must be a finite number; got {weight!r}.")
        spec = state.adapters[source]
        if spec.lora is None or spec.prompt is not None or spec.bottleneck is not None or spec.lora.use_dora:
            raise ConfigError(
                f"combine_lora combines plain LoRA adapters; {source!r} has {spec.methods}"
                f"{' with DoRA' if spec.lora is not None and spec.lora.use_dora else ''}."
            )
    with_heads = [s for s in weights if state.adapters[s].modules_to_save]
    if len(with_heads) > 1:
        trained = list(state.adapters[with_heads[0]].modules_to_save)
        raise ConfigError(
            f"Adapters {with_heads} each train their own copy of {trained}; combine_lora cannot merge whole "
            "modules. Combine adapters of which at most one has modules_to_save."
        )
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, layer in adapter_layers(model):
        present = {s: w for s, w in weights.items() if isinstance(layer, LoraLinear) and s in layer.lora_A}
        if not present:  # not a LoRA layer, or none of the sources adapts it
            continue
        combined[path] = _combined_lora(layer, present, method, path)

    first = state.adapters[next(iter(weights))].lora
    for path, (lora_a, lora_b) in combined.items():
        layer = model.get_submodule(path)
        layer.add_adapter(name, r=lora_a.shape[0], scaling=1.0, dropout=first.dropout)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(lora_a)
            layer.lora_B[name].weight.copy_(lora_b)
    heads: tuple[str, ...] = ()
    if with_heads:
        heads = state.adapters[with_heads[0]].modules_to_save
        for path in heads:
            head = model.get_submodule(path)
            head.add_adapter(name)
            head.modules_to_save[name].load_state_dict(head.modules_to_save[with_heads[0]].state_dict())
    ranks = {path: lora_a.shape[0] for path, (lora_a, _) in combined.items()}
    r = max(ranks.values())
    odd = {re.escape(path): rank for path, rank in ranks.items() if rank != r}
    config = LoraConfig(
        r=r,
        alpha=float(r),  # alpha / r = 1: the weights and scalings are already folded into A
        dropout=first.dropout,
        target_modules=tuple(ranks),
        rank_pattern=odd,
        alpha_pattern={key: float(rank) for key, rank in odd.items()},
        modules_to_save=state.adapters[with_heads[0]].lora.modules_to_save if with_heads else (),
    )
    state.adapters[name] = AdapterSpec(lora=config, lora_targets=tuple(ranks), modules_to_save=heads)
    set_active_adapters(model, state.active)


def _combined_lora(
    layer: LoraLinear, weights: dict[str, float], method: str, path: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined ``(A, B)`` of one layer (see :func:`combine_lora`), in float32."""
    a = {n: layer.lora_A[n].weight.detach().float() for n in weights}
    b = {n: layer.lora_B[n].weight.detach().float() for n in weights}
    if method == "cat":
        lora_a = torch.cat([w * layer.scaling[n] * a[n] for n, w in weights.items()], dim=0)
        return lora_a, torch.cat([b[n] for n in weights], dim=1)
    ranks = {n: layer.r[n] for n in weights}
    if len(set(ranks.values())) > 1:
        raise ConfigError(
            f"combine_lora(method='linear') needs equal ranks, but at {path} the ranks are {ranks}. "
            "Use method='cat', which takes any ranks."
        )
    scaled = {n: w * layer.scaling[n] for n, w in weights.items()}
    lora_a = sum(math.copysign(math.sqrt(abs(v)), v) * a[n] for n, v in scaled.items())
    lora_b = sum(math.sqrt(abs(v)) * b[n] for n, v in scaled.items())
    return lora_a, lora_b


# -- reporting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainableReport:
    trainable: int
    total: int
    footprint: Footprint

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        fp = self.footprint
        text = f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"
        if fp.quantized_weights:
            text += (
                f" || quantized: {fp.quantized_weights:,} weights in {fp.quantized_bytes / 2**20:.2f} MiB"
                f" ({fp.bits_per_quantized_weight:.3f} bits/weight) + {fp.full_precision_bytes / 2**20:.2f} MiB unquantized"
            )
        else:
            text += f" || size: {fp.total_bytes / 2**20:.2f} MiB"
        return text


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """Trainable / total parameter counts (4-bit weights counted as weights, not packed bytes)."""
    trainable = total = 0
    seen: set[int] = set()
    for module in model.modules():
        if is_quantized_linear(module):
            seen.add(id(module.weight))
            total += module.in_features * module.out_features
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        count = getattr(p, "ds_numel", None) or p.numel()  # DeepSpeed ZeRO-3 empties a partitioned parameter
        total += count
        if p.requires_grad:
            trainable += count
    return TrainableReport(trainable=trainable, total=total, footprint=footprint(model))


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_parameters(model))
