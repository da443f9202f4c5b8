"""``hf-peft-plugin``: the memory planner on the command line.

    hf-peft-plugin estimate meta-llama/Llama-3.1-8B --bits 4 --rank 16 --seq-len 2048 [--budget 24GiB]
    hf-peft-plugin plan meta-llama/Llama-3.1-8B --budget 12GiB --batch-size 8

Only the model's config.json is read. Exit status: 0 when it fits (or no budget was given),
1 when it does not fit, 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from .config import LoraConfig, PromptTuningConfig
from .errors import HfPeftPluginError, MemoryBudgetError
from .memory import OPTIMIZER_STATE_BITS, PLANNABLE, estimate_memory, format_bytes, parse_budget, plan_for_memory
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
    common.add_argument("--optimizer", choices=sorted(OPTIMIZER_STATE_BITS), default="adamw_torch")
    common.add_argument(
        "--dtype", choices=sorted(_DTYPES), default=None, help="compute dtype (default bf16 on cuda, fp32 on cpu)"
    )
    common.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    common.add_argument("--task-type", choices=sorted(TASK_AUTO_CLASSES), default=None)
    estimate = commands.add_parser("estimate", parents=[common], help="print the memory breakdown of one setup")
    estimate.add_argument("--budget", default=None, help="also say whether it fits, e.g. 24GiB, '8 GB', 512MiB")
    plan = commands.add_parser("plan", parents=[common], help="find settings that fit a budget")
    plan.add_argument("--budget", required=True, help="memory to fit in, e.g. 24GiB, '8 GB', 512MiB")
    plan.add_argument("--gradient-accumulation-steps", type=int, default=1)
    plan.add_argument("--fixed", nargs="+", choices=PLANNABLE, default=(), help="settings the planner must not change")
    return parser


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
        optimizer=args.optimizer,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        task_type=args.task_type,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
