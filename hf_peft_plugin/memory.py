"""Will it fit? Training memory, estimated from ``config.json`` alone, before anything is loaded.

:func:`estimate_memory` builds the model on the meta device (shapes, no storage) and runs the
package's own preparation on it (:func:`~hf_peft_plugin.model.prepare_model` with quantization
left out, :func:`~hf_peft_plugin.quantization.quantizable_linears` for what would be quantized),
so the layers it counts are exactly the layers ``prepare_model`` quantizes and adapts. The
weights, adapters, gradients and optimizer states are then exact byte counts; activations come
from the per-block formula below. :func:`plan_for_memory` searches settings until the estimate
fits a budget. docs/memory.md has the validation and a table for popular model sizes.

Activations, for batch ``b``, sequence ``s`` (plus any virtual tokens), ``t = b*s``, hidden ``h``,
MLP width ``i``, attention widths ``q = heads*head_dim`` and ``kv = kv_heads*head_dim``, vocab
``V``. ``M`` is the compute dtype's size (matmul inputs are saved in it; half precision assumes the
Trainer's ``bf16=True``/``fp16=True`` autocast); ``E`` is the size of the elementwise stream, also
``M``: a quantized base's norms compute in float32 but hand their input dtype on (measured: a 4-bit
bf16 step peaks where an unquantized one does). Per block, autograd keeps:

* each norm's float32 input: ``4 t h``; attention (SDPA/flash): ``M t (2q + 2kv)`` for q, k, v and
  the output, plus ``4 b heads s`` for the log-sum-exp; the probabilities ``M b heads s^2`` with
  eager attention, or with attention dropout on CPU (where SDPA falls back to its math kernel);
* the MLP: ``(a + 2) E t i`` when gated (``a`` tensors for the activation function -- 1 for SiLU or
  GELU, 4 for GPT-2's tanh GELU, found by running it on a meta tensor -- plus its output and the up
  projection), else ``a E t i``; each dropout with ``p > 0`` a mask of ``t h`` (1 byte on CUDA,
  ``E`` on CPU, where the mask is a float tensor);
* the inputs of adapted layers: one ``E t in`` per distinct input (layers under one parent with
  the same ``in_features`` read one tensor), or one ``M t in`` copy per layer when LoRA dropout
  (plus its mask: 1 byte, :class:`~hf_peft_plugin.dropout.LoraDropout` keeps a bool one on CPU
  too) or a half-precision compute dtype makes each layer cast its own; 8-bit base
  layers keep their input too;
* LoRA's rank-``r`` intermediate ``M t r`` per layer; DoRA ``8 t out`` per layer; each bottleneck
  adapter ``4 t (h + 2 width)``.

Outside the blocks: the final norm's input ``4 t h`` and the log-probabilities ``4 b s V``; the
backward of the loss adds two more ``4 b s V`` (the gradients of the log-probabilities and of the
logits), so a causal LM's loss peaks at ``12 b s V`` bytes -- often the largest single term. A
block's own backward adds about ``E t (h + 2i)`` of gradients. Without checkpointing the peak is
all blocks + outside + the larger transient; with checkpointing it is one ``E t h`` input per block
plus the larger of (outside + loss transient) and (one recomputed block + its transient).

The chunked loss (``prepare_model``'s default, :mod:`~hf_peft_plugin.loss`) never builds those
``t V`` tensors: it keeps the hidden states' gradient ``E t h`` (instead of the log-probabilities)
and, while it runs, a copy of the labelled rows ``E t h`` plus one chunk's ``12 c V`` (``c`` =
``loss_chunk_size``, at most ``t``; all tokens are assumed labelled); its backward adds ``2 E t h``.
Packing (``packed_tokens``): one row of that many tokens (the sum of the examples' lengths)
replaces ``batch_size x seq_len``. Activation offload (CUDA, with checkpointing) moves the ``E t h``
block inputs to host memory (``offloaded_bytes``, not in the device total) and brings one back at a
time for its recompute; on the CPU it changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from transformers import CONFIG_MAPPING, PretrainedConfig

from .bottleneck import BottleneckAdapter
from .config import BottleneckConfig, LoraConfig, PromptTuningConfig, QuantizationConfig
from .errors import ConfigError, MemoryBudgetError
from .lora import LoraLinear
from .loss import ChunkedLossConfig, default_chunk_size
from .model import prepare_model
from .quantization import footprint, freeze_backbone, linear_shape, quantizable_linears
from .state import TASK_AUTO_CLASSES
from .targeting import linear_layers

#: Optimizer names as ``TrainingArguments(optim=...)`` spells them, with their state precision.
OPTIMIZER_STATE_BITS = {
    "adamw_torch": 32,
    "adamw_torch_fused": 32,
    "paged_adamw_32bit": 32,
    "adamw_8bit": 8,
    "paged_adamw_8bit": 8,
}
#: CUDA context, cuBLAS workspaces and loaded kernels: typically 300-500 MiB; the high end is used.
CUDA_CONTEXT_BYTES = 500 * 2**20
#: bitsandbytes 4-bit: 64 weights share one absmax; with double quantization the absmaxes are
#: 8-bit, 256 of them sharing one float32 scale. Per layer it also keeps a 16-entry code, a
#: 256-entry code for the absmaxes and a float32 offset.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
NF4_LAYER_CONSTANTS = 16 * 4 + 256 * 4 + 4
#: bitsandbytes' 8-bit optimizers keep tensors smaller than this in float32; larger ones as uint8
#: with one float32 absmax per 256 values, plus one pair of 256-entry float32 maps shared by all.
BNB_OPTIM_MIN_8BIT_SIZE = 4096
BNB_OPTIM_BLOCK = 256
#: Config fields that hold the dropout on attention probabilities, by architecture family.
ATTENTION_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")
#: The planner shortens sequences down to this many tokens, never further.
MIN_PLANNED_SEQ_LEN = 128
PLANNABLE = (
    "gradient_checkpointing", "chunked_loss", "optimizer", "bits", "offload_activations", "batch_size", "seq_len", "rank",
)  # fmt: skip
_QUANT_NAMES = {4: "4-bit", 8: "8-bit", None: "unquantized"}

_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip
_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


# -- bytes, both ways ----------------------------------------------------------------------------


def parse_budget(budget: int | str) -> int:
    """Bytes in ``budget``: an int, or ``"8GiB"``, ``"8 GB"``, ``"512MiB"``, ``"24G"``.

    ``KiB/MiB/GiB/TiB`` and the bare ``K/M/G/T`` are powers of 1024; ``KB/MB/GB/TB`` are powers of
    1000, as in accelerate's ``max_memory`` strings (so ``"24GB"`` is a little less than ``"24GiB"``).
    """
    if isinstance(budget, int) and not isinstance(budget, bool):
        value = budget
    elif isinstance(budget, str) and (match := _BUDGET.match(budget)) and match.group(2).lower() in _UNITS:
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    else:
        raise MemoryBudgetError(
            f"Cannot read the memory budget {budget!r}: give bytes as an int or a string such as "
            "'8GiB', '8 GB', '512MiB' or '24G'."
        )
    if value <= 0:
        raise MemoryBudgetError(f"The memory budget must be positive; got {budget!r}.")
    return value


def format_bytes(n: int | float) -> str:
    """``1536 -> '1.50 KiB'``: binary units, at least three significant digits."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 100 else f"{value:.2f} {unit}"
    return f"{int(n)} B"


