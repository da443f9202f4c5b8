"""hf-peft-plugin: quantized parameter-efficient fine-tuning for the stock transformers Trainer."""

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
    QuantizationUnavailableError,
    TargetModulesError,
)
from .model import (
    active_adapters,
    add_adapter,
    delete_adapter,
    disable_adapters,
    prepare_model,
    print_trainable_parameters,
    set_active_adapters,
    trainable_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "AdapterNameError",
    "AlreadyPreparedError",
    "BottleneckConfig",
    "ConfigError",
    "HfPeftPluginError",
    "HubPushError",
    "LoraConfig",
    "MemoryBudgetError",
    "MergeError",
    "PromptTuningConfig",
    "QuantizationConfig",
    "QuantizationUnavailableError",
    "TargetModulesError",
    "active_adapters",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "prepare_model",
    "print_trainable_parameters",
    "set_active_adapters",
    "trainable_parameters",
]
