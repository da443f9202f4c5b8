"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): ``h + up(act(down(h)))``.

An adapter sits on the output of a block's attention or feed-forward sub-layer, before the
residual add. It is a new child of the block (``<block>.bottleneck_attn`` / ``.bottleneck_ffn``)
applied by a forward hook on the sub-layer, so no module of the base model moves: LoRA keys and
every other path stay exactly what the PEFT file format expects.

The sub-layers are found from the block's structure, not per model: pre-LN decoders expose
``self_attn``/``attn`` and ``mlp``; post-LN encoders (BERT family) add the residual and normalise
inside ``attention.output`` and ``output``, so there the adapter goes on their dropout, which is
where the residual is added next. Several active adapters at one point see the same input and
their outputs add up, like LoRA deltas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import BottleneckConfig
from .errors import AdapterNameError, ConfigError, TargetModulesError
from .state import AdapterState, ReadsAdapterState

ADAPTER_DTYPE = torch.float32
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
FEED_FORWARD_NAMES = ("mlp", "feed_forward", "ffn")
#: Name of the adapter module on the block, per placement point.
MODULE_NAMES = {"attn": "bottleneck_attn", "ffn": "bottleneck_ffn"}


class BottleneckAdapter(ReadsAdapterState, nn.Module):
    """Named bottleneck adapters at one point: ``down.<name>`` (hidden -> width), ``up.<name>``."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.non_linearity: dict[str, str] = {}

    def add_adapter(self, name: str, width: int, non_linearity: str, device: torch.device) -> None:
        if name in self.down:
            raise AdapterNameError(f"bottleneck adapter {name!r} already exists here")
        self.down[name] = nn.Linear(self.hidden_size, width, device=device, dtype=ADAPTER_DTYPE)
        up = nn.Linear(width, self.hidden_size, device=device, dtype=ADAPTER_DTYPE)
        nn.init.zeros_(up.weight)  # zero up-projection: the adapted model starts as the base model
        nn.init.zeros_(up.bias)
        self.up[name] = up
        self.non_linearity[name] = non_linearity
        self._state_changed()

    def adapter_names(self) -> list[str]:
        return list(self.down.keys())

    def delete_adapter(self, name: str) -> None:
        for container in (self.down, self.up):
            if name in container:
                del container[name]
        self.non_linearity.pop(name, None)
        self._state_changed()

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [*self.down[name].parameters(), *self.up[name].parameters()]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.active_adapters:
            return hidden
        x = hidden.to(ADAPTER_DTYPE)
        delta = sum(self.up[n](_ACTIVATIONS[self.non_linearity[n]](self.down[n](x))) for n in self.active_adapters)
        return hidden + delta.to(hidden.dtype)

    def _adapt_output(self, sublayer: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook on the sub-layer; attention modules return ``(hidden, weights, ...)``."""
        if self.adapters_disabled or not self.active_adapters:
            return None
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


@dataclass(frozen=True)
class InsertionPoint:
    block: str  # path of the block the adapter module is registered on
    placement: str  # "attn" or "ffn"
    sublayer: str  # path of the module whose output is adapted


def transformer_blocks(model: nn.Module) -> list[str]:
    """Paths of the model's repeated blocks: the outermost ``ModuleList`` of ``num_hidden_layers``
    modules of one class."""
    text_config = model.config.get_text_config()
    count = getattr(text_config, "num_hidden_layers", None)
    lists = [
        path
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == count and len({type(m) for m in module}) == 1
    ]
    outermost = [p for p in lists if not any(p.startswith(q + ".") for q in lists if q != p)]
    if len(outermost) != 1 or getattr(model.config, "is_encoder_decoder", False):
        found = f"found {outermost}" if outermost else "found none"
        raise TargetModulesError(
            f"Bottleneck adapters cannot find the transformer blocks of {text_config.model_type} "
            f"({type(model).__name__}): they look for one list of num_hidden_layers={count} blocks and {found}. "
            "Supported are decoder-only and encoder-only models (Llama-family, GPT-2, BERT-family); "
            "use LoRA for this model."
        )
    block_list = model.get_submodule(outermost[0])
    return [f"{outermost[0]}.{i}" for i in range(len(block_list))]