# -- reading config.json -------------------------------------------------------------------------


def load_model_config(model_name_or_config: Any) -> PretrainedConfig:
    """A ``PretrainedConfig`` from a config object, a dict, a local directory or ``config.json``
    file, or a Hub id (only ``config.json``, a few KB, is downloaded)."""
    source = model_name_or_config
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, (str, os.PathLike)):
        source = _read_config_json(os.fspath(source))
    if not isinstance(source, Mapping):
        raise TypeError(
            "estimate_memory takes a Hub id, a local path, a transformers PretrainedConfig or a config dict; "
            f"got {type(model_name_or_config).__name__}."
        )
    fields = dict(source)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise ConfigError(
            f"The config of {_display_name(model_name_or_config)} has no 'model_type', so its architecture is unknown. "
            "Add the model_type (e.g. 'llama') to the config."
        )
    if model_type not in CONFIG_MAPPING:
        import transformers

        raise ConfigError(
            f"model_type {model_type!r} of {_display_name(model_name_or_config)} is not known to transformers "
            f"{transformers.__version__}. Upgrade transformers, or pass the config of a supported architecture; "
            "models that need trust_remote_code are not supported."
        )
    check_dimensions(fields, _display_name(model_name_or_config))  # before transformers sees them
    try:
        return CONFIG_MAPPING[model_type](**fields)
    except Exception as exc:  # transformers validates some fields itself, with any exception type
        raise ConfigError(
            f"The {model_type} config of {_display_name(model_name_or_config)} is invalid "
            f"({type(exc).__name__}: {exc}); fix its config.json."
        ) from exc


#: Dimensions the planner builds a meta model from, with a bound far above any real model's: a
#: hostile config.json (``num_hidden_layers: 1e9``) must be refused, not built for hours.
_DIMENSION_BOUNDS = {
    "num_hidden_layers": 1024,
    "hidden_size": 131_072,
    "intermediate_size": 1_048_576,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 8192,
    "vocab_size": 4_194_304,
    "max_position_embeddings": 16_777_216,
}


