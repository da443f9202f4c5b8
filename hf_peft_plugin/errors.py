"""Exception classes.

Every error a user can trigger with bad input is a ``ValueError`` or ``TypeError``
subclass whose message names the problem and the fix, so ``except ValueError``
keeps working for callers that do not care about the precise class.
"""

from __future__ import annotations


class HfPeftPluginError(Exception):
    """Base class of every error raised on purpose by hf_peft_plugin."""


class ConfigError(HfPeftPluginError, ValueError):
    """A configuration value is invalid (raised from the configs' ``__post_init__``)."""


class TargetModulesError(HfPeftPluginError, ValueError):
    """``target_modules`` (or another module selector) matched nothing usable."""


class NotATransformersModelError(HfPeftPluginError, TypeError):
    """``prepare_model`` was given a module that is not a transformers ``PreTrainedModel``."""


class AlreadyPreparedError(HfPeftPluginError, ValueError):
    """``prepare_model`` was called on a model that already carries adapters."""


class QuantizationUnavailableError(HfPeftPluginError, ImportError):
    """bitsandbytes is missing or cannot run on the model's device."""


class AdapterNameError(HfPeftPluginError, ValueError):
    """An adapter name is invalid, already taken, or unknown."""


class AdapterLoadError(HfPeftPluginError, ValueError):
    """A saved adapter cannot be loaded into this model; the model is left untouched."""


class MergeError(HfPeftPluginError, ValueError):
    """Adapters that cannot be folded into the base weights were asked to be merged."""


class HubPushError(HfPeftPluginError, RuntimeError):
    """Uploading an adapter to the Hub failed; local files are left intact."""


class MemoryBudgetError(HfPeftPluginError, ValueError):
    """No setting fits the requested memory budget, or the budget cannot be parsed."""

    def __init__(self, message: str, *, smallest_budget: int | None = None) -> None:
        super().__init__(message)
        #: Bytes the most frugal settings need, when the budget was parseable but too small.
        self.smallest_budget = smallest_budget


class ShardingError(HfPeftPluginError, ValueError):
    """A model cannot be sharded with FSDP as asked; the message names the setting to change."""
