"""Chunked linear cross-entropy: a causal LM's training loss without the (tokens x vocab) logits.

A causal LM's forward projects every position through ``lm_head`` and only then takes the loss:
with Llama-3's 128,256-entry vocabulary the float32 logits of 4,096 tokens are 2 GiB, and their
softmax and gradient as much again. Most of that work is also wasted, since the loss only reads
the positions whose label is not ``-100`` (16 % of the quick start's tokens).

So, when a prepared causal LM is in training mode and gets ``labels``, its forward (the class
swap of :mod:`.adapter_class` puts :func:`chunked_forward` in front of the model's own) runs the
model unchanged except that ``lm_head`` sees zero positions, keeps the last hidden states, and
computes the loss here: only the labelled positions, ``chunk_size`` at a time, each chunk's
logits built, reduced and freed before the next. :class:`_ChunkedLinearCrossEntropy` computes
each chunk's gradients (w.r.t. the hidden states and every trainable parameter of the head: a
LoRA on ``lm_head``, a trained copy of it, tied embeddings) in the forward, as Liger-Kernel does:
three GEMMs per chunk instead of the four that recomputing the logits in the backward costs, for
the same memory (it keeps the hidden states' gradient where recomputing would keep the hidden
states). The output's ``logits`` is ``None``.

The numerics are transformers' ``ForCausalLMLoss``: logits upcast to float32, labels shifted by
one (or ``shift_labels`` as given), ``ignore_index``, mean over the labelled tokens or a sum
divided by ``num_items_in_batch`` (which the Trainer passes for exact gradient accumulation).
Final-logit scaling (Cohere's ``logit_scale``, Granite's ``logits_scaling``) and softcapping
(Gemma-2/3's ``final_logit_softcapping``) are applied per chunk. Models this cannot reproduce
exactly (another loss function, an unknown logit transform, ``logits_to_keep``, tuple outputs)
take their own forward, with one log line.

Logits are still returned whenever they can be wanted: in eval mode (``Trainer.evaluate`` /
``predict``), without labels, or with ``chunked_loss=False`` given to ``prepare_model``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .matmul import frozen_matmul
from .state import adapter_state

logger = logging.getLogger(__name__)

#: Attribute of a prepared model holding its :class:`ChunkedLossConfig`.
LOSS_ATTRIBUTE = "_hf_peft_plugin_chunked_loss"
#: Float32 logits one chunk may hold by default (32 MiB): 64 tokens of a 128k vocabulary. A chunk costs
#: its logits about three times over (logits, their gradient, the softmax); measured on SmolLM2's
#: head (benchmarks/README.md), 128-token chunks step as fast as 512-token ones at a quarter the memory.
DEFAULT_LOGITS_PER_CHUNK = 2**23
IGNORE_INDEX = -100

# Final-logit transforms of the models that have one, by model_type: (scale attribute, how to read it).
_SCALED = {
    "cohere": ("logit_scale", lambda v: float(v)),
    "cohere2": ("logit_scale", lambda v: float(v)),
    "granite": ("logits_scaling", lambda v: 1.0 / float(v)),
    "granitemoe": ("logits_scaling", lambda v: 1.0 / float(v)),
    "granitemoeshared": ("logits_scaling", lambda v: 1.0 / float(v)),
    "granitemoehybrid": ("logits_scaling", lambda v: 1.0 / float(v)),
}
_SOFTCAPPED = ("gemma2", "gemma3", "gemma3_text")
_TRANSFORM_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


@dataclass(frozen=True)
class ChunkedLossConfig:
    """``enabled``: compute a causal LM's training loss in chunks; ``chunk_size``: tokens per chunk
    (``None``: as many as keep one chunk's float32 logits at 32 MiB)."""

    enabled: bool = True
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"chunked_loss must be True or False; got {self.enabled!r}.")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0
        ):
            raise ConfigError(
                f"loss_chunk_size must be a positive number of tokens (or None for the default); got {self.chunk_size!r}."
            )

    def tokens_per_chunk(self, vocab_size: int) -> int:
        return self.chunk_size or default_chunk_size(vocab_size)


def default_chunk_size(vocab_size: int) -> int:
    """A power of two between 64 and 4,096 tokens whose float32 logits fit in 32 MiB."""
    tokens = DEFAULT_LOGITS_PER_CHUNK // max(int(vocab_size), 1)
    return int(min(4096, max(64, 2 ** int(math.log2(max(tokens, 1))))))


def configure_chunked_loss(model: nn.Module, config: ChunkedLossConfig) -> None:
    setattr(model, LOSS_ATTRIBUTE, config)