def check_dimensions(config: Any, name: str) -> None:
    """Raise :class:`ConfigError` unless every dimension of ``config`` (a config or its fields) is a
    positive, bounded integer."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field_name, bound in _DIMENSION_BOUNDS.items():
        value = text.get(field_name) if isinstance(text, Mapping) else getattr(text, field_name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= bound:
            raise ConfigError(
                f"The config of {name} has {field_name}={value!r}; it must be a positive integer of at most "
                f"{bound:,}. Fix its config.json."
            )


def _read_config_json(name: str) -> dict[str, Any]:
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(
                f"{name} is a directory without a config.json; point to the model's directory "
                "(the one holding config.json) or pass a Hub id."
            )
    elif not os.path.isfile(path):
        if os.path.isabs(path) or name.startswith((".", "~")) or name.count("/") > 1:
            raise ConfigError(
                f"{name} does not exist; pass an existing model directory or a Hub id such as 'org/model'."
            )
        path = _download_config(name)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"Cannot read {path} as JSON ({exc}); the model's config.json looks broken.") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object; it is not a model config.")
    return data


def _download_config(repo_id: str) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, "config.json")
    except Exception as exc:  # offline, unknown repo, gated repo, bad id: all end the same way
        raise ConfigError(
            f"Cannot get config.json of {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Check the id and your connection (gated models need `hf auth login`), or pass a local directory."
        ) from exc


def _display_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Mapping):
        return str(source.get("_name_or_path") or source.get("model_type") or "the model")
    return str(getattr(source, "_name_or_path", None) or getattr(source, "model_type", None) or "the model")


# -- what the meta model holds -------------------------------------------------------------------


@dataclass(frozen=True)
class _Linear:
    parent: str
    in_features: int
    out_features: int
    rank: int = 0  # 0: not adapted
    dora: bool = False
    dropout: bool = False


@dataclass(frozen=True)
class _Block:
    norms: int
    mlp_width: int
    gated: bool
    activation_saves: int  # tensors of the MLP width the activation function keeps (NewGELU: 4)
    dropouts: int  # nn.Dropout modules with p > 0
    linears: tuple[_Linear, ...]
    quantized_inputs: tuple[tuple[str, int], ...]  # (parent, in_features) of layers that would be quantized
    bottleneck_widths: tuple[int, ...]


@dataclass(frozen=True)
class _Inventory:
    """Everything the estimate needs from the meta model; independent of batch, sequence and bits."""

    quantizable: tuple[tuple[int, int], ...]  # (in, out) per layer that would be quantized
    quantizable_weight_bytes: int  # their weights in the compute dtype
    base_bytes: int  # frozen parameters and buffers, unquantized, tied weights once
    norm_upcast_bytes: int  # what upcasting the norms to float32 adds on a quantized model
    trainable: tuple[tuple[int, int], ...]  # (numel, element_size) per trainable tensor
    blocks: tuple[_Block, ...]
    final_norms: int
    hidden_size: int
    heads: int
    q_width: int
    kv_width: int
    eager_attention: bool
    attention_dropout: bool
    vocab: int  # logits per position for a causal LM, else 0
    virtual_tokens: int
    max_positions: int | None


def _build_inventory(
    config: Any,
    name: str,
    task_type: str,
    dtype: torch.dtype,
    lora: LoraConfig | None,
    prompt: PromptTuningConfig | None,
    bottleneck: BottleneckConfig | None,
    keep_full_precision: tuple[str, ...],
) -> _Inventory:
    import transformers
    from accelerate import init_empty_weights
    from transformers.modeling_layers import GradientCheckpointingLayer

    auto_class = getattr(transformers, TASK_AUTO_CLASSES[task_type])
    check_dimensions(config, name)
    try:
        with init_empty_weights(include_buffers=True):
            model = auto_class.from_config(copy.deepcopy(config), dtype=dtype)
    except Exception as exc:  # a config transformers accepted but cannot build from, whatever the error type
        raise ConfigError(
            f"transformers cannot build a {task_type} model ({auto_class.__name__}) from the {config.model_type} "
            f"config of {name} ({type(exc).__name__}: {exc}). Fix the config, or pass the task_type this model is "
            "made for, e.g. task_type='FEATURE_EXTRACTION'."
        ) from exc
    skip = QuantizationConfig(keep_full_precision=keep_full_precision).skip_modules
    quantizable = [(path, linear_shape(m), m.weight) for path, m in quantizable_linears(model, skip)]

    prepare_model(
        model, bits=None, lora=lora, prompt=prompt, bottleneck=bottleneck, compute_dtype=dtype, task_type=task_type
    )
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    fp = footprint(model)
    blocks = [p for p, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    blocks = [p for p in blocks if not any(p.startswith(q + ".") for q in blocks)]
    if not blocks:
        raise ConfigError(f"Cannot find the transformer blocks of {type(model).__name__}; it cannot be estimated.")
    text = model.config.get_text_config()
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    output = model.get_output_embeddings() if task_type == "CAUSAL_LM" else None
    linear_paths = linear_layers(model)
    last_block_index = max(i for i, (p, _) in enumerate(model.named_modules()) if p in blocks)
    after_blocks = [p for i, (p, _) in enumerate(model.named_modules()) if i > last_block_index]
    inventory = dict(
        quantizable=tuple(shape for _, shape, _ in quantizable),
        quantizable_weight_bytes=sum(w.numel() * w.element_size() for _, _, w in quantizable),
        base_bytes=fp.full_precision_bytes - fp.trainable_bytes,
        trainable=tuple((p.numel(), p.element_size()) for p in trainable.values()),
        blocks=tuple(_block(model, p, linear_paths, [(q, shape) for q, shape, _ in quantizable]) for p in blocks),
        final_norms=sum(_is_norm(model.get_submodule(p)) for p in after_blocks if not _inside_any(p, blocks)),
        hidden_size=hidden,
        heads=heads,
        q_width=heads * head_dim,
        kv_width=kv_heads * head_dim,
        eager_attention=getattr(model.config, "_attn_implementation", "sdpa") == "eager",
        attention_dropout=any(getattr(text, f, 0) or 0 for f in ATTENTION_DROPOUT_FIELDS),
        vocab=output.weight.shape[0] if output is not None else 0,
        virtual_tokens=prompt.num_virtual_tokens if prompt is not None else 0,
        max_positions=getattr(text, "max_position_embeddings", None),
    )
    freeze_backbone(model, quantized=True)  # the norm upcast prepare_model applies to a quantized model
    inventory["norm_upcast_bytes"] = footprint(model).full_precision_bytes - fp.full_precision_bytes
    return _Inventory(**inventory)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and not list(module.children())


def _is_activation(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__ == "transformers.activations" or cls.__module__ == nn.modules.activation.__name__) and not (
        "softmax" in cls.__name__.lower() or "attention" in cls.__name__.lower()
    )


def _saved_per_element(activation: nn.Module) -> int:
    """How many input-sized tensors ``activation`` keeps for its backward, found by running it on a
    meta tensor: one for SiLU or exact GELU, four for GPT-2's tanh-approximated ``NewGELU``."""
    x = torch.empty(64, device="meta", requires_grad=True) * 1.0
    saved: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage()._cdata] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = activation(x)
    del y
    return round(sum(t.numel() for t in saved.values()) / x.numel())


