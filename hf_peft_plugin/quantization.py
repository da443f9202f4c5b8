"""Quantizing the frozen backbone with bitsandbytes, and reading quantized weights back.

Two routes reach the same layers (``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt``):
:func:`load_quantized_model` lets transformers quantize each weight while it streams from disk,
so peak memory stays near the quantized footprint; :func:`quantize_model` converts an already
loaded full-precision model one layer at a time, dropping each full-precision weight as it goes.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.pytorch_utils import Conv1D

from .config import QuantizationConfig
from .errors import ConfigError, QuantizationUnavailableError


def _bnb():
    try:
        return importlib.import_module("bitsandbytes")
    except Exception as exc:  # ImportError, or a broken native library
        raise QuantizationUnavailableError(
            f"4/8-bit quantization needs bitsandbytes, which could not be imported ({exc}). "
            "Install it with `pip install 'bitsandbytes>=0.48'`, or pass bits=None to train LoRA "
            "on the unquantized model."
        ) from exc


def default_compute_dtype(device: torch.device | str | None) -> torch.dtype:
    """bf16 on GPUs that run it natively (fp16 on older ones), float32 elsewhere.

    On CPUs float32 is the default even where AVX512-BF16 exists: torch's CPU bf16 kernels are
    slow or missing on most consumer CPUs, and bitsandbytes' bf16 CPU path is inference-only.
    Pass ``compute_dtype=torch.bfloat16`` to opt in.
    """
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_bitsandbytes_for(device: torch.device | str) -> None:
    """Fail early, with what to install, when bitsandbytes cannot serve ``device``."""
    device = torch.device(device)
    _bnb()
    if device.type not in ("cpu", "cuda", "xpu", "hpu", "mps"):
        raise QuantizationUnavailableError(
            f"bitsandbytes has no backend for device type {device.type!r}. Move the model to a CUDA GPU or "
            "the CPU first, or pass bits=None."
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise QuantizationUnavailableError(
            "The model is on CUDA but torch sees no CUDA device; install a CUDA build of torch and bitsandbytes."
        )


def is_quantized_linear(module: nn.Module) -> bool:
    bnb = _bnb_if_present()
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


@functools.lru_cache(maxsize=1)
def _bnb_if_present():
    try:
        return importlib.import_module("bitsandbytes")
    except Exception:
        return None


def is_linear(module: nn.Module) -> bool:
    """Linear layers LoRA can wrap: ``nn.Linear`` (incl. bnb's subclasses) and GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of any layer accepted by :func:`is_linear`."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def dequantized_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's weight as a dense ``(out_features, in_features)`` tensor."""
    if isinstance(module, Conv1D):
        return module.weight.detach().t().to(dtype)
    bnb = _bnb_if_present()
    if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
        weight = module.weight
        if _is_dtensor(weight):  # sharded by FSDP (kept in the standard layout): gather it, a collective
            return bnb.functional.dequantize_4bit(weight.full_tensor(), module.quant_state).to(dtype)
        unpack_cpu_4bit(module)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    if bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
        weight = module.weight
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb).to(dtype)
    return module.weight.detach().to(dtype)


def frozen_dense_weight(layer: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """For LoRA's fused path: a function giving ``layer``'s frozen dense weight in ``x``'s dtype,
    or ``None`` where the path does not apply (then the layer runs as is). It applies to float32
    inputs of a frozen ``nn.Linear``, a bitsandbytes 4-bit layer in the standard layout that
    computes in float32, or an 8-bit layer training on a CPU; 8-bit layers elsewhere,
    half-precision compute, GPT-2's ``Conv1D`` and sharded (DTensor) weights take the unfused path."""
    if x.dtype != torch.float32 or x.dim() < 2:
        return None
    weight = layer.weight
    if type(layer) is nn.Linear:
        if weight.requires_grad or weight.dtype != torch.float32 or type(weight.data) is not torch.Tensor:
            return None
        return weight.detach
    bnb = _bnb_if_present()
    if bnb is not None and type(layer) is bnb.nn.Linear8bitLt:
        return _frozen_int8_weight(layer, x)
    if bnb is None or type(layer) is not bnb.nn.Linear4bit or layer.compute_dtype not in (None, torch.float32):
        return None
    state = getattr(weight, "quant_state", None)
    if state is None or state.dtype != torch.float32 or getattr(state, "packing_format_for_cpu", False):
        return None
    if type(weight.data) is not torch.Tensor or (layer.bias is not None and layer.bias.requires_grad):
        return None
    data = weight.data
    return lambda: bnb.functional.dequantize_4bit(data, state)


def _frozen_int8_weight(layer: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor] | None:
    """An 8-bit layer training on a CPU: bitsandbytes computes ``x (CB * SCB / 127)^T + b`` there
    (``MatMul8bitFp``, whatever the outlier threshold), so the fused path takes the same weight,
    bit for bit, without bitsandbytes keeping ``x`` for a weight gradient it never needs. On GPUs,
    and in eval mode, bitsandbytes runs its int8 kernels instead: the layer then runs as is."""
    weight = layer.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = layer.state.SCB
    if (
        x.device.type != "cpu"
        or not layer.training
        or layer.state.has_fp16_weights
        or scb is None
        or weight.dtype != torch.int8
        or type(weight.data) is not torch.Tensor
        or (layer.bias is not None and layer.bias.requires_grad)
    ):
        return None
    data = weight.data
    return lambda: data.to(torch.float32).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


def unpack_cpu_4bit(layer: nn.Module) -> None:
    """Keep a 4-bit layer in bitsandbytes' standard layout, and stop it from leaving it.

    On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight for a fast kernel the first time it
    runs in eval mode without grad. That kernel has no autograd, so a later training step would
    silently stop gradients at every such layer (an evaluation before training is enough to
    trigger it), and the repacked weight no longer dequantizes. Adapter training needs neither.
    """
    layer.support_avx512bf16_for_cpu = False
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
        layer.quant_state = layer.weight.quant_state


def _matches_any(path: str, names: tuple[str, ...]) -> bool:
    return any(path == n or path.endswith("." + n) or path.startswith(n + ".") for n in names)


def quantizable_linears(model: nn.Module, skip: tuple[str, ...]) -> Iterator[tuple[str, nn.Module]]:
    """The linear layers :func:`quantize_model` replaces: not yet quantized, not the output
    embeddings, not matched by ``skip``. The memory planner counts the same ones on a meta model."""
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for path, module in model.named_modules():
        if not is_linear(module) or is_quantized_linear(module) or module is output_embeddings:
            continue
        if _matches_any(path, skip):
            continue
        yield path, module


def quantized_layer(module: nn.Module, config: QuantizationConfig, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding ``module``'s weight; ``module`` keeps no reference to it."""
    bnb = _bnb()
    weight = module.weight.detach()
    if isinstance(module, Conv1D):
        weight = weight.t()
    out_features, in_features = weight.shape
    device = weight.device
    has_bias = module.bias is not None
    if config.bits == 4:
        layer = bnb.nn.Linear4bit(
            in_features,
            out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=config.quant_storage,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.contiguous(),
            requires_grad=False,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=config.quant_storage,
            module=layer,
        ).to(device)
        unpack_cpu_4bit(layer)
    elif config.bits == 8:
        layer = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=config.int8_threshold,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(
            weight.to("cpu", torch.float16), requires_grad=False, has_fp16_weights=False
        ).to(device)
    else:
        raise ConfigError(f"quantized_layer needs bits 4 or 8, got {config.bits!r}; pass bits=4 or bits=8.")
    if has_bias:
        layer.bias = nn.Parameter(module.bias.detach().to(device), requires_grad=False)
    if isinstance(module, Conv1D):
        layer.hf_peft_plugin_was_conv1d = True  # merge_and_unload rebuilds a Conv1D from it
    layer.train(module.training)
    return layer


def requantized_like(layer: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new bitsandbytes layer of ``layer``'s kind and settings holding the dense ``weight``."""
    bnb = _bnb()
    template = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    template.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if layer.bias is not None:
        template.bias = layer.bias
    if isinstance(layer, bnb.nn.Linear4bit):
        w = layer.weight
        config = QuantizationConfig(
            bits=4, quant_type=w.quant_type, double_quant=w.compress_statistics, quant_storage=w.quant_storage
        )
        compute_dtype = layer.compute_dtype or torch.float32
    else:
        config = QuantizationConfig(bits=8, int8_threshold=layer.state.threshold)
        compute_dtype = torch.float32
    new = quantized_layer(template, config, compute_dtype)
    if getattr(layer, "hf_peft_plugin_was_conv1d", False):
        new.hf_peft_plugin_was_conv1d = True
    return new


def quantize_model(model: nn.Module, config: QuantizationConfig, compute_dtype: torch.dtype) -> list[str]:
    """Replace every quantizable linear layer in place; returns the paths replaced."""
    replaced = []
    for path, module in list(quantizable_linears(model, config.skip_modules)):
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, quantized_layer(module, config, compute_dtype))
        # Drop the full-precision tensors now, not when the loop ends: peak stays at one layer.
        module.weight = None
        module.bias = None
        replaced.append(path)
    return replaced


def bits_and_bytes_config(config: QuantizationConfig, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=config.bits == 4,
        load_in_8bit=config.bits == 8,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=config.quant_storage,
        llm_int8_threshold=config.int8_threshold,
        llm_int8_skip_modules=list(config.skip_modules),
    )


def load_quantized_model(
    name_or_path: str, config: QuantizationConfig, compute_dtype: torch.dtype, auto_class: Any, **kwargs: Any
) -> nn.Module:
    """``auto_class.from_pretrained`` with the weights quantized as they stream in."""
    if config.bits is not None:
        _bnb()
        kwargs["quantization_config"] = bits_and_bytes_config(config, compute_dtype)
    kwargs.setdefault("dtype", compute_dtype)
    return auto_class.from_pretrained(name_or_path, **kwargs)


@dataclass(frozen=True)
class Footprint:
    """Bytes held by the model's parameters and buffers, split by how they are stored."""

    quantized_bytes: int
    quantized_weights: int
    full_precision_bytes: int
    trainable_bytes: int

    @property
    def bits_per_quantized_weight(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else 0.0

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + self.full_precision_bytes


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _unique_bytes(tensors: list[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of tensors not counted yet (bitsandbytes shares lookup tables between layers)."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = t.data_ptr() if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(t)
    return total


def _quant_state_tensors(state: Any) -> list[torch.Tensor | None]:
    tensors = [state.absmax, getattr(state, "code", None), getattr(state, "offset", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return tensors


def footprint(model: nn.Module) -> Footprint:
    """Measured storage of the model, counting 4-bit quantization constants and 8-bit scales."""
    bnb = _bnb_if_present()
    quantized_bytes = quantized_weights = 0
    seen: set[int] = set()
    seen_storage: set[int] = set()
    for module in model.modules():
        if bnb is not None and isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            seen.add(id(w))
            state = getattr(w, "quant_state", None) or module.quant_state  # FSDP's shard keeps it on the layer
            quantized_bytes += _tensor_bytes(w.data) + _unique_bytes(_quant_state_tensors(state), seen_storage)
            quantized_weights += module.in_features * module.out_features
        elif bnb is not None and isinstance(module, bnb.nn.Linear8bitLt):
            w = module.weight
            seen.add(id(w))
            scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
            quantized_bytes += _tensor_bytes(w.data) + _tensor_bytes(scb)
            quantized_weights += module.in_features * module.out_features
    full = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        full += _tensor_bytes(p)
        if p.requires_grad:
            trainable += _tensor_bytes(p)
    for b in model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            full += _tensor_bytes(b)
    return Footprint(quantized_bytes, quantized_weights, full, trainable)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def adopt_or_quantize(model: nn.Module, quant: QuantizationConfig) -> tuple[nn.Module, QuantizationConfig, torch.dtype]:
    """Quantize a full-precision model in place, or describe one that is quantized already."""
    device = _model_device(model)
    hf_quant = getattr(model, "hf_quantizer", None)
    if hf_quant is not None or any(is_quantized_linear(m) for m in model.modules()):
        return model, _described_quantization(model, quant), _existing_compute_dtype(model, device)
    dtype = quant.compute_dtype or default_compute_dtype(device)
    if quant.bits is not None:
        check_bitsandbytes_for(device)
        quantize_model(model, quant, dtype)
    return model, quant, dtype


def _described_quantization(model: nn.Module, fallback: QuantizationConfig) -> QuantizationConfig:
    """The settings a model quantized elsewhere was quantized with (for cards and the planner)."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return fallback
    get = qc.get if isinstance(qc, dict) else lambda k, d=None: getattr(qc, k, d)
    bits = 4 if get("load_in_4bit", False) else 8 if get("load_in_8bit", False) else fallback.bits
    storage = get("bnb_4bit_quant_storage", None)
    return QuantizationConfig(
        bits=bits,
        quant_type=get("bnb_4bit_quant_type", "nf4") or "nf4",
        double_quant=bool(get("bnb_4bit_use_double_quant", False)),
        quant_storage=getattr(torch, storage) if isinstance(storage, str) else storage or torch.uint8,
        keep_full_precision=tuple(get("llm_int8_skip_modules", None) or ()),
    )


def _existing_compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return default_compute_dtype(device)


def freeze_backbone(model: nn.Module, quantized: bool) -> list[RemovableHandle]:
    """Freeze every base parameter; on a quantized model upcast only the norms to fp32 (QLoRA).
    Returns the handles of the norms' dtype hooks (kept in the adapter state, removed on unload).

    Embeddings and the output head keep their dtype: upcasting them, as peft's
    ``prepare_model_for_kbit_training`` does, can cost more memory than the quantization saved.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    handles: list[RemovableHandle] = []
    if not quantized:
        return handles
    for module in model.modules():
        if is_quantized_linear(module) and hasattr(module.weight, "quant_state"):
            unpack_cpu_4bit(module)
    for module in model.modules():
        if "norm" not in type(module).__name__.lower():
            continue
        half = [p for p in module.parameters(recurse=False) if p.dtype in (torch.float16, torch.bfloat16)]
        for p in half:
            p.data = p.data.float()
        if half:
            # The norm computes in fp32 but hands its neighbours their own dtype, so a bf16 model
            # still runs outside autocast (an fp32 norm output would meet a bf16 lm_head).
            handles.append(module.register_forward_hook(_output_in_input_dtype))
    return handles


def _output_in_input_dtype(module: nn.Module, args: tuple, output: Any) -> Any:
    if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
        return output.to(args[0].dtype)
    return output