# -- the loss ------------------------------------------------------------------------------------


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum over rows of CE(transform(head(hidden[i])), targets[i]) / divisor``, chunk by chunk.

    ``params`` are the head's trainable parameters: passed as inputs so that autograd hands them
    the gradients this function computes in its forward."""

    @staticmethod
    def forward(ctx, hidden, targets, divisor, head, chunk, scale, softcap, grad_enabled, fast, *params):
        need_hidden = grad_enabled and hidden.requires_grad
        trainable = [p for p in params if grad_enabled and p.requires_grad]
        want_grads = need_hidden or bool(trainable)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in trainable]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # A frozen plain head's GEMMs (the logits and the hidden states' gradient) may take the fast
        # mode; a LoRA-wrapped head (LoRA on lm_head) runs its own base GEMM that way, and its LoRA
        # GEMMs strict, whether it trains or not.
        # Full chunks only: one GEMM shape, so oneDNN compiles one kernel (see matmul.FAST_ROW_BLOCKS).
        frozen_head = fast and type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())
        for start in range(0, hidden.shape[0], chunk):
            count = min(chunk, hidden.shape[0] - start)
            # The last chunk, if at least half full, is padded to a full one (rows labelled -100).
            fast_head = frozen_head and 2 * count >= chunk
            with torch.enable_grad(), frozen_matmul(fast_head, hidden.device):
                rows = hidden[start : start + chunk].detach().requires_grad_(need_hidden)
                inputs, labels = rows, targets[start : start + chunk]
                if fast_head and count < chunk:
                    inputs, labels = F.pad(rows, (0, 0, 0, chunk - count)), F.pad(labels, (0, chunk - count), value=IGNORE_INDEX)
                # One expression: the logits are freed once log_softmax has its output (what its backward reads).
                loss = F.cross_entropy(
                    _transformed(head(inputs).float(), scale, softcap), labels, reduction="sum", ignore_index=IGNORE_INDEX
                )
            if want_grads:
                inputs = ([rows] if need_hidden else []) + trainable
                with frozen_matmul(fast_head, hidden.device):
                    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                if need_hidden:
                    grad_hidden[start : start + chunk] = grads[0]
                    grads = grads[1:]
                for acc, grad in zip(grad_params, grads):
                    if grad is not None:
                        acc += grad
            total += loss.detach()
            del loss
        ctx.need_hidden = need_hidden
        ctx.trainable = [grad_enabled and p.requires_grad for p in params]
        ctx.dtypes = [p.dtype for p in trainable]
        ctx.save_for_backward(divisor, *([grad_hidden] if need_hidden else []), *grad_params)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_output):
        divisor, *saved = ctx.saved_tensors
        factor = grad_output / divisor
        grad_hidden = None
        if ctx.need_hidden:
            grad_hidden, *saved = saved
            grad_hidden = grad_hidden * factor.to(grad_hidden.dtype)
        grads = iter(g * factor for g in saved)
        dtypes = iter(ctx.dtypes)
        param_grads = [next(grads).to(next(dtypes)) if trainable else None for trainable in ctx.trainable]
        return (grad_hidden, None, None, None, None, None, None, None, None, *param_grads)


def _transformed(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor | None,
    *,
    params: list[nn.Parameter] | tuple = (),
    num_items_in_batch: torch.Tensor | int | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int = 1024,
    scale: float = 1.0,
    softcap: float | None = None,
    fast_frozen_matmul: bool = False,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss(transform(head(hidden)), labels, ...)`` without the full logits.

    ``hidden`` is ``(batch, seq, hidden)``, ``labels`` ``(batch, seq)`` (shifted here, as
    transformers does) or ``shift_labels`` already aligned with ``hidden``. Only positions whose
    target is not ``ignore_index`` reach ``head``. ``params``: the head's parameters (those that
    require grad get gradients). ``fast_frozen_matmul``: a frozen head's GEMMs take
    :mod:`~hf_peft_plugin.matmul`'s bf16 mode on a CPU."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if targets.shape[0] != flat.shape[0]:
        raise ConfigError(
            f"labels cover {targets.shape[0]} positions but the hidden states {flat.shape[0]}; pass labels of the "
            "same shape as input_ids."
        )
    keep = (targets != ignore_index).nonzero().squeeze(-1)
    if num_items_in_batch is None:  # the mean over labelled tokens (0/0 = nan, as in transformers)
        divisor = torch.tensor(float(keep.numel()), device=hidden.device)
    elif torch.is_tensor(num_items_in_batch):
        divisor = num_items_in_batch.to(device=hidden.device, dtype=torch.float32)
    else:
        divisor = torch.tensor(float(num_items_in_batch), device=hidden.device)
    return _ChunkedLinearCrossEntropy.apply(
        flat.index_select(0, keep),
        targets.index_select(0, keep),
        divisor,
        head,
        chunk_size,
        scale,
        softcap,
        torch.is_grad_enabled(),
        fast_frozen_matmul,
        *params,
    )


# -- the forward ---------------------------------------------------------------------------------

_logged: set[str] = set()


def _log_once(model: nn.Module, reason: str) -> None:
    key = f"{type(model).__name__}:{reason}"
    if key not in _logged:
        _logged.add(key)
        logger.info("hf_peft_plugin: standard (full-logits) loss for %s: %s.", type(model).__name__, reason)


def logit_transform(model: nn.Module) -> tuple[float, float | None] | str:
    """``(scale, softcap)`` the model applies to its final logits, or why it cannot be reproduced."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    scale, softcap = 1.0, None
    handled: set[str] = set()
    if model_type in _SCALED:
        attribute, read = _SCALED[model_type]
        value = getattr(model, attribute, None) if attribute == "logit_scale" else None
        value = getattr(config, attribute, None) if value is None else value
        if value is not None:
            scale = read(value)
        handled.add(attribute)
    if model_type in _SOFTCAPPED:
        softcap = getattr(config, "final_logit_softcapping", None)
        handled.add("final_logit_softcapping")
    unknown = [a for a in _TRANSFORM_ATTRIBUTES if a not in handled and getattr(config, a, None) is not None]
    if unknown:
        return f"{model_type} sets {unknown[0]}={getattr(config, unknown[0])!r}, a logit transform the chunked loss does not know"
    return scale, softcap