def _inside_any(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _block(
    model: nn.Module, path: str, linear_paths: list[str], quantizable: list[tuple[str, tuple[int, int]]]
) -> _Block:
    block = model.get_submodule(path)
    linears = []
    for p in linear_paths:
        if not p.startswith(path + "."):
            continue
        module = model.get_submodule(p)
        parent = p.rpartition(".")[0]
        # The adapter being estimated is the one active, whatever its name.
        name = module.active_adapters[0] if isinstance(module, LoraLinear) and module.active_adapters else None
        if name is not None:
            linears.append(
                _Linear(
                    parent,
                    module.in_features,
                    module.out_features,
                    rank=module.r[name],
                    dora=name in module.lora_magnitude_vector,
                    dropout=not isinstance(module.lora_dropout[name], nn.Identity),
                )
            )
        else:
            linears.append(
                _Linear(parent, *linear_shape(module.base_layer if isinstance(module, LoraLinear) else module))
            )
    # The MLP's hidden width is the widest input; its "down" projection reads it. A gated MLP feeds
    # it from two projections (or one fused projection twice as wide).
    width = max((lin.in_features for lin in linears), default=0)
    down_parents = {lin.parent for lin in linears if lin.in_features == width}
    feeding = sum(
        lin.out_features // width for lin in linears if lin.parent in down_parents and lin.in_features != width
    )
    quantized = tuple((q.rpartition(".")[0], shape[0]) for q, shape in quantizable if q.startswith(path + "."))
    widths = tuple(
        m.down[name].out_features for m in block.modules() if isinstance(m, BottleneckAdapter) for name in m.down
    )
    activation = next((m for m in block.modules() if _is_activation(m)), None)
    lora_parts = {id(m) for layer in block.modules() if isinstance(layer, LoraLinear) for m in layer.modules()}
    return _Block(
        norms=sum(_is_norm(m) for m in block.modules()),
        mlp_width=width,
        gated=feeding >= 2,
        activation_saves=_saved_per_element(activation) if activation is not None else 1,
        dropouts=sum(isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in lora_parts for m in block.modules()),
        linears=tuple(linears),
        quantized_inputs=quantized,
        bottleneck_widths=widths,
    )


# -- settings and results ------------------------------------------------------------------------


@dataclass(frozen=True)
class MemorySettings:
    """One training setup, as :func:`estimate_memory` takes it (plus the planner's accumulation)."""

    bits: int | None
    lora: LoraConfig | None
    prompt: PromptTuningConfig | None
    bottleneck: BottleneckConfig | None
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    optimizer: str
    dtype: torch.dtype
    device: str
    task_type: str
    quant_type: str = "nf4"
    double_quant: bool = True
    keep_full_precision: tuple[str, ...] = ()
    gradient_accumulation_steps: int = 1
    num_processes: int = 1  # ranks training together (DDP, or FSDP with fsdp=True)
    fsdp: bool = False  # prepare_model(fsdp=True): the frozen base sharded over num_processes
    chunked_loss: bool = True
    loss_chunk_size: int | None = None
    offload_activations: bool = False
    packed_tokens: int | None = None

    @property
    def tokens(self) -> int:
        """Tokens per batch (before virtual tokens): the packed row, or batch x sequence."""
        return self.packed_tokens if self.packed_tokens is not None else self.batch_size * self.seq_len

    def describe(self) -> str:
        quant = _QUANT_NAMES[self.bits]
        if self.bits == 4:
            quant += f" {self.quant_type}" + (" + double quant" if self.double_quant else "")
        adapters = []
        if self.lora is not None:
            adapters.append(f"{'DoRA' if self.lora.use_dora else 'LoRA'} r={self.lora.r}")
        if self.prompt is not None:
            adapters.append(f"soft prompt of {self.prompt.num_virtual_tokens} tokens")
        if self.bottleneck is not None:
            adapters.append(f"{self.bottleneck.placement} bottleneck")
        batch = f"batch {self.batch_size} x {self.seq_len} tokens"
        if self.packed_tokens is not None:
            batch = f"packed rows of {self.packed_tokens} tokens"
        if self.gradient_accumulation_steps > 1:
            batch += f" x {self.gradient_accumulation_steps} accumulation steps"
        checkpointing = "gradient checkpointing" if self.gradient_checkpointing else "no gradient checkpointing"
        if self.offload_activations:
            checkpointing += " + offload"
        loss = "chunked loss" if self.chunked_loss else "full-logits loss"
        dtype = str(self.dtype).removeprefix("torch.")
        parts = [quant, *adapters, batch, checkpointing, loss, self.optimizer, f"{dtype} on {self.device}"]
        if self.num_processes > 1:
            parts.append(f"per rank of {self.num_processes} ({'FSDP, base sharded' if self.fsdp else 'DDP'})")
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step, by part; ``total_bytes`` is what the device must hold."""

    model: str
    settings: MemorySettings
    quantized_weights_bytes: int  # packed weights + quantization constants (absmax, codes, scales)
    unquantized_weights_bytes: int  # embeddings, output head, norms, biases, buffers (tied weights once)
    trainable_bytes: int  # adapters and trained copies of heads
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # peak of what the forward keeps for the backward, plus backward transients
    logits_bytes: int  # the loss's share of that peak (already inside activation_bytes)
    overhead_bytes: int  # CUDA context, plus the largest quantized weight dequantized for a matmul
    quantized_params: int
    trainable_params: int
    #: FSDP: the units gathered at once (the largest one and the block prefetched with it), in full.
    fsdp_gather_bytes: int = 0
    offloaded_bytes: int = 0  # block inputs held in host memory by activation offload (not in the total)

    @property
    def weights_bytes(self) -> int:
        """Everything that does not depend on batch and sequence: weights, adapters, gradients, states."""
        return (
            self.quantized_weights_bytes
            + self.unquantized_weights_bytes
            + self.trainable_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
        )

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes + self.overhead_bytes + self.fsdp_gather_bytes

    @property
    def bits_per_quantized_weight(self) -> float:
        return 8 * self.quantized_weights_bytes / self.quantized_params if self.quantized_params else 0.0

    def rows(self) -> list[tuple[str, int]]:
        quantized = "quantized weights"
        if self.settings.fsdp and self.settings.num_processes > 1:
            quantized += f" (a 1/{self.settings.num_processes} share + replicated constants)"
        elif self.quantized_params:
            quantized += f" ({self.quantized_params / 1e9:.3g}B at {self.bits_per_quantized_weight:.3f} bits)"
        rows = [
            (quantized, self.quantized_weights_bytes),
            ("unquantized weights (embeddings, head, norms)", self.unquantized_weights_bytes),
            (f"trainable parameters ({self.trainable_params / 1e6:.3g}M)", self.trainable_bytes),
            ("gradients", self.gradient_bytes),
            (f"optimizer states ({self.settings.optimizer})", self.optimizer_bytes),
            ("activations (peak)", self.activation_bytes),
        ]
        if self.logits_bytes:
            rows.append(("  of which logits and loss", self.logits_bytes))
        overhead = (
            "CUDA context + dequantization workspace" if self.settings.device == "cuda" else "dequantization workspace"
        )
        rows.append((overhead, self.overhead_bytes))
        if self.settings.fsdp and self.settings.num_processes > 1:
            rows.append(("FSDP all-gathered units (largest + prefetched block)", self.fsdp_gather_bytes))
        rows.append(("total" if self.settings.num_processes == 1 else "total per rank", self.total_bytes))
        if self.offloaded_bytes:
            rows.append(("offloaded to host memory (not in the total)", self.offloaded_bytes))
        return rows

    def __str__(self) -> str:
        lines = [f"Training memory estimate for {self.model}", f"  {self.settings.describe()}"]
        lines += [f"  {label:<52}{format_bytes(value):>12}" for label, value in self.rows()]
        return "\n".join(lines)


@dataclass(frozen=True)
class MemoryPlan:
    """The first settings, in the planner's order of preference, whose estimate fits the budget."""

    settings: MemorySettings
    estimate: MemoryEstimate
    budget_bytes: int
    changes: tuple[str, ...]  # what differs from the requested settings; empty when they fit as asked

    def prepare_model_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return dict(
            bits=s.bits,
            lora=s.lora,
            prompt=s.prompt,
            bottleneck=s.bottleneck,
            gradient_checkpointing=s.gradient_checkpointing,
            quant_type=s.quant_type,
            double_quant=s.double_quant,
            compute_dtype=s.dtype,
            keep_full_precision=s.keep_full_precision,
            task_type=s.task_type,
            chunked_loss=s.chunked_loss,
            loss_chunk_size=s.loss_chunk_size,
            offload_activations=s.offload_activations,
        )

    def training_arguments_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return dict(
            per_device_train_batch_size=s.batch_size,
            gradient_accumulation_steps=s.gradient_accumulation_steps,
            optim=s.optimizer,
        )

    def __str__(self) -> str:
        spare = self.budget_bytes - self.estimate.total_bytes
        head = f"Fits in {format_bytes(self.budget_bytes)} ({format_bytes(spare)} to spare)"
        changes = "as requested" if not self.changes else "after: " + "; ".join(self.changes)
        return f"{head}, {changes}. Truncate inputs to {self.settings.seq_len} tokens.\n{self.estimate}"


# -- the estimate --------------------------------------------------------------------------------


def estimate_memory(
    model_name_or_config: Any,
    *,
    bits: int | None = 4,
    lora: LoraConfig | None = None,
    prompt: PromptTuningConfig | None = None,
    bottleneck: BottleneckConfig | None = None,
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw_torch",
    dtype: torch.dtype | None = None,
    device: str = "cuda",
    task_type: str | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    keep_full_precision: Iterable[str] = (),
    num_processes: int = 1,
    fsdp: bool = False,
    chunked_loss: bool = True,
    loss_chunk_size: int | None = None,
    offload_activations: bool = False,
    packed_tokens: int | None = None,
) -> MemoryEstimate:
    """Peak memory of one training step of ``prepare_model(model, bits=..., lora=..., ...)``.

    ``model_name_or_config``: a Hub id, a local directory, a ``PretrainedConfig`` or a config dict;
    only ``config.json`` is read. ``dtype`` is the compute dtype (default: bfloat16 on CUDA,
    which assumes an Ampere or newer GPU, float32 on CPU). ``optimizer`` is a
    ``TrainingArguments.optim`` name from :data:`OPTIMIZER_STATE_BITS`. With no adapter config,
    LoRA with :class:`LoraConfig` defaults is assumed, as in ``prepare_model``. ``chunked_loss``,
    ``loss_chunk_size`` and ``offload_activations`` are ``prepare_model``'s; ``packed_tokens``: the
    length of one padding-free packed row (the sum of its examples' lengths), which then replaces
    ``batch_size x seq_len``.

    ``num_processes`` ranks with ``fsdp=True`` (``prepare_model(fsdp=True)``) give the figure per
    rank: packed weights and unquantized frozen tensors divided among the ranks; quantization
    constants, adapters, their gradients and optimizer states replicated; plus the units FSDP
    gathers at once. Without ``fsdp`` every rank holds everything (DDP).

    Example::

        print(estimate_memory("meta-llama/Llama-3.1-8B", bits=4, lora=LoraConfig(r=16), seq_len=2048))
    """
    settings = _settings(
        bits=bits, lora=lora, prompt=prompt, bottleneck=bottleneck, batch_size=batch_size, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, optimizer=optimizer, dtype=dtype, device=device,
        task_type=task_type, quant_type=quant_type, double_quant=double_quant, keep_full_precision=keep_full_precision,
        num_processes=num_processes, fsdp=fsdp,
        chunked_loss=chunked_loss, loss_chunk_size=loss_chunk_size, offload_activations=offload_activations,
        packed_tokens=packed_tokens,
    )  # fmt: skip
    return _Estimator(model_name_or_config).estimate(settings)


def _settings(
    *,
    bits: int | None = 4,
    lora: LoraConfig | None = None,
    prompt: PromptTuningConfig | None = None,
    bottleneck: BottleneckConfig | None = None,
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = True,
    optimizer: str = "adamw_torch",
    dtype: torch.dtype | None = None,
    device: str = "cuda",
    task_type: str | None = None,
    quant_type: str = "nf4",
    double_quant: bool = True,
    keep_full_precision: Iterable[str] = (),
    gradient_accumulation_steps: int = 1,
    num_processes: int = 1,
    fsdp: bool = False,
    chunked_loss: bool = True,
    loss_chunk_size: int | None = None,
    offload_activations: bool = False,
    packed_tokens: int | None = None,
) -> MemorySettings:
    """Validated settings; every bad value fails here, before any model is built."""
    quant = QuantizationConfig(
        bits=bits, quant_type=quant_type, double_quant=double_quant, compute_dtype=dtype,
        keep_full_precision=tuple(keep_full_precision),
    )  # fmt: skip
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be 'cuda' or 'cpu'; got {device!r}.")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16; got {dtype}.")
    for what, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("num_processes", num_processes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{what} must be a positive integer; got {value!r}.")
    loss = ChunkedLossConfig(enabled=chunked_loss, chunk_size=loss_chunk_size)
    if not isinstance(offload_activations, bool):
        raise ConfigError(f"offload_activations must be True or False; got {offload_activations!r}.")
    if offload_activations and not gradient_checkpointing:
        raise ConfigError("offload_activations needs gradient_checkpointing=True, as in prepare_model.")
    if packed_tokens is not None and (isinstance(packed_tokens, bool) or not isinstance(packed_tokens, int) or packed_tokens <= 0):
        raise ConfigError(f"packed_tokens must be a positive integer (or None); got {packed_tokens!r}.")
    if optimizer not in OPTIMIZER_STATE_BITS:
        raise ConfigError(
            f"optimizer must be one of {sorted(OPTIMIZER_STATE_BITS)} (TrainingArguments.optim names); "
            f"got {optimizer!r}."
        )
    task_type = task_type or "CAUSAL_LM"
    if task_type not in TASK_AUTO_CLASSES:
        raise ConfigError(f"task_type must be one of {sorted(TASK_AUTO_CLASSES)}; got {task_type!r}.")
    for what, value, cls in (
        ("lora", lora, LoraConfig),
        ("prompt", prompt, PromptTuningConfig),
        ("bottleneck", bottleneck, BottleneckConfig),
    ):
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"{what} must be a {cls.__name__} or None; got {type(value).__name__}.")
    if lora is None and prompt is None and bottleneck is None:
        lora = LoraConfig()
    return MemorySettings(
        bits=quant.bits, lora=lora, prompt=prompt, bottleneck=bottleneck, batch_size=batch_size, seq_len=seq_len,
        gradient_checkpointing=bool(gradient_checkpointing), optimizer=optimizer, dtype=dtype, device=device,
        task_type=task_type, quant_type=quant.quant_type, double_quant=quant.double_quant,
        keep_full_precision=quant.keep_full_precision, gradient_accumulation_steps=gradient_accumulation_steps,
        num_processes=num_processes, fsdp=bool(fsdp),
        chunked_loss=loss.enabled, loss_chunk_size=loss.chunk_size, offload_activations=offload_activations,
        packed_tokens=packed_tokens,
    )  # fmt: skip


