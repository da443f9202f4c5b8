"""FSDP2 for a prepared model: the frozen (quantized) base sharded per decoder block, adapters replicated.

Why this shape. The frozen base is what outgrows one device (a 70B model is ~35 GB in 4-bit); the
adapter is megabytes. So :func:`shard_model` applies torch's FSDP2 ``fully_shard`` to every decoder
block (the model's ``_no_split_modules``) and then to the model itself (embeddings, final norm,
head), each with the *trainable* parameters listed in ``ignored_params``: every frozen tensor,
the packed 4-bit weights included, becomes a DTensor holding 1/N of its rows on each rank, while
LoRA, soft-prompt, bottleneck and trained-head parameters stay plain, replicated tensors. The stock
``Trainer`` then trains the model as it trains any multi-process model, wrapping it in DDP, which
all-reduces the adapter gradients (the sharded frozen tensors are on DDP's ignore list). Hence
everything the Trainer and :class:`~hf_peft_plugin.AdapterCallback` do for DDP holds unchanged:
adapter-only checkpoints, exact resume, rank-0-only writes and pushes, ``save_adapter``.

Why not ``TrainingArguments(fsdp=...)``. accelerate 1.15 honours an FSDP plugin only for GPU-like
distributed types: on CPU (``MULTI_CPU``) ``AcceleratorState`` drops it and the Trainer trains as
DDP with a full copy per rank, silently. Where accelerate does shard (GPUs), its checkpoints go
through ``save_fsdp_model``, which keeps the adapter only for peft's ``PeftModel`` and otherwise
saves the whole model, quantized base included. :func:`check_trainer_fsdp_request` (run by
``AdapterCallback``) therefore refuses that request for a prepared model, naming this route.

Uniform units. Each wrapped unit's frozen floating tensors must share one dtype, and a packed 4-bit
weight must be stored in that dtype (``quant_storage``): it is the layout FSDP1's flat parameters
need and the one accelerate's FSDP2 path shards (it leaves ``uint8`` 4-bit weights unsharded), so
one prepared model serves every FSDP route, and torch all-gathers each unit in its own dtype rather
than through a byte buffer. ``prepare_model(..., fsdp=True)`` picks that ``quant_storage`` itself.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ShardingError
from .quantization import is_quantized_linear

logger = logging.getLogger(__name__)

#: Set on a model by :func:`shard_model`: ``"sharded"``, or ``"gathered"`` after :func:`unshard_model`.
_MARK = "_hf_peft_plugin_fsdp"

#: The dtype ``prepare_model(fsdp=True)`` stores 4-bit weights in when ``quant_storage`` is not given:
#: that of the decoder blocks' other frozen tensors, the norms ``freeze_backbone`` keeps in float32.
FSDP_QUANT_STORAGE = torch.float32


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_model` sharded ``model`` (and :func:`unshard_model` has not gathered it)."""
    return getattr(model, _MARK, None) == "sharded"


def require_gathered(model: nn.Module, what: str) -> None:
    """Raise :class:`ShardingError` when ``what`` would read the base weights of a sharded model."""
    if is_sharded(model):
        raise ShardingError(
            f"{what} needs the full base weights, but this model is sharded with FSDP (each rank holds a slice "
            "of every frozen weight). Call unshard_model(model) on every rank first, or save_adapter(model, dir) "
            "and merge into a freshly loaded base in one process."
        )


def wrapped_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks FSDP wraps one by one: modules whose class is in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    # By the class or one it derives from: fully_shard swaps a unit's class for an FSDP subclass.
    units = [(p, m) for p, m in model.named_modules() if p and any(c.__name__ in names for c in type(m).__mro__)]
    # A unit inside another unit (none in transformers' decoders) would be wrapped twice: keep the outer.
    outer = [(p, m) for p, m in units if not any(p.startswith(q + ".") for q, _ in units)]
    return outer


def check_shardable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Raise :class:`ShardingError` for what FSDP cannot shard; returns the units to wrap."""
    from torch.distributed.fsdp import FSDPModule

    _check_no_8bit(model, "")
    units = check_units_exist(model)
    for path, unit in units:
        if not isinstance(unit, FSDPModule):  # one sharded while loading (sharded_loading) was checked then
            _check_uniform(unit, path)
    return units


def check_units_exist(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units to wrap; :class:`ShardingError` when the model names none."""
    units = wrapped_units(model)
    if not units:
        raise ShardingError(
            f"{type(model).__name__} names no decoder block class in _no_split_modules "
            f"({getattr(model, '_no_split_modules', None)!r}), so there is no unit to shard by. FSDP needs the "
            "model's transformer blocks; set model._no_split_modules = ['<BlockClass>'] before shard_model."
        )
    return units


