"""hf-peft-plugin: quantized parameter-efficient fine-tuning for the stock transformers Trainer."""

from typing import TYPE_CHECKING, Any

from .config import BottleneckConfig, LoraConfig, PromptTuningConfig, QuantizationConfig
from .errors import (
    AdapterLoadError,
    AdapterNameError,
    AlreadyPreparedError,
    ConfigError,
    HfPeftPluginError,
    HubPushError,
    MemoryBudgetError,
    MergeError,
    NotATransformersModelError,
    QuantizationUnavailableError,
    ShardingError,
    TargetModulesError,
)
from .loading import load_adapter
from .merging import merge_adapters, merge_and_unload, unmerge_adapters
from .saving import save_adapter
from .fsdp import shard_model, unshard_model
from .hub import push_adapter_to_hub
from .packing import padding_free_collator
from .trl_support import reference_model
from .inference import load_pretrained
from .memory import MemoryEstimate, MemoryPlan, estimate_memory, plan_for_memory
from .model import (
    active_adapters,
    add_adapter,
    combine_lora,
    delete_adapter,
    disable_adapters,
    prepare_model,
    print_trainable_parameters,
    set_active_adapters,
    trainable_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterCallback",
    "AdapterLoadError",
    "AdapterNameError",
    "AlreadyPreparedError",
    "BottleneckConfig",
    "ConfigError",
    "HfPeftPluginError",
    "HubPushError",
    "LoraConfig",
    "MemoryBudgetError",
    "MemoryEstimate",
    "MemoryPlan",
    "MergeError",
    "NotATransformersModelError",
    "PromptTuningConfig",
    "QuantizationConfig",
    "QuantizationUnavailableError",
    "ShardingError",
    "TargetModulesError",
    "active_adapters",
    "add_adapter",
    "combine_lora",
    "delete_adapter",
    "disable_adapters",
    "estimate_memory",
    "load_adapter",
    "load_pretrained",
    "merge_adapters",
    "merge_and_unload",
    "padding_free_collator",
    "plan_for_memory",
    "prepare_model",
    "print_trainable_parameters",
    "push_adapter_to_hub",
    "reference_model",
    "save_adapter",
    "set_active_adapters",
    "shard_model",
    "trainable_parameters",
    "unmerge_adapters",
    "unshard_model",
]

if TYPE_CHECKING:
    from .callback import AdapterCallback


def __getattr__(name: str) -> Any:
    # The callback needs transformers' Trainer modules, which import peft whenever it is installed
    # (3.4 s and ~200 MB here): loaded on first use, so the CLI and non-Trainer code skip them.
    if name == "AdapterCallback":
        from .callback import AdapterCallback

        return AdapterCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