class _Estimator:
    """Estimates for one model; the meta model is built once per adapter configuration."""

    def __init__(self, model_name_or_config: Any) -> None:
        self.config = load_model_config(model_name_or_config)
        self.name = _display_name(model_name_or_config)
        self._inventories: dict[str, _Inventory] = {}

    def inventory(self, s: MemorySettings) -> _Inventory:
        key = repr((s.task_type, s.dtype, s.lora, s.prompt, s.bottleneck, s.keep_full_precision))
        if key not in self._inventories:
            self._inventories[key] = _build_inventory(
                self.config, self.name, s.task_type, s.dtype, s.lora, s.prompt, s.bottleneck, s.keep_full_precision
            )
        return self._inventories[key]

    def estimate(self, s: MemorySettings) -> MemoryEstimate:
        inv = self.inventory(s)
        tokens = (s.packed_tokens or s.seq_len) + inv.virtual_tokens
        if inv.max_positions is not None and tokens > inv.max_positions:
            prompt = f" plus {inv.virtual_tokens} virtual tokens" if inv.virtual_tokens else ""
            raise ConfigError(
                f"seq_len={s.seq_len}{prompt} exceeds the {inv.max_positions} positions {self.name} supports; "
                f"use seq_len <= {inv.max_positions - inv.virtual_tokens}."
            )
        quantized = inv.quantizable if s.bits is not None else ()
        activations, logits, offloaded = _activations(inv, s)
        workspace = max((i * o for i, o in quantized), default=0) * s.dtype.itemsize
        estimate = MemoryEstimate(
            model=self.name,
            settings=s,
            quantized_weights_bytes=sum(_quantized_layer_bytes(i, o, s.bits, s.double_quant) for i, o in quantized),
            unquantized_weights_bytes=inv.base_bytes
            - (inv.quantizable_weight_bytes - inv.norm_upcast_bytes if s.bits is not None else 0),
            trainable_bytes=sum(n * size for n, size in inv.trainable),
            gradient_bytes=sum(n * size for n, size in inv.trainable),
            optimizer_bytes=_optimizer_bytes(inv.trainable, s.optimizer),
            activation_bytes=activations,
            logits_bytes=logits,
            overhead_bytes=workspace + (CUDA_CONTEXT_BYTES if s.device == "cuda" else 0),
            quantized_params=sum(i * o for i, o in quantized),
            trainable_params=sum(n for n, _ in inv.trainable),
            offloaded_bytes=offloaded,
        )
        return _sharded(estimate, inv, s, quantized, self.config) if s.fsdp and s.num_processes > 1 else estimate


