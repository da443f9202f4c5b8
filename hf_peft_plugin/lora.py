"""LoRA and DoRA on any frozen linear layer, full-precision or bitsandbytes-quantized.

One class, :class:`LoraLinear`, wraps the frozen ``base_layer`` (``nn.Linear``, GPT-2's ``Conv1D``,
``bnb.nn.Linear4bit`` or ``bnb.nn.Linear8bitLt``) and holds any number of named adapters::

    y = base_layer(x) + sum over active adapters of  scaling * B(A(dropout(x)))

With DoRA the adapted weight is renormalised row-wise to a learned magnitude ``m``:
``W' = m * (W + s B A) / ||W + s B A||`` (norm detached, as in the paper, so no gradient flows
through the norm). The merge logic sits next to the forward so the two cannot drift apart.

Parameter names follow peft's in-memory layout (``lora_A.<adapter>.weight``), which keeps the
translation to the PEFT file format a matter of dropping the adapter name.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .dropout import LoraDropout
from .errors import AdapterNameError, ConfigError, MergeError
from .matmul import frozen_mm
from .quantization import (
    dequantized_weight,
    frozen_dense_weight,
    is_quantized_linear,
    linear_shape,
    requantized_like,
    unpack_cpu_4bit,
)
from .state import ReadsAdapterState

LORA_DTYPE = torch.float32  # trainable weights stay fp32 whatever the compute dtype
#: Use :class:`_FrozenLinearWithLora` where it applies (a switch for benchmarks and tests).
FUSED = True


class LoraLinear(ReadsAdapterState, nn.Module):
    """A frozen linear layer plus named low-rank adapters; see the module docstring.

    Which adapters are active, merged or disabled comes from the model's
    :class:`~hf_peft_plugin.state.AdapterState` (:class:`~hf_peft_plugin.state.ReadsAdapterState`).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if is_quantized_linear(base_layer) and hasattr(base_layer.weight, "quant_state"):
            unpack_cpu_4bit(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        #: GPT-2's Conv1D stores its weight as (in, out); peft calls that fan_in_fan_out.
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        # A quantized base cannot take a delta in place; merge() swaps in a requantized copy
        # and keeps the original here (outside the state dict) so unmerge() is exact.
        self._unmerged_base: nn.Module | None = None

    # -- the wrapped layer, seen from outside -------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    # -- adapters --------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        init: str = "default",
    ) -> None:
        if name in self.lora_A:
            raise AdapterNameError(f"LoRA adapter {name!r} already exists on this layer")
        device = self._base_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=LORA_DTYPE)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=LORA_DTYPE)
        self.lora_dropout[name] = LoraDropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        self.r[name] = r
        self._init_adapter(name, init)
        if use_dora:
            # ||W + s B A||, so the layer starts as the base: PiSSA has moved the principal part of W
            # into B A, and the norm of the residual alone would rescale every row.
            norm = (self._dense_weight() + self.delta_weight(name)).norm(p=2, dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(LORA_DTYPE))
        self._state_changed()

    def _init_adapter(self, name: str, init: str) -> None:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init == "default":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r[name])
                nn.init.zeros_(b)
            elif init == "pissa":
                self._init_pissa(name)
            else:
                raise ConfigError(f"unknown LoRA init {init!r}; use 'default', 'gaussian' or 'pissa'")

    def _init_pissa(self, name: str) -> None:
        """Principal singular vectors into A/B, the residual into the base weight (PiSSA)."""
        if is_quantized_linear(self.base_layer):
            raise ConfigError(
                "init='pissa' rewrites the base weight, which a quantized base cannot take exactly; "
                "use bits=None with PiSSA, or init='default' on a quantized model."
            )
        r, s = self.r[name], self.scaling[name]
        weight = self._dense_weight()
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
        root = sigma[:r].sqrt() / math.sqrt(s)
        self.lora_A[name].weight.copy_(root[:, None] * vh[:r])
        self.lora_B[name].weight.copy_(u[:, :r] * root[None, :])
        residual = weight - s * self.lora_B[name].weight @ self.lora_A[name].weight
        self._write_dense_weight(residual)

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = [self.lora_A[name].weight, self.lora_B[name].weight]
        if name in self.lora_magnitude_vector:
            params.append(self.lora_magnitude_vector[name])
        return params

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise MergeError(f"adapter {name!r} is merged; unmerge_adapters(model) before deleting it")
        for container in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in container:
                del container[name]
        self.scaling.pop(name, None)
        self.r.pop(name, None)
        self._state_changed()

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._view_version != self._adapter_state.version:  # the model's adapter state changed
            self._refresh_view()
        run = self._run  # the active adapters, or none when disabled or merged
        if not run:
            if self._disabled and self._merged:  # disabled means the base, merged or not
                return self._unmerged_forward(x, *args, **kwargs)
            return self.base_layer(x, *args, **kwargs)
        if FUSED and not args and not kwargs and torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            weight = frozen_dense_weight(self.base_layer, x)
            if weight is not None and not any(n in self.lora_magnitude_vector for n in run):
                return self._fused_forward(x, weight)
        # The LoRA terms come first. Under non-reentrant gradient checkpointing the backward
        # recomputes a block only up to the last tensor autograd saved; computed after the frozen
        # base, they would force the recompute of the block's last (and largest) frozen GEMM too.
        terms = {n: self._lora_term(n, x) for n in run if n not in self.lora_magnitude_vector}
        result = self.base_layer(x, *args, **kwargs)
        for name in run:  # in order: DoRA renormalises what comes before it, as in peft
            if name in terms:  # a half-precision base output takes the float32 term with one rounding
                result = (result + terms[name]).to(result.dtype)
            else:
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                dropped = self.lora_dropout[name](x).to(lora_a.weight.dtype)
                lora_out = lora_b(lora_a(dropped)) * self.scaling[name]
                result = self._dora_forward(name, x, dropped, result, lora_out)
        return result

    def _fused_forward(self, x: torch.Tensor, weight: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Base and LoRA terms in one autograd node after each adapter's A (:class:`_FrozenLinearWithLora`)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        lora: list[torch.Tensor] = []
        for name in self.active_adapters:
            a = self.lora_A[name].weight
            lora += [self.lora_B[name].weight, F.linear(self.lora_dropout[name](flat), a)]
        scalings = tuple(self.scaling[n] for n in self.active_adapters)
        fast = self._adapter_state.fast_frozen_matmul
        out = _FrozenLinearWithLora.apply(weight, scalings, fast, self.base_layer.bias, flat, *lora)
        return out.view(*shape[:-1], out.shape[-1])

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling * B(A(dropout(x)))``, with ``scaling`` folded into the small (out, r) B weight
        rather than multiplied into the (tokens, out) product: one pass over the output less,
        forward and backward."""
        lora_a = self.lora_A[name]
        hidden = lora_a(self.lora_dropout[name](x).to(lora_a.weight.dtype))
        return F.linear(hidden, self.lora_B[name].weight * self.scaling[name])

    def _dora_forward(
        self, name: str, x: torch.Tensor, dropped: torch.Tensor, result: torch.Tensor, lora_out: torch.Tensor
    ) -> torch.Tensor:
        weight = self._dense_weight()
        delta = self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)
        norm = (weight + delta).norm(p=2, dim=1).detach()
        mag_scale = self.lora_magnitude_vector[name] / norm
        bias = self.base_layer.bias
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            base_no_bias = result if bias is None else result - bias
        else:
            base_no_bias = F.linear(dropped, weight.to(dropped.dtype))
        out = result + (mag_scale - 1) * base_no_bias + mag_scale * lora_out
        return out.to(result.dtype)

    # -- merging -------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` as an (out, in) float32 tensor."""
        b, a = self.lora_B[name].weight, self.lora_A[name].weight
        return (self.scaling[name] * (b.detach().float() @ a.detach().float())).to(torch.float32)

    def merged_dense_weight(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """The dense (out, in) float32 weight that ``names`` (default: active) fold into."""
        weight = self._dense_weight()
        for name in self.active_adapters if names is None else names:
            merged = weight + self.delta_weight(name)
            if name in self.lora_magnitude_vector:
                magnitude = self.lora_magnitude_vector[name].detach().float()
                merged = merged * (magnitude / merged.norm(p=2, dim=1))[:, None]
            weight = merged
        return weight

    def merge(self) -> None:
        """Fold the active adapters into the base weight, keeping the original for :meth:`unmerge`.
        The caller (``merge_adapters``) records them as merged in the state; the forward then skips them."""
        if self._holds_original() or not self.active_adapters:
            return
        merged = self.merged_dense_weight()
        if is_quantized_linear(self.base_layer):
            self._unmerged_base = self.base_layer
            self.base_layer = requantized_like(self.base_layer, merged)
        else:
            self._unmerged_base = None
            # A buffer (not saved): .to() and .cuda() move it with the layer.
            self.register_buffer("_original_weight", self.base_layer.weight.detach().clone(), persistent=False)
            self._write_dense_weight(merged)

    def _holds_original(self) -> bool:
        return self._unmerged_base is not None or "_original_weight" in self._buffers

    def _unmerged_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """What the base computed before :meth:`merge` (the forward of a disabled, merged layer)."""
        if self._unmerged_base is not None:
            return self._unmerged_base(x, *args, **kwargs)
        weight = self._original_weight
        return F.linear(x, weight.t() if self.fan_in_fan_out else weight, self.base_layer.bias)

    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (the original weight was kept)."""
        if not self._holds_original():
            return
        if self._unmerged_base is not None:
            release_quantized(self.base_layer)  # the requantized merge: freed now, not at the next gc
            self.base_layer = self._unmerged_base
            self._unmerged_base = None
        else:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._original_weight)
            del self._original_weight

    def to_plain_layer(self, dtype: torch.dtype, names: Sequence[str] | None = None) -> nn.Module:
        """A plain ``nn.Linear`` (or ``Conv1D``) with the adapters folded in, for merge_and_unload.

        A merged layer is unmerged first, so the fold starts from the exact original weight
        (folding on top of a requantized merge would add the delta twice and the rounding once).
        """
        self.unmerge()
        weight = self.merged_dense_weight(names)
        return plain_linear(weight, self.base_layer.bias, conv1d=was_conv1d(self.base_layer), dtype=dtype)

    # -- helpers -------------------------------------------------------------------------------
    def _base_device(self) -> torch.device:
        return self.base_layer.weight.device

    def _dense_weight(self) -> torch.Tensor:
        return dequantized_weight(self.base_layer, torch.float32)

    def _write_dense_weight(self, weight: torch.Tensor) -> None:
        target = self.base_layer.weight
        with torch.no_grad():
            target.copy_((weight.t() if self.fan_in_fan_out else weight).to(target.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={r}" for n, r in self.r.items())
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], active={list(self.active_adapters)}"


def release_quantized(layer: nn.Module) -> None:
    """Break the reference cycle bitsandbytes keeps between a 4-bit layer and its weight
    (``Params4bit.module``), so a discarded layer is freed at once instead of at the next garbage
    collection: otherwise replacing layers one by one keeps every old one alive until the end."""
    for param in layer.parameters(recurse=False):
        if getattr(param, "module", None) is not None:
            param.module = None


class _FrozenLinearWithLora(torch.autograd.Function):
    """``x W^T + b + sum_i s_i h_i B_i^T`` for a frozen ``W``, as one autograd node; ``h_i`` is
    adapter ``i``'s rank-``r`` hidden ``dropout_i(x) A_i^T``, computed before (by ``F.linear``).

    Against the frozen layer plus separate LoRA modules (what peft and the unfused path run) it
    saves, per layer and step, the (tokens, out) LoRA output and the pass that adds it (each term
    is accumulated into the base GEMM's output by ``addmm_``), the ``scaling * B`` copy and four
    autograd nodes. ``weight()`` gives the dense frozen weight in ``x``'s dtype; a 4-bit one is
    dequantized in the forward and again in the backward, never kept (as bitsandbytes does).
    With ``fast`` the two frozen GEMMs take :mod:`~hf_peft_plugin.matmul`'s bf16 mode on a CPU; the
    LoRA GEMMs never do.

    Nothing is handed to ``save_for_backward``: ``x`` is not needed (no weight gradient for the
    frozen base), ``B_i`` are parameters, and ``h_i`` (tokens x r, r/in of ``x``'s size) is kept on
    the context. So under non-reentrant gradient checkpointing, which recomputes a block only up
    to its last saved tensor, the recompute stops at the last layer's ``h`` and skips that layer's
    frozen GEMM, as the unfused path (LoRA terms first) does.
    """

    @staticmethod
    def forward(ctx, weight, scalings, fast, bias, x, *lora):
        w = weight()
        out = frozen_mm(x, w.t(), fast, None if bias is None else bias.to(x.dtype))
        for i, s in enumerate(scalings):
            b, h = lora[2 * i], lora[2 * i + 1]
            out.addmm_(h, b.t(), alpha=s)
        ctx.weight, ctx.scalings, ctx.fast, ctx.has_bias = weight, scalings, fast, bias is not None
        ctx.lora = [t.detach() for t in lora]
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_x = frozen_mm(grad, ctx.weight(), ctx.fast) if ctx.needs_input_grad[4] else None
        grads: list[torch.Tensor | None] = []
        for i, s in enumerate(ctx.scalings):
            b, h = ctx.lora[2 * i], ctx.lora[2 * i + 1]
            grad_b = torch.mm(grad.t(), h).mul_(s) if ctx.needs_input_grad[5 + 2 * i] else None
            grad_h = torch.mm(grad, b).mul_(s) if ctx.needs_input_grad[6 + 2 * i] else None
            grads += [grad_b, grad_h]
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return (None, None, None, grad_bias, grad_x, *grads)


def was_conv1d(layer: nn.Module) -> bool:
    """GPT-2's ``Conv1D``, or a bitsandbytes layer quantized from one (here or by transformers,
    which records ``source_cls``): its checkpoint stores the weight transposed."""
    source = getattr(layer, "source_cls", None)
    return (
        isinstance(layer, Conv1D)
        or getattr(layer, "hf_peft_plugin_was_conv1d", False)
        or (isinstance(source, type) and issubclass(source, Conv1D))
    )


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, *, conv1d: bool, dtype: torch.dtype) -> nn.Module:
    """A frozen ``nn.Linear`` (or ``Conv1D`` when ``conv1d``) holding the dense ``(out, in)`` ``weight``."""
    out_features, in_features = weight.shape
    device = weight.device
    with torch.device("meta"):  # no throw-away random init of a full-size weight
        if conv1d:
            layer = Conv1D(out_features, in_features)
        else:
            layer = nn.Linear(in_features, out_features, bias=bias is not None)
    layer.weight = nn.Parameter((weight.t().contiguous() if conv1d else weight).to(device, dtype), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(device, dtype), requires_grad=False)
    elif conv1d:
        layer.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
    return layer
