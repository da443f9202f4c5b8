"""Dataclass configs. Validation lives in ``__post_init__`` so a bad value fails where it is written."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from .errors import ConfigError

LoraInit = Literal["default", "gaussian", "pissa"]
QuantType = Literal["nf4", "fp4"]

#: Modules that stay in full precision unless the user asks otherwise.
#: Output heads and embeddings are small next to the blocks and quantizing them costs quality;
#: classification heads are freshly initialised and trained, so they cannot be quantized at all.
DEFAULT_KEEP_FULL_PRECISION: tuple[str, ...] = (
    "lm_head",
    "embed_out",
    "score",
    "classifier",
    "qa_outputs",
)


def _as_selector(value: str | Sequence[str] | None, what: str) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        if isinstance(value, str):
            _check_regex(value, what)
        return value
    items = tuple(value)
    if not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{what} must be a string, a regex or a list of non-empty module names; got {value!r}.")
    return items


def _check_regex(pattern: str, what: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{what}={pattern!r} is not a valid regular expression: {exc}.") from exc


@dataclass
class LoraConfig:
    """Low-rank adaptation: ``W x + (alpha / r) * B A x`` with ``A`` (r x in) and ``B`` (out x r).

    ``target_modules``: ``"all-linear"`` (every linear layer of the blocks, never the output head),
    a list of module-name suffixes (``["q_proj", "v_proj"]``), or any other string, taken as a
    regex that must match the full module path. ``rank_pattern`` / ``alpha_pattern`` map a
    regex (matched against the end of the module path) to a per-module rank / alpha.
    ``use_rslora`` scales by ``alpha / sqrt(r)``; ``use_dora`` adds DoRA's magnitude vector.
    ``init="default"`` (Kaiming-uniform A, zero B) makes the adapted model equal the base at init.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | Sequence[str] = "all-linear"
    exclude_modules: str | Sequence[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init: LoraInit = "default"
    #: Whole modules trained and saved next to the LoRA weights (peft's ``modules_to_save``);
    #: ``None`` = the task's head (``score``/``classifier``) for classification models.
    modules_to_save: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"LoraConfig.r must be a positive integer (e.g. 8 or 16); got {self.r!r}.")
        if not _positive_finite(self.alpha):
            raise ConfigError(f"LoraConfig.alpha must be a positive number (commonly 2*r); got {self.alpha!r}.")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout must be in [0, 1); got {self.dropout!r}.")
        if self.init not in ("default", "gaussian", "pissa"):
            raise ConfigError(f"LoraConfig.init must be 'default', 'gaussian' or 'pissa'; got {self.init!r}.")
        if not self.target_modules:
            raise ConfigError("LoraConfig.target_modules is empty; use 'all-linear' or name the modules to adapt.")
        self.target_modules = _as_selector(self.target_modules, "LoraConfig.target_modules")
        self.exclude_modules = _as_selector(self.exclude_modules, "LoraConfig.exclude_modules")
        for what in ("rank_pattern", "alpha_pattern"):
            if not isinstance(getattr(self, what), dict):
                raise ConfigError(
                    f"LoraConfig.{what} must be a dict from module-name regex to value, e.g. {{'q_proj': 16}}; "
                    f"got {getattr(self, what)!r}."
                )
        for pattern, rank in self.rank_pattern.items():
            _check_regex(pattern, "LoraConfig.rank_pattern key")
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"LoraConfig.rank_pattern[{pattern!r}] must be a positive integer; got {rank!r}.")
        for pattern, alpha in self.alpha_pattern.items():
            _check_regex(pattern, "LoraConfig.alpha_pattern key")
            if not _positive_finite(alpha):
                raise ConfigError(
                    f"LoraConfig.alpha_pattern[{pattern!r}] must be a positive finite number (like alpha); got {alpha!r}."
                )
        if self.modules_to_save is not None:
            self.modules_to_save = tuple(self.modules_to_save)

    def rank_for(self, module_path: str) -> int:
        return _pattern_value(self.rank_pattern, module_path, self.r)

    def alpha_for(self, module_path: str) -> float:
        return _pattern_value(self.alpha_pattern, module_path, self.alpha)

    def scaling_for(self, module_path: str) -> float:
        r, alpha = self.rank_for(module_path), self.alpha_for(module_path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _positive_finite(value: Any) -> bool:
    """A positive, finite int or float (not a bool): what an alpha can be, in the config or a pattern."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """peft semantics: a key matches when it matches the end of the module path at a dot boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


@dataclass
class QuantizationConfig:
    """How the frozen backbone is stored. ``bits=None`` keeps it in its own dtype (plain LoRA)."""

    bits: int | None = 4
    quant_type: QuantType = "nf4"
    double_quant: bool = True
    #: dtype of the matmuls. ``None``: bfloat16 where the device runs it natively, float32 on a
    #: CPU without native bf16 (bf16 matmuls there are about ten times slower).
    compute_dtype: torch.dtype | None = None
    #: dtype the packed 4-bit weights are stored in; ``torch.bfloat16`` lets FSDP shard them.
    quant_storage: torch.dtype = torch.uint8
    #: Module names (suffix match) never quantized, on top of :data:`DEFAULT_KEEP_FULL_PRECISION`.
    keep_full_precision: Sequence[str] = ()
    #: LLM.int8() outlier threshold for 8-bit; 0 disables the mixed-precision decomposition.
    int8_threshold: float = 6.0

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, None) or isinstance(self.bits, bool):
            raise ConfigError(
                f"bits must be 4 (NF4/FP4 via bitsandbytes), 8 (LLM.int8) or None (no quantization); got {self.bits!r}."
            )
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quant_type must be 'nf4' or 'fp4'; got {self.quant_type!r}.")
        if self.compute_dtype is not None and not isinstance(self.compute_dtype, torch.dtype):
            raise ConfigError(f"compute_dtype must be a torch.dtype such as torch.bfloat16; got {self.compute_dtype!r}.")
        if isinstance(self.keep_full_precision, str):
            self.keep_full_precision = (self.keep_full_precision,)
        self.keep_full_precision = tuple(self.keep_full_precision)

    @property
    def skip_modules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(DEFAULT_KEEP_FULL_PRECISION + tuple(self.keep_full_precision)))