def _unsupported(model: nn.Module, kwargs: dict[str, Any]) -> str | None:
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    if kwargs.get("return_dict") is False:
        return "return_dict=False"
    if kwargs.get("logits_to_keep") not in (None, 0):
        return "logits_to_keep is set"
    if "_loss_function" in vars(model) or LOSS_MAPPING.get(getattr(model, "loss_type", None) or "ForCausalLM") is not ForCausalLMLoss:
        return "the model uses its own loss function"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        return "it has no output embedding (lm_head) module"
    transform = logit_transform(model)
    return transform if isinstance(transform, str) else None


def wants_chunked_loss(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    from .state import adapter_state

    config = getattr(model, LOSS_ATTRIBUTE, None)
    if config is not None and not config.enabled:
        return False
    state = adapter_state(model)
    if not model.training or kwargs.get("labels") is None or state is None or state.task_type != "CAUSAL_LM":
        return False
    reason = _unsupported(model, kwargs)
    if reason is not None:
        _log_once(model, reason)
        return False
    return True


def takes_labels(cls: type) -> bool:
    try:
        return "labels" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def chunked_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    """The prepared causal LM's ``forward``: ``original`` as is, unless :func:`wants_chunked_loss`.

    ``functools.wraps`` keeps ``original``'s signature visible to the Trainer (which drops dataset
    columns the forward does not name and passes ``num_items_in_batch`` to a ``**kwargs``)."""
    names = [n for n in inspect.signature(original).parameters][1:]

    @functools.wraps(original)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs = {**dict(zip(names, args)), **kwargs}
            args = ()
        if not wants_chunked_loss(self, kwargs):
            return original(self, **kwargs)
        return _forward_with_chunked_loss(self, original, kwargs)

    return forward


def _forward_with_chunked_loss(model: nn.Module, original: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    head = model.get_output_embeddings()
    captured: list[torch.Tensor] = []

    def no_positions(module: nn.Module, inputs: tuple) -> tuple:
        captured.append(inputs[0])
        return (inputs[0].narrow(-2, 0, 0), *inputs[1:])

    handle = head.register_forward_pre_hook(no_positions)
    try:
        output = original(model, **kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ConfigError(
            f"{type(model).__name__} called its lm_head {len(captured)} times in one forward; the chunked loss "
            "expects one call. Pass chunked_loss=False to prepare_model."
        )
    scale, softcap = logit_transform(model)
    config = getattr(model, LOSS_ATTRIBUTE, None) or ChunkedLossConfig()
    loss = chunked_cross_entropy(
        captured[0],
        head,
        labels,
        params=list(head.parameters()),
        num_items_in_batch=num_items,
        shift_labels=shift_labels,
        ignore_index=ignore_index,
        chunk_size=config.tokens_per_chunk(model.config.get_text_config().vocab_size),
        scale=scale,
        softcap=softcap,
        fast_frozen_matmul=getattr(adapter_state(model), "fast_frozen_matmul", False),
    )
    fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
    return type(output)(loss=loss, **fields)
