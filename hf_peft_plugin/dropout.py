"""LoRA dropout that costs a fraction of ``nn.Dropout`` on CPU, with the same distribution.

On CPU, torch draws every dropout mask element with its own call to the Mersenne Twister
(``bernoulli_``, about 10 ns per element here) and then keeps the mask as float32. LoRA drops the
input of every adapted layer, so on the quick start (SmolLM2, dropout 0.05, all-linear) the masks
took ~20 % of a training step, in peft as here (``torch.profiler``, benchmarks/README.md).

:func:`keep_mask` draws 64 random bits per call and spends 8 of them per element: an element is
dropped when its byte is below ``floor(256 p)`` and kept when above; only the ~1/256 of elements
whose byte ties with the threshold get 32 more bits, so the drop probability equals ``p`` to
within 2^-40 (``torch.rand``-based masks resolve 2^-24). The mask is kept as ``bool``, a quarter of
the float mask. The draws come from torch's default generator, so ``torch.manual_seed`` fixes them
and gradient checkpointing (which restores the RNG state before recomputing) replays them.

On other devices :class:`LoraDropout` is ``nn.Dropout``: CUDA's fused Philox kernel is already fast.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_TIE_BITS = 32


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A ``bool`` tensor of ``shape`` whose elements are ``False`` with probability ``p``."""
    n = math.prod(shape)
    padded = (n + 7) // 8 * 8  # whole 64-bit words, so ties can be found word by word
    random_bytes = torch.empty(padded // 8, dtype=torch.int64, device=device).random_(-(2**63), None).view(torch.uint8)
    level = p * 256
    threshold = int(level)
    # A full-size threshold: torch compares uint8 with a scalar through a slow path (~10x).
    thresholds = torch.full((padded,), threshold, dtype=torch.uint8, device=device)
    keep = random_bytes > thresholds
    ties = random_bytes == thresholds
    remainder = level - threshold
    if remainder == 0:  # p is a multiple of 1/256: a tie is already above p
        keep |= ties
    else:
        words = (ties.view(torch.int64) != 0).nonzero().squeeze(1)  # nonzero over n/8 words, not n bytes
        if words.numel():
            tied = (words[:, None] * 8 + torch.arange(8, device=device)).flatten()
            tied = tied[ties[tied]]
            low_bits = torch.empty(tied.numel(), dtype=torch.int64, device=device).random_(0, 2**_TIE_BITS)
            keep[tied] = low_bits >= int(remainder * 2**_TIE_BITS)
    return keep[:n].view(shape)


class _ScaleByMask(torch.autograd.Function):
    """``x * keep / (1 - p)``, saving only the bool mask for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * _as_scaled(keep, x.dtype, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return grad * _as_scaled(keep, grad.dtype, ctx.scale), None, None


def _as_scaled(keep: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    # Through uint8: bool -> float conversion takes ~6x longer on CPU.
    return keep.view(torch.uint8).to(dtype).mul_(scale)


class LoraDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training forward draws its mask with :func:`keep_mask`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not 0 < self.p < 1 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        return _ScaleByMask.apply(x, keep_mask(x.shape, self.p, x.device), 1.0 / (1.0 - self.p))