@dataclass
class PromptTuningConfig:
    """Soft prompt: ``num_virtual_tokens`` learned embeddings prepended to the input embeddings.

    ``init``: ``"random"`` (normal, std of the embedding matrix), ``"vocab"`` (rows sampled from the
    embedding matrix) or ``"text"`` (the embeddings of ``init_text`` tokenised with ``tokenizer``,
    repeated or truncated to ``num_virtual_tokens``).
    """

    num_virtual_tokens: int = 20
    init: Literal["random", "vocab", "text"] = "random"
    init_text: str | None = None
    tokenizer: Any = field(default=None, repr=False, compare=False)
    #: Recorded in the artifact so peft and the Hub card can rebuild the text init.
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        n = self.num_virtual_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ConfigError(f"PromptTuningConfig.num_virtual_tokens must be a positive integer; got {n!r}.")
        if self.init not in ("random", "vocab", "text"):
            raise ConfigError(f"PromptTuningConfig.init must be 'random', 'vocab' or 'text'; got {self.init!r}.")
        if self.init == "text":
            if self.tokenizer is None:
                raise ConfigError("PromptTuningConfig(init='text') needs tokenizer=<the model's tokenizer>.")
            if not self.init_text or not self.init_text.strip():
                raise ConfigError("PromptTuningConfig(init='text') needs a non-empty init_text.")
            if self.tokenizer_name_or_path is None:
                self.tokenizer_name_or_path = getattr(self.tokenizer, "name_or_path", None)


@dataclass
class BottleneckConfig:
    """Bottleneck adapter: ``h + up(act(down(h)))`` after sub-layers of each block.

    Width is ``bottleneck_size`` if given, else ``hidden_size // reduction_factor``.
    ``placement="houlsby"``: after attention and after the feed-forward; ``"pfeiffer"``: after the
    feed-forward only. ``layers``: block indices to adapt (``None`` = all).
    """

    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    layers: Sequence[int] | None = None

    def __post_init__(self) -> None:
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, int) or rf <= 0:
            raise ConfigError(f"BottleneckConfig.reduction_factor must be a positive integer; got {rf!r}.")
        if self.bottleneck_size is not None and (
            isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size <= 0
        ):
            raise ConfigError(f"BottleneckConfig.bottleneck_size must be a positive integer; got {self.bottleneck_size!r}.")
        if self.non_linearity not in ("relu", "gelu", "silu", "tanh"):
            raise ConfigError(
                f"BottleneckConfig.non_linearity must be one of relu, gelu, silu, tanh; got {self.non_linearity!r}."
            )
        if self.placement not in ("houlsby", "pfeiffer"):
            raise ConfigError(f"BottleneckConfig.placement must be 'houlsby' or 'pfeiffer'; got {self.placement!r}.")
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)

    def width_for(self, hidden_size: int) -> int:
        width = self.bottleneck_size or hidden_size // self.reduction_factor
        if width <= 0:
            raise ConfigError(
                f"BottleneckConfig gives a zero-width bottleneck: hidden_size {hidden_size} // reduction_factor "
                f"{self.reduction_factor} = 0. Use a reduction_factor <= {hidden_size} or set bottleneck_size."
            )
        return width