def _sublayer(block: nn.Module, placement: str) -> str | None:
    """Path (relative to the block) of the module whose output the adapter at ``placement`` adapts."""
    children = dict(block.named_children())
    if placement == "attn":
        name = next((n for n in ATTENTION_NAMES if n in children), None)
        if name is None:
            return None
        # Post-LN (BERT family): ``attention.output`` adds the residual right after its dropout.
        return f"{name}.output.dropout" if _has_dropout(getattr(children[name], "output", None)) else name
    name = next((n for n in FEED_FORWARD_NAMES if n in children), None)
    if name is not None:
        return name
    if "intermediate" in children and _has_dropout(children.get("output")):  # BERT: intermediate -> output
        return "output.dropout"
    return None


def _has_dropout(module: nn.Module | None) -> bool:
    return isinstance(module, nn.Module) and isinstance(getattr(module, "dropout", None), nn.Dropout)


def insertion_points(model: nn.Module, config: BottleneckConfig) -> list[InsertionPoint]:
    """Where ``config`` puts adapters; raises before anything is changed when it cannot."""
    blocks = transformer_blocks(model)
    if config.layers is None:
        chosen = list(range(len(blocks)))
    else:
        bad = [i for i in config.layers if not 0 <= i < len(blocks)]
        if bad:
            raise ConfigError(
                f"BottleneckConfig.layers={list(config.layers)} names blocks {bad} that do not exist: "
                f"{type(model).__name__} has {len(blocks)} blocks, numbered 0 to {len(blocks) - 1}."
            )
        chosen = sorted(set(config.layers))
    placements = ("attn", "ffn") if config.placement == "houlsby" else ("ffn",)
    points = []
    for i in chosen:
        block = model.get_submodule(blocks[i])
        for placement in placements:
            sub = _sublayer(block, placement)
            if sub is None:
                raise _no_sublayer(model, block, placement)
            existing = getattr(block, MODULE_NAMES[placement], None)
            if existing is not None and not isinstance(existing, BottleneckAdapter):
                raise TargetModulesError(
                    f"{blocks[i]}.{MODULE_NAMES[placement]} already exists and is not a bottleneck adapter."
                )
            points.append(InsertionPoint(blocks[i], placement, f"{blocks[i]}.{sub}"))
    return points


def _no_sublayer(model: nn.Module, block: nn.Module, placement: str) -> TargetModulesError:
    what, names = ("attention", ATTENTION_NAMES) if placement == "attn" else ("feed-forward", FEED_FORWARD_NAMES)
    children = sorted(name for name, _ in block.named_children())
    return TargetModulesError(
        f"Bottleneck adapters cannot find the {what} sub-layer of {type(block).__name__} in "
        f"{model.config.get_text_config().model_type}: its children are {children}, none of {list(names)}. "
        "Use LoRA for this model."
    )


def bottleneck_width(model: nn.Module, config: BottleneckConfig) -> int:
    return config.width_for(model.config.get_text_config().hidden_size)


def inject_bottlenecks(
    model: nn.Module,
    name: str,
    config: BottleneckConfig,
    points: list[InsertionPoint],
    width: int,
    state: AdapterState,
) -> None:
    """Add adapter ``name`` at ``points``; a new adapter module's hook handle goes into ``state``."""
    hidden = model.config.get_text_config().hidden_size
    for point in points:
        block = model.get_submodule(point.block)
        module = getattr(block, MODULE_NAMES[point.placement], None)
        if module is None:
            module = BottleneckAdapter(hidden)
            module.bind_state(state)
            block.add_module(MODULE_NAMES[point.placement], module)
            handle = model.get_submodule(point.sublayer).register_forward_hook(module._adapt_output)
            state.add_hooks(f"{point.block}.{MODULE_NAMES[point.placement]}", [handle])
        device = next(block.parameters()).device
        module.add_adapter(name, width, config.non_linearity, device)