def check_unit(unit: nn.Module, path: str) -> None:
    """Raise :class:`ShardingError` when one unit cannot be sharded as one group."""
    _check_no_8bit(unit, path)
    _check_uniform(unit, path)


def _check_no_8bit(module: nn.Module, prefix: str) -> None:
    for path, sub in module.named_modules(prefix=prefix):
        if is_quantized_linear(sub) and not hasattr(sub, "quant_state"):  # 4-bit layers carry it, sharded or not
            raise ShardingError(
                f"{path} holds an 8-bit weight (bits=8). bitsandbytes keeps the scales of 8-bit weights (CB/SCB) "
                "on the parameter object, which FSDP replaces with its shard, so 8-bit bases cannot be sharded. "
                "Prepare the model with bits=4 (FSDP-QLoRA) or bits=None."
            )


def require_distributed(what: str = "shard_model") -> None:
    """Raise :class:`ShardingError` unless ``torch.distributed`` is up (sharding needs the ranks)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ShardingError(
            f"{what} needs torch.distributed: launch with `torchrun --nproc_per_node N` (or `accelerate "
            "launch`) and create TrainingArguments before prepare_model, or call "
            "torch.distributed.init_process_group() first."
        )


def unit_sharder(device: torch.device, *, reshard_after_forward: bool = True):
    """``fully_shard`` with the mesh for ``device``, leaving a unit's trainable parameters replicated."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    mesh = None
    if device.type != "cpu":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))

    def shard(unit: nn.Module | list[nn.Module], *, reshard: bool | None = reshard_after_forward) -> None:
        modules = unit if isinstance(unit, list) else [unit]
        trainable = {p for m in modules for p in m.parameters() if p.requires_grad}
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard, ignored_params=trainable)

    return shard


def _check_uniform(module: nn.Module, where: str) -> None:
    packed = {id(m.weight) for m in module.modules() if is_quantized_linear(m)}
    dtypes: dict[torch.dtype, tuple[str, bool]] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            continue
        if p.is_floating_point() or id(p) in packed:
            dtypes.setdefault(p.dtype, (name, id(p) in packed))
    if len(dtypes) <= 1:
        return
    shown = ", ".join(f"{name} is {dtype}" for dtype, (name, _) in dtypes.items())
    if any(is_packed for _, is_packed in dtypes.values()):
        fix = (
            f"pass quant_storage={FSDP_QUANT_STORAGE} to prepare_model (or leave it unset with fsdp=True, which "
            "picks it), or bnb_4bit_quant_storage to transformers' BitsAndBytesConfig, so the packed 4-bit "
            "weights are stored in the dtype of the block's other tensors"
        )
    else:
        fix = "load the model in one dtype (torch_dtype / compute_dtype) so the block's frozen tensors share it"
    raise ShardingError(
        f"FSDP shards each unit as one group of one dtype, but in {where} {shown}. To shard it, {fix}."
    )


