"""Prompt tuning: learned "virtual token" embeddings prepended to every input.

The soft prompt is spliced in by hooks on the unchanged transformers model, so ``forward`` keeps
its signature (the Trainer reads it to drop unused columns), module paths stay the same and
``generate`` works as is:

* a forward pre-hook on the top-level model prepends ``N`` placeholder ids to ``input_ids`` (or
  the prompt itself to ``inputs_embeds``) and extends ``attention_mask``, ``token_type_ids``,
  ``position_ids`` and token-level ``labels`` to match;
* a one-shot forward hook on the input embedding layer swaps the placeholders' embeddings for
  the prompt. Passing placeholder *ids* rather than ``inputs_embeds`` keeps everything a model
  derives from ``input_ids`` consistent with the longer sequence: a causal-LM sequence classifier
  pools at the last non-pad id, which now counts the prefix.

With a KV cache the prompt is prepended only while the cache is empty; later steps find the ``N``
virtual tokens in the cache, so only the mask and positions are shifted. A cache remembers how
many virtual tokens it holds; reusing it under another prompt, feeding it inputs that do not
continue it (``generate`` resuming from a returned cache), or a static cache (sized without the
prompt) raise instead of silently attending to the wrong positions. So does an input that, with
the prompt, needs more than ``max_position_embeddings`` positions.

The sequence the model sees is ``[virtual tokens][user tokens]``, exactly as in peft: outputs
(logits, hidden states) include the ``N`` virtual positions first, and BERT's pooler reads
position 0, the first virtual token. Unlike peft, a causal LM's first user token stays unscored
(as without a prompt), which keeps the Trainer's token count for loss normalisation exact.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import PromptTuningConfig
from .errors import AdapterNameError, ConfigError
from .packing import first_of_each_example, is_packed, packed_prompt_layout, sequence_starts, splice_prompt, spread
from .state import AdapterState, ReadsAdapterState

PROMPT_MODULE = "prompt_encoder"
#: Tasks whose inputs the soft prompt can be prepended to (token-level labels are padded).
PROMPT_TASKS = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "FEATURE_EXTRACTION")
#: Attribute set on a KV cache: how many virtual tokens its first positions hold.
_CACHE_TAG = "_hf_peft_plugin_virtual_tokens"


class SoftPrompt(ReadsAdapterState, nn.Module):
    """Named soft prompts (``embeddings[name]``: ``(num_virtual_tokens, hidden_size)`` float32).

    Registered on the model as ``model.prompt_encoder``; at most one prompt is active at a time.
    """

    def __init__(self, task_type: str, placeholder_id: int, max_positions: int | None) -> None:
        super().__init__()
        self.embeddings = nn.ParameterDict()
        self.task_type = task_type
        self.placeholder_id = placeholder_id
        self.max_positions = max_positions
        # Set by the model's pre-hook for the length of one forward: the prompt waiting for the
        # embedding layer, and the one-shot hook that splices it in.
        self._pending: torch.Tensor | None = None
        self._splice: RemovableHandle | None = None
        self._slots: torch.Tensor | None = None  # padding-free batches: where each example's prompt goes
        self._prefilled = 0

    # -- AdapterLayer protocol -----------------------------------------------------------------
    def add_adapter(self, name: str, weight: torch.Tensor) -> None:
        if name in self.embeddings:
            raise AdapterNameError(f"soft prompt {name!r} already exists")
        self.embeddings[name] = nn.Parameter(weight.detach().to(torch.float32).clone())
        self._state_changed()

    def adapter_names(self) -> list[str]:
        return list(self.embeddings.keys())

    def delete_adapter(self, name: str) -> None:
        if name in self.embeddings:
            del self.embeddings[name]
        self._state_changed()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [self.embeddings[name]]

    def active_prompt(self) -> torch.Tensor | None:
        if self.adapters_disabled or not self.active_adapters:
            return None
        return self.embeddings[self.active_adapters[0]]

    # -- hooks ---------------------------------------------------------------------------------
    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
        prompt = self.active_prompt()
        n = 0 if prompt is None else prompt.shape[0]
        cache = _cache_of(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        if cached and getattr(cache, _CACHE_TAG, 0) != n:
            raise ConfigError(
                f"This KV cache holds {getattr(cache, _CACHE_TAG, 0)} soft-prompt positions but the model now "
                f"prepends {n}: a cache can only be continued under the soft prompt it was built with. "
                "Start from an empty cache, or switch back to the adapters the cache was built with."
            )
        if n == 0:
            return None
        if getattr(cache, "is_compileable", False):
            raise ConfigError(
                f"A soft prompt cannot use a {type(cache).__name__}: it is sized for the input without the "
                f"{n} virtual tokens and masked in 4D. Generate with the default dynamic cache."
            )
        if args:  # positional inputs, e.g. model(input_ids): name them so they can be extended
            names = list(inspect.signature(model.forward).parameters)
            kwargs = {**dict(zip(names, args)), **kwargs}
        kwargs = dict(kwargs)
        self._check_length(model, kwargs, cached, n)
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            raise ConfigError(
                "A soft prompt needs a 2D attention_mask (batch, sequence) to extend; got "
                f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}."
            )
        positions = kwargs.get("position_ids")
        if positions is not None and positions.dim() != 2:
            raise ConfigError(f"A soft prompt needs 2D position_ids (batch, sequence); got {tuple(positions.shape)}.")
        if cached:
            _check_continues(kwargs, cached - n, n)
            _extend(kwargs, "attention_mask", n, 1)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + n
        else:
            self._prepend(model, kwargs, prompt)
        return (), kwargs

    def _prepend(self, model: nn.Module, kwargs: dict[str, Any], prompt: torch.Tensor) -> None:
        n = prompt.shape[0]
        if kwargs.get("attention_mask") is None and is_packed(kwargs.get("position_ids")):
            return self._prepend_per_example(model, kwargs, prompt)
        if kwargs.get("input_ids") is not None:
            kwargs["input_ids"] = _prefixed(kwargs["input_ids"], n, self.placeholder_id)
            self._pending = prompt
            self._splice = model.get_input_embeddings().register_forward_hook(self._splice_prompt)
        else:
            embeds = kwargs["inputs_embeds"]
            rows = prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            kwargs["inputs_embeds"] = torch.cat([rows, embeds], dim=1)
        _extend(kwargs, "attention_mask", n, 1)
        _extend(kwargs, "token_type_ids", n, 0)
        positions = kwargs.get("position_ids")
        if positions is not None:
            prefix = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([prefix, positions + n], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and self.task_type == "CAUSAL_LM":
            # The first user token stays unscored, as without a prompt: losses remain comparable with
            # the base model's, and the Trainer's token count (which skips position 0) stays exact.
            kwargs["labels"] = _prefixed(labels[:, 1:], n + 1, -100)
        elif labels is not None and self.task_type == "TOKEN_CLS":
            kwargs["labels"] = _prefixed(labels, n, -100)
        self._prefilled = n

    def _prepend_per_example(self, model: nn.Module, kwargs: dict[str, Any], prompt: torch.Tensor) -> None:
        """A padding-free batch (:mod:`.packing`): the prompt goes before every example of the row,
        each example's positions shift by ``n`` and its first token stays unscored, as when padded."""
        n = prompt.shape[0]
        positions = kwargs["position_ids"]
        source, slots, kwargs["position_ids"] = packed_prompt_layout(positions, n)
        if kwargs.get("input_ids") is not None:
            kwargs["input_ids"] = spread(kwargs["input_ids"], source, self.placeholder_id)
            self._pending, self._slots = prompt, slots
            self._splice = model.get_input_embeddings().register_forward_hook(self._splice_prompt)
        else:
            kwargs["inputs_embeds"] = splice_prompt(spread(kwargs["inputs_embeds"], source, 0.0), prompt, slots)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = spread(kwargs["token_type_ids"], source, 0)
        labels = kwargs.get("labels")
        if labels is not None:
            labels = spread(labels, source, -100)
            if self.task_type == "CAUSAL_LM":
                labels = labels.masked_fill(first_of_each_example(source, sequence_starts(positions)), -100)
            kwargs["labels"] = labels
        self._prefilled = n

    def _check_length(self, model: nn.Module, kwargs: dict[str, Any], cached: int, n: int) -> None:
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds")
        if inputs is None or self.max_positions is None:
            return
        total = cached + inputs.shape[1] + (0 if cached else n)
        positions = kwargs.get("position_ids")
        if not cached and kwargs.get("attention_mask") is None and is_packed(positions):
            total = int(positions.max()) + 1 + n  # padding-free: each example gets its own prompt
        if total > self.max_positions:
            model_type = getattr(model.config, "model_type", type(model).__name__)
            raise ConfigError(
                f"The soft prompt ({n} virtual tokens) plus {total - n} input tokens needs {total} positions, but "
                f"{model_type} has max_position_embeddings={self.max_positions}. Keep inputs (plus max_new_tokens "
                f"when generating) to at most {self.max_positions - n} tokens, or use fewer virtual tokens."
            )

    def _splice_prompt(self, embedding: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        prompt, self._pending = self._pending, None
        self._splice.remove()
        self._splice = None
        slots, self._slots = self._slots, None
        if slots is not None:
            return splice_prompt(output, prompt, slots)
        rows = prompt.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([rows, output[:, prompt.shape[0] :]], dim=1)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        never_spliced = self._splice is not None
        if never_spliced:
            self._splice.remove()
        self._splice, self._pending, self._slots = None, None, None
        prefilled, self._prefilled = self._prefilled, 0
        if output is None:  # the forward raised; its error is the one to report
            return
        if never_spliced:
            raise ConfigError(
                f"{type(model).__name__} never called its input embedding layer "
                f"({type(model.get_input_embeddings()).__name__}), so the soft prompt could not be inserted."
            )
        cache = _cache_of(kwargs)
        if cache is None:
            cache = _cache_of(output)  # created inside the forward
        if prefilled and cache is not None:
            setattr(cache, _CACHE_TAG, prefilled)


def _check_continues(kwargs: dict[str, Any], user_tokens: int, n: int) -> None:
    """Inputs for a filled cache must start right after the ``user_tokens`` it holds (behind the
    ``n`` virtual ones). ``generate`` resuming from a cache miscounts the virtual tokens as input."""
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None:
        continues, seen = mask.shape[1] == user_tokens + inputs.shape[1], f"an attention mask over {mask.shape[1]}"
    elif positions is not None:  # no mask, so no padding: positions count the tokens so far
        continues, seen = bool((positions[:, 0] == user_tokens).all()), f"position {positions[0, 0].item()}"
    else:
        return
    if not continues:
        raise ConfigError(
            f"These inputs do not continue the KV cache: it holds {user_tokens} input tokens after the {n} "
            f"virtual ones, but the inputs come with {seen}. generate() cannot resume from a cache under a "
            "soft prompt (it counts the virtual tokens as input); pass the whole sequence without the cache."
        )


def _cache_of(values: Any) -> Any:
    """The KV cache in forward kwargs or a model output (``cache`` in transformers 5, formerly
    ``past_key_values``). Compared with None explicitly: an empty cache has length 0. Read from
    the items: a transformers 5 ``ModelOutput`` answers ``get``/``in`` with the old name by warning
    the user about deprecation, even when it holds no cache at all."""
    if not isinstance(values, dict):  # kwargs, or a ModelOutput (a dict); a tuple output carries no name
        return None
    found = {k: v for k, v in values.items() if k in ("cache", "past_key_values") and v is not None}
    return found.get("cache", found.get("past_key_values"))


def _prefixed(t: torch.Tensor, n: int, value: int) -> torch.Tensor:
    return torch.cat([t.new_full((t.shape[0], n), value), t], dim=1)


def _extend(kwargs: dict[str, Any], key: str, n: int, value: int) -> None:
    if kwargs.get(key) is not None:
        kwargs[key] = _prefixed(kwargs[key], n, value)


# -- building ------------------------------------------------------------------------------------


def check_prompt_supported(model: nn.Module, task_type: str, config: PromptTuningConfig) -> None:
    """Raise :class:`ConfigError` when ``model`` cannot take a soft prompt of ``config``'s length."""
    text_config = model.config.get_text_config()
    if getattr(model.config, "is_encoder_decoder", False) or task_type not in PROMPT_TASKS:
        raise ConfigError(
            f"Prompt tuning supports tasks {list(PROMPT_TASKS)} on decoder-only or encoder-only models; "
            f"{type(model).__name__} is {task_type}. Use LoRA or bottleneck adapters for this model."
        )
    if model.get_input_embeddings() is None:
        raise ConfigError(f"{type(model).__name__} has no input embedding layer to prepend a soft prompt to.")
    max_positions = getattr(text_config, "max_position_embeddings", None)
    if max_positions is not None and config.num_virtual_tokens >= max_positions:
        raise ConfigError(
            f"PromptTuningConfig.num_virtual_tokens={config.num_virtual_tokens} leaves no room for input: "
            f"{text_config.model_type} has max_position_embeddings={max_positions}. Use fewer virtual tokens."
        )


def initial_prompt(config: PromptTuningConfig, embedding: nn.Module) -> torch.Tensor:
    """The ``(num_virtual_tokens, hidden_size)`` float32 starting point ``config.init`` asks for."""
    weight = embedding.weight.detach().to(torch.float32)
    vocab, hidden = weight.shape
    n = config.num_virtual_tokens
    if config.init == "random":
        return torch.randn(n, hidden, device=weight.device) * weight.std()
    if config.init == "vocab":
        return weight[torch.randint(vocab, (n,), device=weight.device)].clone()
    ids = list(config.tokenizer(config.init_text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"PromptTuningConfig.init_text={config.init_text!r} tokenises to no tokens.")
    if max(ids) >= vocab:
        raise ConfigError(
            f"The tokenizer gives token id {max(ids)} for init_text, beyond the model's vocabulary of {vocab}: "
            "pass the tokenizer that belongs to this model."
        )
    ids = (ids * math.ceil(n / len(ids)))[:n]  # repeated, then truncated, to num_virtual_tokens
    return weight[torch.tensor(ids, device=weight.device)].clone()


def soft_prompt_of(model: nn.Module) -> SoftPrompt | None:
    module = getattr(model, PROMPT_MODULE, None)
    if module is not None and not isinstance(module, SoftPrompt):
        raise ConfigError(
            f"{type(model).__name__}.{PROMPT_MODULE} is a {type(module).__name__}, not a SoftPrompt; "
            "a model that already uses that attribute cannot take a soft prompt."
        )
    return module


def ensure_soft_prompt(model: nn.Module, task_type: str, state: AdapterState) -> SoftPrompt:
    """``model.prompt_encoder``, created and hooked into the model's forward on first use (the hooks'
    handles go into ``state``, which removes them with the module)."""
    module = soft_prompt_of(model)
    if module is None:
        text_config = model.config.get_text_config()
        placeholder = 1 if text_config.pad_token_id == 0 else 0  # anything but the padding id
        module = SoftPrompt(task_type, placeholder, getattr(text_config, "max_position_embeddings", None))
        module.bind_state(state)
        model.add_module(PROMPT_MODULE, module)
        handles = [
            model.register_forward_pre_hook(module._before_forward, with_kwargs=True),
            model.register_forward_hook(module._after_forward, with_kwargs=True, always_call=True),
        ]
        state.add_hooks(PROMPT_MODULE, handles)
    return module
