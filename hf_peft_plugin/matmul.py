"""Faster float32 GEMMs for the frozen base on CPUs with bf16 dot-product units.

On CPUs with AVX512-BF16 or AMX-BF16, oneDNN can run a float32 GEMM with bf16 arithmetic inside
(torch's ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``): float32 in, float32 out,
float32 accumulation. On the AVX512-BF16 machine this package was measured on it was 2.2-2.5x
faster than the default float32 GEMM, with a relative error of ~1e-6, 2-3x float32's own
rounding (benchmarks/README.md). The frozen base's GEMMs are most of a LoRA step on a CPU, and a
4-bit base's weights carry quantization error orders of magnitude larger, so this package runs
those GEMMs (the frozen weight of every LoRA layer, forward and input gradient, and a frozen
``lm_head`` in the chunked loss) that way; the trainable LoRA GEMMs, the optimizer and everything
else keep strict float32.

The setting is torch-global, so it is set around each frozen GEMM and restored right after: a
user's own setting, and their other code, are left as they were. It is used only where
:func:`fast_frozen_matmul_status` finds bf16 units and a probe GEMM that the mode changes but
keeps within ``PROBE_TOLERANCE`` of strict float32 (an implementation that rounds the inputs to
plain bf16, ~4e-3, is refused). ``prepare_model(..., fast_frozen_matmul=False)`` turns it off and
leaves every GEMM to torch's own setting (strict float32 unless the user changed it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
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


@contextlib.contextmanager
def _precision(mode: str) -> Iterator[None]:
    settings = torch.backends.mkldnn.matmul
    previous = settings.fp32_precision
    settings.fp32_precision = mode
    try:
        yield
    finally:
        settings.fp32_precision = previous


def probe_error() -> float:
    """max |bf16-mode GEMM - strict float32 GEMM| / max |strict| on a fixed 256 x 512 x 256 probe."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=generator)
    b = torch.randn(512, 256, generator=generator)
    with _precision("ieee"):
        strict = a @ b
    with _precision("bf16"):
        fast = a @ b
    return ((fast - strict).abs().max() / strict.abs().max()).item()


@functools.cache
def fast_frozen_matmul_status() -> str | None:
    """``None`` when frozen GEMMs can run in the fast mode here, else why not (for the log and errors)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not _cpu_has_bf16_units():
        return f"this CPU has none of {', '.join(_CPU_FLAGS)} (lscpu flags)"
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


def frozen_matmul(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The context for a GEMM with a frozen weight: the fast mode on a CPU tensor when ``enabled``."""
    if enabled and device.type == "cpu":
        return _precision("bf16")
    return contextlib.nullcontext()