def shard_model(model: nn.Module, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard the frozen base of a prepared model across the ranks of ``torch.distributed`` (FSDP2).

    Every rank must call it, on the same prepared model, after ``torch.distributed`` is up (creating
    ``TrainingArguments`` under ``torchrun``/``accelerate launch`` starts it). Adapters stay
    replicated; train with the stock ``Trainer`` and no ``fsdp`` in its arguments. Returns ``model``
    (modified in place). ``reshard_after_forward=False`` keeps each block gathered from its forward
    to its backward: faster, more memory.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from .state import require_state

    require_state(model)
    if is_sharded(model) or isinstance(model, FSDPModule):
        raise ShardingError("This model is sharded already; shard_model runs once per model.")
    require_distributed()
    units = check_shardable(model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    shard = unit_sharder(device, reshard_after_forward=reshard_after_forward)
    for _, unit in units:
        if not isinstance(unit, FSDPModule):
            shard(unit)
    for ends in _embedding_units(model):  # their own units, as accelerate does: one dtype each
        if any(not p.requires_grad for m in ends for p in m.parameters()):
            shard(ends)
    # The rest (final norm, position embeddings): the root unit, dtypes as they come (they are small).
    # The root stays gathered after its forward as FSDP2 does by default for the root.
    shard(model, reshard=None)
    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    # DDP (the Trainer's wrapper) must neither broadcast nor all-reduce FSDP's shards.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded)
    setattr(model, _MARK, "sharded")
    return model


def _embedding_units(model: nn.Module) -> list[list[nn.Module]]:
    """Input embeddings and output head as units; one unit when their weights are tied."""
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    ends = [m for m in (inputs, outputs) if isinstance(m, nn.Module)]
    if len(ends) == 2 and getattr(inputs, "weight", None) is getattr(outputs, "weight", 0):
        return [ends]
    return [[m] for m in ends]


def unshard_model(model: nn.Module) -> nn.Module:
    """Gather the full base on every rank, for good: ``merge_and_unload`` and inference need it.

    A collective: every rank calls it. Each rank then holds the whole model again, so it needs
    the memory of the unsharded model. Training afterwards is not supported.
    """
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(model):
        raise ShardingError("unshard_model takes a model sharded by shard_model (or prepare_model(fsdp=True)).")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_reshard_after_forward(False, recurse=False)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
    for module in model.modules():
        # FSDP's gathered parameter is a plain Parameter: give it back the 4-bit layer's quant state.
        if is_quantized_linear(module) and getattr(module, "quant_state", None) is not None:
            if getattr(module.weight, "quant_state", None) is None:
                module.weight.quant_state = module.quant_state
    setattr(model, _MARK, "gathered")
    return model


@dataclass(frozen=True)
class ShardedBytes:
    """Bytes of the parameters FSDP manages: this rank's shards, and the full tensors they split."""

    quantized_local: int
    quantized_full: int
    other_local: int
    other_full: int

    @property
    def local(self) -> int:
        return self.quantized_local + self.other_local


def sharded_bytes(model: nn.Module) -> ShardedBytes:
    """Count this rank's share of every sharded parameter (packed 4-bit weights separately)."""
    from torch.distributed.tensor import DTensor

    packed = {id(m.weight) for m in model.modules() if is_quantized_linear(m)}
    counts = {"quantized_local": 0, "quantized_full": 0, "other_local": 0, "other_full": 0}
    for p in model.parameters():
        if not isinstance(p, DTensor):
            continue
        kind = "quantized" if id(p) in packed else "other"
        counts[f"{kind}_local"] += p.to_local().numel() * p.element_size()
        counts[f"{kind}_full"] += p.numel() * p.element_size()
    return ShardedBytes(**counts)


# -- the Trainer's own FSDP request ---------------------------------------------------------------


def trainer_fsdp_requested(args: Any) -> bool:
    """Whether ``TrainingArguments`` or the launcher (``accelerate launch`` with an FSDP config) asks for FSDP."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def check_trainer_fsdp_request(model: nn.Module, args: Any) -> None:
    """Refuse FSDP requested through the Trainer/accelerate for a prepared model; name the route that shards.

    On CPU accelerate drops the request (training would silently run as DDP, each rank holding the
    whole model); on GPUs its checkpoints would hold the whole quantized base. Either way the fix is
    ``prepare_model(..., fsdp=True)`` with no ``fsdp`` in ``TrainingArguments`` or the accelerate config.
    """
    if not trainer_fsdp_requested(args):
        return
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    # Read, never create, accelerate's shared state (the Trainer has created it by on_init_end).
    distributed_type = AcceleratorState._shared_state.get("distributed_type")
    if distributed_type is None:
        accelerate_shards = torch.cuda.is_available() and not getattr(args, "use_cpu", False)
    else:
        accelerate_shards = distributed_type == DistributedType.FSDP
    if accelerate_shards:
        why = (
            "accelerate's FSDP path would save every checkpoint through save_fsdp_model, which keeps only peft "
            "PeftModel adapters and otherwise writes the whole model, quantized base included"
        )
    else:
        why = (
            "accelerate 1.15 drops an FSDP plugin on CPU (AcceleratorState honours it only for GPU-like "
            "distributed types), so training would silently run as DDP with the whole model on every rank"
        )
    already = " The model is already sharded by prepare_model(fsdp=True)." if is_sharded(model) else ""
    raise ShardingError(
        f"FSDP was requested through TrainingArguments(fsdp=...) or the accelerate config, but {why}.{already} "
        "For a prepared model, request sharding in prepare_model(..., fsdp=True) (or shard_model(model)) and "
        "remove fsdp/fsdp_config from TrainingArguments and the accelerate config; the Trainer then trains the "
        "sharded model with the adapter replicated."
    )
