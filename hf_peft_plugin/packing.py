"""Padding-free batches: the examples of a batch concatenated into one row, no pad tokens.

The batch is what transformers' ``DataCollatorWithFlattening`` builds: one row of
``input_ids``, ``labels`` whose first entry per example is ``-100`` (nothing predicts an
example's first token from the one before it), and ``position_ids`` that restart at 0 for each
example; no ``attention_mask``. :func:`padding_free_collator` returns that collator after checking
the model can honour it.

What keeps examples apart is the model, and in transformers 5.24 only under conditions that a
prepared model has to meet (read in ``masking_utils`` and ``modeling_flash_attention_utils``):

* ``sdpa``, ``eager``, ``flex_attention``: ``create_causal_mask`` finds the restarts in
  ``position_ids`` and builds a block-diagonal causal mask, but only when ``attention_mask`` is
  ``None`` **and no cache is passed**. The model forward creates a ``DynamicCache`` whenever
  ``use_cache`` is on, and ``config.use_cache`` is ``True`` for every causal LM: in training
  without gradient checkpointing (which turns the cache off) and in ``Trainer.evaluate`` the
  examples of a packed row then attend to each other. Measured on the tiny Llama, Qwen2 and
  Mistral of the tests: per-example losses off by 0.07-0.10 with the cache, identical without.
* ``flash_attention_2/3``: the varlen kernel takes its boundaries from ``position_ids`` (or from
  ``cu_seq_lens_*``) only for a batch of one row.

So a prepared model carries a forward pre-hook (:func:`guard_packed_batches`): when a forward gets
restarting ``position_ids`` with no ``attention_mask`` and no cache, it turns ``use_cache`` off,
and it raises :class:`ConfigError` naming the fix when the model cannot keep the examples apart
(an attention implementation outside the ones above, several rows under flash attention, a model
whose forward does not pass ``position_ids`` to its mask). A soft prompt is inserted before each
example, not once per row (:func:`packed_prompt_layout`, used by :mod:`.prompt`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .state import AdapterState

#: Attention implementations that keep packed examples apart (see the module docstring).
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
#: Owner key in :attr:`AdapterState.hooks` of the padding-free guard.
PACKING_HOOKS = "packing"


def sequence_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` bool: True where an example starts (its position does not continue the last)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def is_packed(position_ids: torch.Tensor | None) -> bool:
    """Whether ``position_ids`` restart inside a row, i.e. hold several packed examples."""
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return False
    return bool(sequence_starts(position_ids)[:, 1:].any())


def _attention_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


@functools.lru_cache(maxsize=None)
def _masks_from_positions(model_cls: type) -> bool:
    """Whether the decoder of ``model_cls`` builds its mask with ``masking_utils`` (whose mask
    functions all detect packing) and hands it ``position_ids``: every decoder written for
    transformers 5 does; custom code from the Hub may not."""
    module = inspect.getmodule(model_cls)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return False
    return "masking_utils import" in source and "position_ids=position_ids" in source


def check_packing_supported(model: nn.Module, rows: int = 1) -> None:
    """Raise :class:`ConfigError` when ``model`` cannot keep the examples of a packed batch of
    ``rows`` rows from attending to each other."""
    from .state import adapter_state

    config = getattr(model, "config", None)
    name = type(model).__name__
    state = adapter_state(model)
    causal_lm = state.task_type == "CAUSAL_LM" if state is not None else callable(getattr(model, "can_generate", None)) and model.can_generate()
    if config is None or not causal_lm or getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise ConfigError(
            f"Padding-free batches need a decoder-only causal LM; {name} is not one. Pad the batches instead "
            "(transformers' DataCollatorWithPadding)."
        )
    if "position_ids" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"{name}.forward takes no position_ids, which padding-free batches need. Pad the batches instead.")
    implementation = _attention_implementation(model)
    if implementation in VARLEN_ATTENTION:
        if rows != 1:
            raise ConfigError(
                f"{implementation} keeps packed examples apart only in a batch of one row; this one has {rows}. "
                "Concatenate the whole batch into one row (DataCollatorWithFlattening does)."
            )
        return
    if implementation not in MASKED_ATTENTION:
        raise ConfigError(
            f"Padding-free batches need attention that keeps packed examples apart; {name} uses "
            f"attn_implementation={implementation!r}. Load the model with attn_implementation='sdpa' (or 'eager', "
            "or 'flash_attention_2' on a GPU), or pad the batches instead."
        )
    base = getattr(model, "base_model", model)
    if not (_masks_from_positions(type(model)) or _masks_from_positions(type(base))):
        raise ConfigError(
            f"{name} does not build its attention mask from position_ids, so packed examples would attend to each "
            "other. Pad the batches instead (transformers' DataCollatorWithPadding)."
        )


def padding_free_collator(model: nn.Module | None = None, **kwargs: Any):
    """transformers' ``DataCollatorWithFlattening`` (``kwargs`` go to it), after checking that
    ``model`` (when given) can train on its batches. Examples need ``input_ids`` and may carry
    ``labels`` (e.g. ``-100`` over the prompt for answer-only loss)."""
    from transformers import DataCollatorWithFlattening

    if model is not None:
        check_packing_supported(model)
    return DataCollatorWithFlattening(**kwargs)


def _cache_given(kwargs: dict[str, Any]) -> bool:
    return kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None


def _guard(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    if args or kwargs.get("attention_mask") is not None or _cache_given(kwargs):
        return None  # a mask or a cache decides; positional inputs (model(ids)) carry no position_ids
    positions = kwargs.get("position_ids")
    if not isinstance(positions, torch.Tensor) or not is_packed(positions):
        return None
    check_packing_supported(model, rows=positions.shape[0])
    if kwargs.get("use_cache"):
        raise ConfigError(
            "use_cache=True with a padding-free batch: with a cache transformers ignores the restarts in position_ids "
            "and the packed examples attend to each other. Pass use_cache=False (or no use_cache)."
        )
    kwargs["use_cache"] = False
    return args, kwargs


def guard_packed_batches(model: nn.Module, state: AdapterState) -> None:
    """Make ``model`` honour padding-free batches (see the module docstring); idempotent. The hook's
    handle lives in ``state``, so unloading the adapters removes it with the others."""
    if not state.hooks.get(PACKING_HOOKS):
        state.add_hooks(PACKING_HOOKS, [model.register_forward_pre_hook(_guard, with_kwargs=True)])


# -- soft prompts ----------------------------------------------------------------------------------


def packed_prompt_layout(position_ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where ``n`` virtual tokens go when each example of a packed batch gets its own prompt.

    Returns ``(source, slot, position_ids)`` for the longer rows: ``source[b, j]`` is the index
    into the original row ``b`` of the token at new position ``j`` (``-1`` for a virtual token),
    ``slot[b, j]`` which virtual token it is (``-1`` for a real one), and the new positions (the
    prompt at ``0 .. n-1``, each example shifted by ``n``). Rows with fewer examples are filled up
    with a block of virtual tokens of their own, so all rows keep one length without a mask.
    """
    batch, length = position_ids.shape
    starts = sequence_starts(position_ids)
    counts = starts.sum(dim=1)
    width = length + n * int(counts.max())
    device = position_ids.device
    source = torch.full((batch, width), -1, dtype=torch.long, device=device)
    slot = torch.full((batch, width), -1, dtype=torch.long, device=device)
    positions = torch.zeros((batch, width), dtype=position_ids.dtype, device=device)
    prompt = torch.arange(n, device=device)
    for b in range(batch):
        # Each token moves right by n for every example that starts at or before it.
        shift = n * starts[b].long().cumsum(0)
        index = torch.arange(length, device=device) + shift
        source[b, index] = torch.arange(length, device=device)
        positions[b, index] = position_ids[b] + n
        for first in starts[b].nonzero().squeeze(-1).tolist():
            at = first + n * int(starts[b, : first + 1].sum()) - n
            slot[b, at : at + n] = prompt
            positions[b, at : at + n] = prompt.to(positions.dtype)
        used = length + n * int(counts[b])
        if used < width:  # filler: its own block of virtual tokens, numbered from 0
            slot[b, used:] = torch.arange(width - used, device=device) % n
            positions[b, used:] = torch.arange(width - used, device=device, dtype=positions.dtype)
    return source, slot, positions


def spread(values: torch.Tensor, source: torch.Tensor, fill: int | float) -> torch.Tensor:
    """``values`` (``(batch, seq, ...)``) laid out on the longer rows of :func:`packed_prompt_layout`,
    ``fill`` at the virtual tokens."""
    index = source.clamp(min=0)
    gathered = torch.gather(values, 1, index.view(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:]))
    keep = (source >= 0).view(*source.shape, *([1] * (values.dim() - 2)))
    return torch.where(keep, gathered, torch.full_like(gathered, fill))


def splice_prompt(embeds: torch.Tensor, prompt: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``embeds`` with the virtual-token positions (``slot >= 0``) replaced by those prompt rows."""
    rows = prompt.to(embeds.dtype)[slot.clamp(min=0)]
    return torch.where((slot >= 0).unsqueeze(-1), rows, embeds)


def first_of_each_example(source: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """``(batch, width)`` bool: the new positions holding each example's first real token."""
    index = source.clamp(min=0)
    return (source >= 0) & torch.gather(starts, 1, index)
