"""FSDP-QLoRA with the stock Trainer: the 4-bit base sharded across processes, LoRA replicated.

One script for CPUs (gloo) and GPUs (NCCL); the launcher starts one process per rank:

    torchrun --nproc_per_node 2 examples/fsdp_qlora.py                 # CPU: SmolLM2-135M, 8 steps
    torchrun --nproc_per_node 2 examples/fsdp_qlora.py --model meta-llama/Llama-3.1-8B --steps 50

On GPUs ``prepare_model`` computes in bf16 (fp16 where bf16 is missing) and each rank streams the
checkpoint onto its own device one decoder block at a time, sharding each block before reading the
next, so no device holds the whole base; on CPUs it computes in float32. Either way ``fsdp=True`` stores the packed 4-bit
weights in float32 (the dtype of the blocks' norms, so each FSDP unit has one dtype) and shards
them. Each rank prints its share of the quantized bytes; rank 0 saves the adapter.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from hf_peft_plugin import AdapterCallback, LoraConfig, prepare_model, save_adapter
from hf_peft_plugin.fsdp import sharded_bytes

DATA = Path(__file__).resolve().parent / "data" / "wordnet_glosses.jsonl"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="per rank")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--output-dir", default="fsdp-qlora-out")
    return p.parse_args()


def examples(tokenizer, n: int = 256, length: int = 64) -> list[dict[str, torch.Tensor]]:
    rows = []
    with open(DATA, encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            if item.get("split", "train") != "train":
                continue
            ids = tokenizer(f"{item['word']}: {item['gloss']}", truncation=True, max_length=length)["input_ids"]
            labels = ids + [-100] * (length - len(ids))  # no loss on the padding
            ids = ids + [tokenizer.eos_token_id] * (length - len(ids))
            rows.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)})
            if len(rows) == n:
                break
    return rows


def main() -> None:
    args = parse_args()
    model_path = args.model
    if model_path is None:
        from hf_peft_plugin.assets import smollm2_path

        model_path = smollm2_path()
    cpu = not torch.cuda.is_available()
    # Created first: under torchrun it starts torch.distributed (gloo on CPU, NCCL on GPUs) and
    # sets this rank's device, which prepare_model loads onto.
    training_args = TrainingArguments(
        args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-4,
        logging_steps=1,
        save_steps=max(args.steps // 2, 1),
        report_to=[],
        use_cpu=cpu,
        disable_tqdm=True,
        ddp_backend="gloo" if cpu else None,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = prepare_model(
        model_path,
        bits=4,
        lora=LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"),
        gradient_checkpointing=True,
        fsdp=True,
    )
    rank = int(os.environ.get("RANK", 0))
    share = sharded_bytes(model)
    print(
        f"rank {rank}: holds {share.quantized_local:,} of {share.quantized_full:,} packed 4-bit bytes "
        f"and {share.other_local:,} of {share.other_full:,} other frozen bytes",
        flush=True,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=examples(tokenizer), callbacks=[AdapterCallback()]
    )
    trainer.train()
    if trainer.is_world_process_zero():
        save_adapter(model, Path(args.output_dir) / "adapter")
        losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
        print(f"losses: {losses}; adapter saved to {Path(args.output_dir) / 'adapter'}", flush=True)


if __name__ == "__main__":
    main()