def _sharded(
    est: MemoryEstimate, inv: _Inventory, s: MemorySettings, quantized: tuple[tuple[int, int], ...], config: Any
) -> MemoryEstimate:
    """Per-rank figures under :func:`~hf_peft_plugin.fsdp.shard_model` (see ``estimate_memory``).

    Sharded: the packed weights (half a byte per 4-bit weight) and the unquantized frozen tensors.
    Replicated: the quantization constants (bitsandbytes keeps them on the layer, not in the
    parameter), adapters, gradients, optimizer states and activations. Gathered at once: the largest
    unit (embeddings or head, or a block) plus one block prefetched with it, in full.
    """
    n = s.num_processes
    packed = sum((i * o + 1) // 2 for i, o in quantized) if s.bits == 4 else 0
    constants = est.quantized_weights_bytes - packed
    blocks = max(len(inv.blocks), 1)
    block_norms = sum(b.norms for b in inv.blocks) * inv.hidden_size * 4
    block_bytes = (packed + block_norms) // blocks
    if s.bits != 4:  # unquantized blocks: their linear weights are in the unquantized figure
        block_bytes = (est.unquantized_weights_bytes - _outside_blocks(est, inv, s, block_norms)) // blocks
    outside = _outside_blocks(est, inv, s, block_norms)
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    largest_end = outside if tied else outside // 2  # embeddings and head: one unit when tied
    return dataclasses.replace(
        est,
        quantized_weights_bytes=math.ceil(packed / n) + constants,
        unquantized_weights_bytes=math.ceil(est.unquantized_weights_bytes / n),
        fsdp_gather_bytes=max(block_bytes, largest_end) + block_bytes,
    )


def _outside_blocks(est: MemoryEstimate, inv: _Inventory, s: MemorySettings, block_norms: int) -> int:
    """Unquantized frozen bytes outside the decoder blocks (embeddings, head, final norm), roughly."""
    inside = block_norms if s.bits == 4 else inv.quantizable_weight_bytes + block_norms
    return max(est.unquantized_weights_bytes - inside, 0)


def _quantized_layer_bytes(in_features: int, out_features: int, bits: int, double_quant: bool) -> int:
    """bitsandbytes' storage for one layer, as :func:`~hf_peft_plugin.quantization.footprint` measures it."""
    n = in_features * out_features
    if bits == 8:
        return n + 4 * out_features  # int8 weights + one float32 scale per output row
    blocks = math.ceil(n / NF4_BLOCK)
    if not double_quant:
        return (n + 1) // 2 + 4 * blocks + 16 * 4
    return (n + 1) // 2 + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK) + NF4_LAYER_CONSTANTS


def _optimizer_bytes(trainable: Iterable[tuple[int, int]], optimizer: str) -> int:
    """AdamW's two moments: torch keeps them in the parameter's dtype, bitsandbytes 32-bit in
    float32, bitsandbytes 8-bit as uint8 with block absmaxes (small tensors stay float32)."""
    if optimizer in ("adamw_torch", "adamw_torch_fused"):
        return sum(2 * n * size for n, size in trainable)
    if OPTIMIZER_STATE_BITS[optimizer] == 32:
        return sum(2 * 4 * n for n, _ in trainable)
    total, quantized = 0, False
    for n, _ in trainable:
        if n >= BNB_OPTIM_MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_OPTIM_BLOCK)
            quantized = True
        else:
            total += 2 * 4 * n
    return total + (2 * 256 * 4 if quantized else 0)


