"""Per-rank training memory under FSDP (``prepare_model(fsdp=True)``), from the planner.

Prints the planner's per-rank figures for Llama-3.1-70B (a config built in code from its published
dimensions: hidden 8192, 80 layers, MLP 28,672, 64 heads, 8 KV heads, vocabulary 128,256, untied
embeddings; nothing is downloaded) on 1, 2 and 4 ranks, next to the answer.ai FSDP-QLoRA figures
for 70B on 2 x 24 GB. The planner's sharded terms are validated against measured per-rank bytes
by ``tests/test_distributed.py`` (2 CPU processes).

Usage: ``python benchmarks/fsdp_memory.py``
"""

from __future__ import annotations

import subprocess

import torch
from transformers import LlamaConfig

from hf_peft_plugin import LoraConfig, estimate_memory
from hf_peft_plugin.memory import format_bytes

GB = 10**9
#: answer.ai's FSDP-QLoRA, 70B on 2 x 24 GB GPUs, per GPU (as quoted in issue 13).
ANSWER_AI = {"without offload": 35.6 * GB, "with CPU offload": 19.6 * GB}


def llama_31_70b() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=8192,
        num_hidden_layers=80,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        rope_theta=500000.0,
    )


def cpu_flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "lscpu unavailable"
    flags = next((line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return "lscpu flags: " + (" ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted))


def main() -> None:
    config = llama_31_70b()
    settings = dict(bits=4, gradient_checkpointing=True, dtype=torch.bfloat16, device="cuda")
    print(cpu_flags(), "(the planner computes; nothing here depends on this CPU)")
    print(
        "Llama-3.1-70B, 4-bit NF4 + double quant, LoRA on all linear layers (float32 adapters, AdamW), "
        "bf16 compute, gradient checkpointing, per rank:\n"
    )
    print(
        "| LoRA r | batch x tokens per rank | ranks | 4-bit weights | unquantized | adapters + grads + AdamW | activations "
        "| gathered units | total per rank | fits 24 GB |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r, batch, seq in ((64, 2, 2048), (64, 1, 512), (16, 2, 2048), (16, 1, 512)):
        lora = LoraConfig(r=r, alpha=16, target_modules="all-linear")
        for ranks in (1, 2, 4):
            e = estimate_memory(
                config, lora=lora, batch_size=batch, seq_len=seq, num_processes=ranks, fsdp=ranks > 1, **settings
            )
            adapters = e.trainable_bytes + e.gradient_bytes + e.optimizer_bytes
            fits = "yes" if e.total_bytes <= 24 * GB else "no"
            print(
                f"| {r} | {batch} x {seq} | {ranks} | {format_bytes(e.quantized_weights_bytes)} | "
                f"{format_bytes(e.unquantized_weights_bytes)} | {format_bytes(adapters)} | "
                f"{format_bytes(e.activation_bytes)} | {format_bytes(e.fsdp_gather_bytes)} | "
                f"{format_bytes(e.total_bytes)} ({e.total_bytes / GB:.1f} GB) | {fits} |"
            )
    print()
    for label, value in ANSWER_AI.items():
        print(f"answer.ai FSDP-QLoRA, 70B on 2 x 24 GB, {label}: {value / GB:.1f} GB per GPU")


if __name__ == "__main__":
    main()
