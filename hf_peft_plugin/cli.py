"""``hf-peft-plugin``: the memory planner, and pushing a saved adapter, on the command line.

    hf-peft-plugin estimate meta-llama/Llama-3.1-8B --bits 4 --rank 16 --seq-len 2048 [--budget 24GiB]
    hf-peft-plugin plan meta-llama/Llama-3.1-8B --budget 12GiB --batch-size 8
    hf-peft-plugin push outputs/my-adapter alice/my-adapter --base meta-llama/Llama-3.2-1B --bits 4

``estimate``/``plan`` read only the model's config.json; exit status 0 when it fits (or no budget
was given), 1 when it does not fit, 2 for bad input. ``push`` loads the base as it was trained
(``--bits``), attaches the saved adapter and runs :func:`~hf_peft_plugin.push_adapter_to_hub`,
so the card describes the training setup; exit status 0 when pushed, 1 when the Hub refused or
could not be reached (nothing local changes), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from .atomic import reading
from .loading import load_adapter
from .peft_format import (
    CONFIG_NAME,
    EXTRAS_CONFIG_NAME,
    Artifact,
    adapter_config_file,
    adapter_subfolders,
    read_artifact,
)
from .config import LoraConfig, PromptTuningConfig, QuantizationConfig
from .errors import AdapterLoadError, HfPeftPluginError, HubPushError, MemoryBudgetError
from .hub import check_repo_id, push_adapter_to_hub
from .memory import (
    OPTIMIZER_STATE_BITS,
    PLANNABLE,
    estimate_memory,
    format_bytes,
    load_model_config,
    longest_context,
    parse_budget,
    plan_for_memory,
)
from .model import load_base_model
from .state import TASK_AUTO_CLASSES

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-peft-plugin", description="Will it fit? Training memory from config.json alone."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="Hub id, local model directory, or path to a config.json")
    common.add_argument(
        "--bits", choices=["4", "8", "none"], default="4", help="quantization of the frozen base (default 4)"
    )
    common.add_argument(
        "--rank", type=int, default=None, help="LoRA rank (default 8; omit with --prompt-tokens for prompt tuning only)"
    )
    common.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    common.add_argument(
        "--target-modules", nargs="+", default=None, help="LoRA target module names (default all-linear)"
    )
    common.add_argument("--dora", action="store_true", help="DoRA instead of plain LoRA")
    common.add_argument("--lora-dropout", type=float, default=0.0)
    common.add_argument("--prompt-tokens", type=int, default=None, help="add a soft prompt of this many virtual tokens")
    common.add_argument("--batch-size", type=int, default=1)
    common.add_argument("--seq-len", type=int, default=2048)
    common.add_argument("--no-gradient-checkpointing", action="store_true")
    common.add_argument("--no-chunked-loss", action="store_true", help="transformers' full-logits loss")
    common.add_argument("--offload-activations", action="store_true", help="checkpointed block inputs in host memory")
    common.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATE_BITS), default="adamw_torch")
    common.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="compute dtype (default bf16 on cuda, fp32 on cpu)"
    )
    common.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    common.add_argument("--task-type", choices=sorted(TASK_AUTO_CLASSES), default=None)
    common.add_argument("--num-processes", type=int, default=1, help="ranks training together: per-rank figures")
    common.add_argument("--fsdp", action="store_true", help="the frozen base sharded over the ranks (FSDP2)")
    estimate = commands.add_parser("estimate", parents=[common], help="print the memory breakdown of one setup")
    estimate.add_argument("--budget", default=None, help="also say whether it fits, e.g. 24GiB, '8 GB', 512MiB")
    plan = commands.add_parser("plan", parents=[common], help="find settings that fit a budget")
    plan.add_argument("--budget", required=True, help="memory to fit in, e.g. 24GiB, '8 GB', 512MiB")
    plan.add_argument("--gradient-accumulation-steps", type=int, default=1)
    plan.add_argument("--fixed", nargs="+", choices=PLANNABLE, default=(), help="settings the planner must not change")
    push = commands.add_parser(
        "push",
        help="push an adapter folder that save_adapter wrote to the Hub, with a model card",
        description="Token: HF_TOKEN or `hf auth login`. The base model is loaded (as trained) to build the card.",
    )
    push.add_argument("adapter_dir", help="the folder save_adapter (or AdapterCallback) wrote")
    push.add_argument("repo_id", help="user/name or org/name; created if it does not exist")
    push.add_argument("--base", default=None, help="base model path or Hub id (default: the one in adapter_config.json)")
    push.add_argument("--bits", choices=["4", "8", "none"], default="4", help="how the base was quantized in training")
    push.add_argument(
        "--num-labels", type=int, default=None, help="classifier width (default: read from the saved head)"
    )
    visibility = push.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private", dest="private", action="store_true", default=True, help="create the repo private (the default)"
    )
    visibility.add_argument(
        "--public", dest="private", action="store_false", help="create the repo public (if it does not exist yet)"
    )
    push.add_argument("--revision", default="main", help="branch to commit to")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--commit-message", default=None)
    return parser


def _at_position_limit(model: str, estimate) -> bool:
    limit = getattr(load_model_config(model).get_text_config(), "max_position_embeddings", None)
    virtual = estimate.settings.prompt.num_virtual_tokens if estimate.settings.prompt is not None else 0
    return limit is not None and estimate.settings.seq_len + virtual >= limit


def _settings(args: argparse.Namespace) -> dict:
    lora = None
    if args.rank is not None or args.prompt_tokens is None:
        rank = 8 if args.rank is None else args.rank
        lora = LoraConfig(
            r=rank,
            alpha=args.alpha if args.alpha is not None else 2.0 * rank,
            target_modules="all-linear" if args.target_modules in (None, ["all-linear"]) else args.target_modules,
            use_dora=args.dora,
            dropout=args.lora_dropout,
        )
    return dict(
        bits=None if args.bits == "none" else int(args.bits),
        lora=lora,
        prompt=PromptTuningConfig(num_virtual_tokens=args.prompt_tokens) if args.prompt_tokens is not None else None,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        chunked_loss=not args.no_chunked_loss,
        offload_activations=args.offload_activations,
        optimizer=args.optimizer,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        task_type=args.task_type,
        num_processes=args.num_processes,
        fsdp=args.fsdp,
    )


def _saved_adapters(folder: Path) -> dict[str | None, Path]:
    """The adapters ``save_adapter`` wrote to ``folder`` with the config describing each: ``None``
    for the top level (``default``), else the sub-folder name."""
    if not folder.is_dir():
        return {}
    top = adapter_config_file(folder)
    found: dict[str | None, Path] = {None: top} if top is not None else {}
    for name in adapter_subfolders(folder):
        found[name] = adapter_config_file(folder / name)
    return found


def _saved_head_width(artifact: Artifact) -> int | None:
    """Rows of the saved classification head when it is one linear layer (``classifier`` /
    ``score``): the base must be built with that many labels for the head to load."""
    rows = set()
    for key, tensor in artifact.module_tensors.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in artifact.head_names and tensor.dim() == 2:
            rows.add(tensor.shape[0])
    return rows.pop() if len(rows) == 1 else None


def _push(args: argparse.Namespace) -> int:
    """Load base + adapters, then push; everything that can be checked is checked before loading."""
    try:
        check_repo_id(args.repo_id)
        folder = Path(args.adapter_dir)
        adapters = _saved_adapters(folder)
        if not adapters:
            raise AdapterLoadError(
                f"{folder} holds no {CONFIG_NAME} or {EXTRAS_CONFIG_NAME} (nor sub-folders with one): pass the "
                "folder save_adapter (or AdapterCallback) wrote."
            )
        # Every adapter is read and checked on its own (the loader's parser): bad files are exit 2.
        artifacts = {}
        for subfolder in adapters:
            directory = folder if subfolder is None else folder / subfolder
            with reading(directory):
                artifacts[subfolder] = read_artifact(directory)
        config_file, first = next(iter(adapters.values())), next(iter(artifacts.values()))
        base = args.base or first.base_model_name_or_path
        if not base:
            raise AdapterLoadError(f"{config_file} does not name its base model; pass --base <path or Hub id>.")
        task_type = first.task_type or "CAUSAL_LM"
        if task_type not in TASK_AUTO_CLASSES:
            raise AdapterLoadError(f"{config_file} has task_type {task_type!r}; expected one of {sorted(TASK_AUTO_CLASSES)}.")
        quant = QuantizationConfig(bits=None if args.bits == "none" else int(args.bits))
        num_labels = args.num_labels or _saved_head_width(first)
        kwargs = {}
        if num_labels and task_type in ("SEQ_CLS", "TOKEN_CLS"):  # the trained head replaces the base's
            kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
        try:
            model, _, _ = load_base_model(base, quant, task_type, kwargs)
        except OSError as exc:
            raise AdapterLoadError(f"Could not load the base model {base!r} ({exc}); pass --base <path or Hub id>.") from exc
        for subfolder in adapters:
            name = "default" if subfolder is None else subfolder
            model = load_adapter(model, folder, subfolder=subfolder, adapter_name=name)
    except HfPeftPluginError as exc:
        print(f"hf-peft-plugin: {exc}", file=sys.stderr)
        return 2
    try:
        url = push_adapter_to_hub(
            model,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
        )
    except HubPushError as exc:
        print(f"hf-peft-plugin: {exc}", file=sys.stderr)
        return 1
    print(url)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "push":
        return _push(args)
    try:
        budget = parse_budget(args.budget) if args.budget is not None else None
        settings = _settings(args)
    except HfPeftPluginError as exc:
        print(f"hf-peft-plugin: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "plan":
            fixed, steps = args.fixed, args.gradient_accumulation_steps
            print(plan_for_memory(args.model, budget, fixed=fixed, gradient_accumulation_steps=steps, **settings))
            return 0
        estimate = estimate_memory(args.model, **settings)
    except MemoryBudgetError as exc:  # the budget was read above: nothing fits it
        print(f"hf-peft-plugin: {exc}", file=sys.stderr)
        return 1
    except HfPeftPluginError as exc:
        print(f"hf-peft-plugin: {exc}", file=sys.stderr)
        return 2
    print(estimate)
    if budget is None:
        return 0
    longest = longest_context(args.model, budget, **{k: v for k, v in settings.items() if k != "seq_len"})
    if longest is None:
        print(f"Not even one token per row fits in {format_bytes(budget)} with these settings.")
    else:
        print(
            f"Longest context that fits in {format_bytes(budget)}: {longest.settings.seq_len:,} tokens per row "
            f"at batch {longest.settings.batch_size} ({format_bytes(longest.total_bytes)})"
            + (" = the model's max_position_embeddings." if _at_position_limit(args.model, longest) else ".")
        )
    spare = budget - estimate.total_bytes
    if spare >= 0:
        print(f"Fits in {format_bytes(budget)} ({format_bytes(spare)} to spare).")
        return 0
    print(
        f"Does not fit in {format_bytes(budget)}: {format_bytes(-spare)} short. "
        f"Run `hf-peft-plugin plan {args.model} --budget {args.budget}` for settings that fit."
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