def _activations(inv: _Inventory, s: MemorySettings) -> tuple[int, int, int]:
    """``(peak, loss share, offloaded to the host)`` of the formula in the module docstring."""
    b, seq = (1, s.packed_tokens) if s.packed_tokens is not None else (s.batch_size, s.seq_len)
    seq += inv.virtual_tokens
    t, h, heads = b * seq, inv.hidden_size, inv.heads
    matmul = s.dtype.itemsize
    stream = matmul  # upcast norms hand their input dtype on, so the residual stream stays in it
    mask = 1 if s.device == "cuda" else stream  # dropout keeps a bool mask on CUDA, a float one on CPU
    # Eager attention keeps the probabilities; so does SDPA on CPU when it must apply dropout.
    probabilities = inv.eager_attention or (inv.attention_dropout and s.device == "cpu")
    saved, transient = [], []
    for block in inv.blocks:
        total = block.norms * 4 * t * h + block.dropouts * mask * t * h
        total += matmul * t * (2 * inv.q_width + 2 * inv.kv_width) + 4 * b * heads * seq
        if probabilities:
            total += b * heads * seq * seq * (matmul + (matmul + mask if inv.attention_dropout else 0))
        total += (block.activation_saves + (2 if block.gated else 0)) * stream * t * block.mlp_width
        inputs = set(block.quantized_inputs) if s.bits == 8 else set()
        for lin in block.linears:
            if not lin.rank:
                continue
            if matmul != 4 or lin.dropout:
                total += matmul * t * lin.in_features + (t * lin.in_features if lin.dropout else 0)
            else:
                inputs.add((lin.parent, lin.in_features))
            total += matmul * t * lin.rank + (8 * t * lin.out_features if lin.dora else 0)
        total += sum(stream * t * width for _, width in inputs)
        total += sum(4 * t * (h + 2 * width) for width in block.bottleneck_widths)
        saved.append(total)
        transient.append(stream * t * (h + 2 * block.mlp_width))
    if s.chunked_loss and inv.vocab:
        chunk = min(t, s.loss_chunk_size or default_chunk_size(inv.vocab))
        logits = 12 * chunk * inv.vocab  # a half-precision chunk is upcast (and freed) before log_softmax
        outside = inv.final_norms * 4 * t * h + stream * t * h  # the hidden states' gradient
        loss_transient = logits + 2 * stream * t * h  # the labelled rows' copy, then the backward's
    else:
        logits = 12 * t * inv.vocab
        outside = inv.final_norms * 4 * t * h + 4 * t * inv.vocab
        loss_transient = 8 * t * inv.vocab
    offloaded = 0
    if s.gradient_checkpointing:
        inputs = len(inv.blocks) * stream * t * h
        recompute = max(a + g for a, g in zip(saved, transient))
        if s.offload_activations and s.device == "cuda":
            offloaded, inputs, recompute = inputs, 0, recompute + stream * t * h  # one input back at a time
        peak = inputs + max(outside + loss_transient, recompute)
    else:
        peak = sum(saved) + outside + max(loss_transient, max(transient))
    return peak, logits, offloaded


def longest_context(model_name_or_config: Any, budget: int | str, **settings: Any) -> MemoryEstimate | None:
    """The estimate at the longest ``seq_len`` whose training step fits ``budget`` (``None``: not
    even one token fits), searched by bisection up to the model's ``max_position_embeddings``
    (2**20 tokens when it has none). ``settings``: :func:`estimate_memory`'s keywords but
    ``seq_len``; with ``packed_tokens`` given it is the packed row's length that is searched."""
    budget_bytes = parse_budget(budget)
    estimator = _Estimator(model_name_or_config)
    packed = settings.get("packed_tokens") is not None
    base = _settings(**{k: v for k, v in settings.items() if k not in ("seq_len", "packed_tokens")})
    inv = estimator.inventory(base)
    high = (inv.max_positions - inv.virtual_tokens) if inv.max_positions is not None else 2**20

    def at(tokens: int) -> MemoryEstimate:
        changed = dict(packed_tokens=tokens) if packed else dict(seq_len=tokens)
        return estimator.estimate(dataclasses.replace(base, **changed))

    best, low = None, 1
    if at(high).total_bytes <= budget_bytes:
        return at(high)
    while low <= high:
        mid = (low + high) // 2
        estimate = at(mid)
        if estimate.total_bytes <= budget_bytes:
            best, low = estimate, mid + 1
        else:
            high = mid - 1
    return best


