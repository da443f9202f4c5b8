"""Faster float32 GEMMs for the frozen base on CPUs with bf16 dot-product units.

On CPUs with AVX512-BF16 or AMX-BF16, oneDNN can run a float32 GEMM with bf16 arithmetic inside
(torch's ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``): float32 in, float32 out,
float32 accumulation. On the AVX512-BF16 machine this package was measured on it was 2.0-2.3x
faster than the default float32 GEMM, with a relative error of ~1e-6, 2-3x float32's own
rounding (benchmarks/README.md, "frozen GEMMs in the CPU's bf16 mode"). The frozen base's GEMMs
are most of a LoRA step on a CPU, and a 4-bit base's weights carry quantization error orders of
magnitude larger, so this package runs those GEMMs that way in training: the base GEMMs of LoRA
layers on the fused path (:class:`~hf_peft_plugin.lora._FrozenLinearWithLora`, forward and input
gradient) and a frozen plain ``nn.Linear`` head in the chunked loss. LoRA's own GEMMs, the
optimizer, eval and ``no_grad`` forwards keep strict float32, so training and eval logits can
differ by that ~1e-6.

The GEMMs run in fixed row blocks (:data:`FAST_ROW_BLOCKS`), so that oneDNN's per-shape kernel
cache stays small under padding-free batches, whose token count changes every step.

The setting is torch-global, so it is set around each frozen GEMM and restored right after (a
lock and a depth count keep nested and concurrent uses from leaving it set): a user's own setting
is left as it was, though another thread's float32 CPU GEMMs run in the mode while one of these
is running. It is used only where
:func:`fast_frozen_matmul_status` finds bf16 units and a probe GEMM that the mode changes but
keeps within ``PROBE_TOLERANCE`` of strict float32 (an implementation that rounds the inputs to
plain bf16, ~4e-3, is refused). ``prepare_model(..., fast_frozen_matmul=False)`` turns it off and
leaves every GEMM to torch's own setting (strict float32 unless the user changed it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import ConfigError

#: The largest relative error (max |difference| / max |result|) the probe GEMM may show against
#: strict float32; measured ~1e-6 where the mode is used, ~4e-3 for inputs rounded to bf16.
PROBE_TOLERANCE = 1e-5
_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
logger = logging.getLogger(__name__)


def _cpu_has_bf16_units() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: not detected, so not used
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in _CPU_FLAGS)


_lock = threading.Lock()
_depth = 0
_saved = "none"


@contextlib.contextmanager
def _precision(mode: str) -> Iterator[None]:
    """``mode`` for the outermost of nested (or concurrent) uses, then the setting found before it."""
    global _depth, _saved
    settings = torch.backends.mkldnn.matmul
    with _lock:
        if _depth == 0:
            _saved = settings.fp32_precision
            settings.fp32_precision = mode
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                settings.fp32_precision = _saved


def _strict_and_fast(compute) -> tuple[torch.Tensor, torch.Tensor]:
    settings = torch.backends.mkldnn.matmul
    with _lock:  # the probe sets both values itself, outside any use of _precision
        previous = settings.fp32_precision
        try:
            settings.fp32_precision = "ieee"
            strict = compute()
            settings.fp32_precision = "bf16"
            fast = compute()
        finally:
            settings.fp32_precision = previous
    return strict, fast


def probe_error() -> float:
    """The worst max |bf16-mode GEMM - strict float32 GEMM| / max |strict| over probes in the
    layouts the frozen GEMMs use: ``x @ W^T`` with a bias (the forward), ``g @ W`` (the input
    gradient) and a long reduction (a wide head's gradient)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    x, w, bias, g, rows, wide = randn(256, 512), randn(384, 512), randn(384), randn(128, 384), randn(64, 8192), randn(8192, 256)
    probes = (lambda: torch.addmm(bias, x, w.t()), lambda: torch.mm(g, w), lambda: torch.mm(rows, wide))
    worst = 0.0
    for compute in probes:
        strict, fast = _strict_and_fast(compute)
        worst = max(worst, ((fast - strict).abs().max() / strict.abs().max()).item())
    return worst


@functools.cache
def fast_frozen_matmul_status() -> str | None:
    """``None`` when frozen GEMMs can run in the fast mode here, else why not (for the log and errors)."""
    if not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"):
        return f"torch {torch.__version__} has no torch.backends.mkldnn.matmul.fp32_precision (torch >= 2.9 has)"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not _cpu_has_bf16_units():
        return f"this CPU has none of {', '.join(_CPU_FLAGS)} (/proc/cpuinfo flags)"
    error = probe_error()
    if error == 0.0:
        return "oneDNN does not take the bf16 mode for float32 GEMMs here (no change in a probe GEMM)"
    if not error <= PROBE_TOLERANCE:
        return f"the bf16 mode's probe GEMM is off by {error:.1e} relative here (more than {PROBE_TOLERANCE:g})"
    return None


def resolve_fast_frozen_matmul(requested: bool | None) -> bool:
    """``prepare_model``'s ``fast_frozen_matmul``: ``None`` = where available, ``True`` = required."""
    if requested is not None and not isinstance(requested, bool):
        raise ConfigError(f"fast_frozen_matmul must be True, False or None (where available); got {requested!r}.")
    if requested is False:
        return False
    reason = fast_frozen_matmul_status()
    if reason is not None and requested:
        raise ConfigError(
            f"fast_frozen_matmul=True, but {reason}. Pass fast_frozen_matmul=None to use it only where it "
            "is available, or False for strict float32 GEMMs."
        )
    if reason is not None:
        logger.info("Frozen GEMMs stay strict float32: %s.", reason)
    return reason is None


#: Row counts the fast mode's GEMMs run in. oneDNN compiles and caches a kernel (~1 MiB measured)
#: for each GEMM shape it meets, up to 1,024 of them, and padding-free batches change the token
#: count every step: GEMMs of whatever rows came would grow the process by up to ~1 GiB. In
#: blocks of these row counts each frozen weight meets two shapes; 32-63 leftover rows run as a
#: zero-padded block, fewer run strict.
FAST_ROW_BLOCKS = (256, 64)


def frozen_mm(x: torch.Tensor, weight_t: torch.Tensor, fast: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight_t (+ bias)`` for a frozen ``weight_t``: in the fast mode, ``FAST_ROW_BLOCKS``
    rows at a time, when ``fast`` and this machine passes the probe; else one strict GEMM."""
    if not (fast and x.device.type == "cpu" and x.dtype == torch.float32 and fast_frozen_matmul_status() is None):
        return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)
    rows, last = x.shape[0], FAST_ROW_BLOCKS[-1]
    out = torch.empty(rows, weight_t.shape[1], dtype=x.dtype, device=x.device)
    done = 0
    with _precision("bf16"):
        for block in FAST_ROW_BLOCKS:
            while rows - done >= block:
                torch.mm(x[done : done + block], weight_t, out=out[done : done + block])
                done += block
        left = rows - done
        if 2 * left >= last:  # a zero-padded block in the mode costs less than these rows strict
            padded = x.new_zeros(last, x.shape[1])
            padded[:left] = x[done:]
            out[done:] = torch.mm(padded, weight_t)[:left]
            done = rows
    if done < rows:
        torch.mm(x[done:], weight_t, out=out[done:])
    if bias is not None:
        out += bias
    return out


def frozen_matmul(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The context for a GEMM with a frozen weight: the fast mode on a CPU tensor when ``enabled``
    and this machine passes the probe (checked again here, cached: a model copied to another host
    does not carry the first host's answer)."""
    if enabled and device.type == "cpu" and fast_frozen_matmul_status() is None:
        return _precision("bf16")
    return contextlib.nullcontext()