# -- the planner ---------------------------------------------------------------------------------


def plan_for_memory(
    model_name_or_config: Any,
    budget: int | str = "8GiB",
    *,
    fixed: Iterable[str] = (),
    **settings: Any,
) -> MemoryPlan:
    """The first settings that fit ``budget``, trying in this order (each step keeps the previous):

    1. the requested ``settings`` (any :func:`estimate_memory` keyword, plus
       ``gradient_accumulation_steps``);
    2. gradient checkpointing on;
    3. the chunked loss on (when it was asked off: it costs no time);
    4. the ``paged_adamw_8bit`` optimizer;
    5. 4-bit instead of 8-bit or no quantization;
    6. activation offload on (CUDA only: on a CPU the host memory is the same memory);
    7. halving the batch size down to 1, with more gradient accumulation for the same effective batch;
    8. halving the sequence length, down to :data:`MIN_PLANNED_SEQ_LEN` tokens;
    9. halving the LoRA rank down to 1 (alpha scaled along, so the LoRA scaling stays the same).

    ``fixed`` names settings the planner must leave alone (from :data:`PLANNABLE`). When nothing
    fits, :class:`MemoryBudgetError` says the smallest budget that would.
    """
    budget_bytes = parse_budget(budget)
    fixed = set(fixed)
    unknown = sorted(fixed - set(PLANNABLE))
    if unknown:
        raise ConfigError(f"fixed names settings the planner does not change: {unknown}; it changes {list(PLANNABLE)}.")
    requested = _settings(**settings)
    estimator = _Estimator(model_name_or_config)
    last = None
    for candidate in _candidates(requested, fixed):
        last = estimator.estimate(candidate)
        if last.total_bytes <= budget_bytes:
            return MemoryPlan(candidate, last, budget_bytes, tuple(_changes(requested, candidate)))
    raise MemoryBudgetError(
        f"{estimator.name} cannot be trained in {format_bytes(budget_bytes)}: even with "
        f"{last.settings.describe()} it needs {format_bytes(last.total_bytes)}. The smallest budget that works is "
        f"{format_bytes(last.total_bytes)} ({last.total_bytes} bytes); "
        + ("allow the planner to change " + ", ".join(sorted(fixed)) + ", or " if fixed else "")
        + "use a larger device or a smaller model.",
        smallest_budget=last.total_bytes,
    )


def _candidates(s: MemorySettings, fixed: set[str]):
    yield s
    if "gradient_checkpointing" not in fixed and not s.gradient_checkpointing:
        s = dataclasses.replace(s, gradient_checkpointing=True)
        yield s
    if "chunked_loss" not in fixed and not s.chunked_loss:
        s = dataclasses.replace(s, chunked_loss=True)
        yield s
    if "optimizer" not in fixed and s.optimizer != "paged_adamw_8bit":
        s = dataclasses.replace(s, optimizer="paged_adamw_8bit")
        yield s
    if "bits" not in fixed and s.bits != 4:
        s = dataclasses.replace(s, bits=4)
        yield s
    if "offload_activations" not in fixed and s.device == "cuda" and s.gradient_checkpointing and not s.offload_activations:
        s = dataclasses.replace(s, offload_activations=True)
        yield s
    effective = s.batch_size * s.gradient_accumulation_steps
    while "batch_size" not in fixed and s.batch_size > 1:
        batch = s.batch_size // 2
        s = dataclasses.replace(s, batch_size=batch, gradient_accumulation_steps=math.ceil(effective / batch))
        yield s
    while "seq_len" not in fixed and s.seq_len > MIN_PLANNED_SEQ_LEN:
        s = dataclasses.replace(s, seq_len=max(MIN_PLANNED_SEQ_LEN, s.seq_len // 2))
        yield s
    while "rank" not in fixed and s.lora is not None and s.lora.r > 1:
        s = dataclasses.replace(s, lora=_with_rank(s.lora, s.lora.r // 2))
        yield s


def _with_rank(lora: LoraConfig, r: int) -> LoraConfig:
    """``lora`` at rank ``r`` (per-module ranks scaled alike), with alpha keeping the scaling."""
    factor = r / lora.r
    alpha_factor = math.sqrt(factor) if lora.use_rslora else factor
    return dataclasses.replace(
        lora,
        r=r,
        alpha=lora.alpha * alpha_factor,
        rank_pattern={k: max(1, round(v * factor)) for k, v in lora.rank_pattern.items()},
        alpha_pattern={k: v * alpha_factor for k, v in lora.alpha_pattern.items()},
    )


def _changes(old: MemorySettings, new: MemorySettings) -> list[str]:
    changes = []
    if new.gradient_checkpointing != old.gradient_checkpointing:
        changes.append("gradient checkpointing on")
    if new.chunked_loss != old.chunked_loss:
        changes.append("chunked loss on")
    if new.optimizer != old.optimizer:
        changes.append(f"optimizer {old.optimizer} -> {new.optimizer}")
    if new.bits != old.bits:
        changes.append(f"{_QUANT_NAMES[old.bits]} -> {_QUANT_NAMES[new.bits]}")
    if new.offload_activations != old.offload_activations:
        changes.append("activation offload on")
    if new.batch_size != old.batch_size:
        changes.append(
            f"batch size {old.batch_size} -> {new.batch_size} with {new.gradient_accumulation_steps} gradient "
            f"accumulation steps (effective batch {new.batch_size * new.gradient_accumulation_steps})"
        )
    if new.seq_len != old.seq_len:
        changes.append(f"seq_len {old.seq_len} -> {new.seq_len}")
    if old.lora is not None and new.lora.r != old.lora.r:
        changes.append(f"LoRA rank {old.lora.r} -> {new.lora.r} (alpha {old.lora.alpha:g} -> {new.lora.alpha:g})")
    return changes
