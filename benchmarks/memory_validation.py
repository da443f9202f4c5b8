"""Measured vs estimated training memory (``hf_peft_plugin.memory``) on this machine's CPU.

    python benchmarks/memory_validation.py [--quick]

Weights, adapters and optimizer states are compared with the real prepared model: its
``quantization.footprint`` and the bytes in the optimizer's state after one real step.

Activations are measured as the peak resident memory of one forward + backward above the
resident memory just before it, in a fresh subprocess per case:

* the subprocess runs one warm-up step first (lazy initialisation, gradient buffers), then
  writes ``5`` to ``/proc/self/clear_refs``, which resets the kernel's peak-RSS counter
  (``VmHWM`` in ``/proc/self/status``) to the current RSS, runs the step and reads ``VmHWM``;
* glibc is started with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation above 64 KiB gets its
  own mapping that ``free`` returns to the kernel at once, so RSS follows the live tensors instead
  of glibc's high-water mark (without it, freed activations stay resident and later peaks hide);
* torch runs on one thread (``OMP_NUM_THREADS=1``): no per-thread scratch buffers in the figure,
  and no cross-thread unmapping, which makes a step with per-allocation mappings ten times slower.

The estimate's CPU figure (``device="cpu"``) has no CUDA context, so its activations plus the
dequantization workspace are what the step adds on top of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_peft_plugin import LoraConfig, prepare_model  # noqa: E402
from hf_peft_plugin.memory import estimate_memory, format_bytes  # noqa: E402
from hf_peft_plugin.quantization import footprint  # noqa: E402

#: A Llama-architecture model big enough for its activations to dwarf allocator noise, small
#: enough for a CPU step in about a second.
MEDIUM_LLAMA = dict(
    model_type="llama",
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=1024,
)
#: GPT-2's defaults keep dropout 0.1 everywhere (and its tanh-approximated GELU keeps four tensors).
MEDIUM_GPT2 = dict(
    model_type="gpt2",
    vocab_size=2048,
    n_embd=256,
    n_layer=4,
    n_head=8,
    n_positions=1024,
    bos_token_id=1,
    eos_token_id=2,
)
MEDIUM_QWEN2 = dict(MEDIUM_LLAMA, model_type="qwen2")
ACTIVATION_CASES = [
    dict(name="llama-256 4-bit r8 b4x512", batch_size=4, seq_len=512, bits=4, r=8, gradient_checkpointing=False),
    dict(name="llama-256 4-bit r8 b4x512 ckpt", batch_size=4, seq_len=512, bits=4, r=8, gradient_checkpointing=True),
    dict(name="llama-256 8-bit r8 b4x512", batch_size=4, seq_len=512, bits=8, r=8, gradient_checkpointing=False),
    dict(name="llama-256 none r16 b2x1024", batch_size=2, seq_len=1024, bits=None, r=16, gradient_checkpointing=False),
    dict(
        name="llama-256 4-bit q,v b4x512",
        batch_size=4,
        seq_len=512,
        bits=4,
        r=8,
        targets=["q_proj", "v_proj"],
        gradient_checkpointing=False,
    ),
    dict(
        name="llama-256 4-bit DoRA b4x512",
        batch_size=4,
        seq_len=512,
        bits=4,
        r=8,
        dora=True,
        gradient_checkpointing=False,
    ),
    dict(
        name="llama-256 V=32k b2x512",
        batch_size=2,
        seq_len=512,
        bits=4,
        r=8,
        vocab_size=32000,
        gradient_checkpointing=False,
    ),
    dict(
        name="llama-256 V=32k b2x512 ckpt",
        batch_size=2,
        seq_len=512,
        bits=4,
        r=8,
        vocab_size=32000,
        gradient_checkpointing=True,
    ),
    dict(
        name="llama-256 4-bit bf16 autocast",
        batch_size=4,
        seq_len=512,
        bits=4,
        r=8,
        bf16=True,
        gradient_checkpointing=False,
    ),
    dict(
        name="llama-256 4-bit bf16 ckpt", batch_size=4, seq_len=512, bits=4, r=8, bf16=True, gradient_checkpointing=True
    ),
    dict(
        name="llama-256 none bf16 autocast",
        batch_size=4,
        seq_len=512,
        bits=None,
        r=8,
        bf16=True,
        gradient_checkpointing=False,
    ),
    dict(
        name="llama-256 LoRA dropout 0.1",
        batch_size=4,
        seq_len=512,
        bits=4,
        r=8,
        lora_dropout=0.1,
        gradient_checkpointing=False,
    ),
    dict(
        name="qwen2-256 4-bit r8 b4x512",
        config=MEDIUM_QWEN2,
        batch_size=4,
        seq_len=512,
        bits=4,
        r=8,
        gradient_checkpointing=False,
    ),
    dict(
        name="gpt2-256 dropout 0.1 b4x512",
        config=MEDIUM_GPT2,
        batch_size=4,
        seq_len=512,
        bits=4,
        r=8,
        gradient_checkpointing=False,
    ),
    dict(
        name="gpt2-256 dropout 0.1 ckpt",
        config=MEDIUM_GPT2,
        batch_size=4,
        seq_len=512,
        bits=4,
        r=8,
        gradient_checkpointing=True,
    ),
    # The loss: the chunked loss (the default, every row above) against transformers' full logits,
    # a small chunk, a padding-free packed row, activation offload (a no-op on the CPU).
    dict(
        name="V=32k ckpt, full-logits loss",
        batch_size=2,
        seq_len=512,
        bits=4,
        r=8,
        vocab_size=32000,
        chunked_loss=False,
        gradient_checkpointing=True,
    ),
    dict(
        name="V=32k ckpt, chunks of 128",
        batch_size=2,
        seq_len=512,
        bits=4,
        r=8,
        vocab_size=32000,
        loss_chunk_size=128,
        gradient_checkpointing=True,
    ),
    dict(
        name="V=32k ckpt, packed 1x1024",
        batch_size=2,
        seq_len=512,
        bits=4,
        r=8,
        vocab_size=32000,
        loss_chunk_size=128,
        packed=True,
        gradient_checkpointing=True,
    ),
    dict(
        name="V=32k ckpt + offload (CPU)",
        batch_size=2,
        seq_len=512,
        bits=4,
        r=8,
        vocab_size=32000,
        loss_chunk_size=128,
        offload=True,
        gradient_checkpointing=True,
    ),
]
QUICK_CASES = ACTIVATION_CASES[:2]


def case_config(case: dict) -> dict:
    config = dict(case.get("config", MEDIUM_LLAMA))
    if "vocab_size" in case:
        config["vocab_size"] = case["vocab_size"]
    return config


def case_lora(case: dict) -> LoraConfig:
    return LoraConfig(
        r=case["r"],
        alpha=2 * case["r"],
        target_modules=case.get("targets", "all-linear"),
        use_dora=case.get("dora", False),
        dropout=case.get("lora_dropout", 0.0),
    )


def case_dtype(case: dict) -> torch.dtype:
    """float32, or bfloat16 under the autocast the Trainer's ``bf16=True`` applies."""
    return torch.bfloat16 if case.get("bf16") else torch.float32


def estimated_activations(case: dict) -> tuple[int, int]:
    """``(activation_bytes, overhead_bytes)`` of the CPU estimate for ``case``."""
    est = estimate_memory(
        case_config(case),
        bits=case["bits"],
        lora=case_lora(case),
        batch_size=case["batch_size"],
        seq_len=case["seq_len"],
        gradient_checkpointing=case["gradient_checkpointing"],
        device="cpu",
        dtype=case_dtype(case),
        chunked_loss=case.get("chunked_loss", True),
        loss_chunk_size=case.get("loss_chunk_size"),
        offload_activations=case.get("offload", False),
        packed_tokens=case["batch_size"] * case["seq_len"] if case.get("packed") else None,
    )
    return est.activation_bytes, est.overhead_bytes


def measure_step_peaks(cases: list[dict], timeout: float = 600) -> list[int]:
    """Peak RSS of one training step above the RSS before it, per case (bytes), measured one case
    after another in one fresh subprocess (each case's baseline is taken right before its step)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(cases)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("[")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"measuring {[c['name'] for c in cases]} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _child(cases: list[dict]) -> None:
    warnings.filterwarnings("ignore")
    print(json.dumps([_step_peak(case) for case in cases]))


def _step_peak(case: dict) -> int:
    import gc

    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config, dtype = case_config(case), case_dtype(case)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
    model = prepare_model(
        model,
        bits=case["bits"],
        lora=case_lora(case),
        compute_dtype=dtype,
        gradient_checkpointing=case["gradient_checkpointing"],
        chunked_loss=case.get("chunked_loss", True),
        loss_chunk_size=case.get("loss_chunk_size"),
        offload_activations=case.get("offload", False),
    )
    model.train()
    ids = torch.randint(3, config["vocab_size"], (case["batch_size"], case["seq_len"]))
    inputs = dict(input_ids=ids, labels=ids)
    if case.get("packed"):  # the examples concatenated into one row, positions restarting per example
        positions = torch.arange(case["seq_len"]).repeat(case["batch_size"]).unsqueeze(0)
        labels = ids.clone()
        labels[:, 0] = -100  # no example predicts the next one's first token
        inputs = dict(input_ids=ids.reshape(1, -1), labels=labels.reshape(1, -1), position_ids=positions)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**inputs).loss  # outputs dropped before backward, as in the Trainer
        loss.backward()

    step()  # warm-up: lazy initialisation, and the gradient buffers (not activations) now exist
    gc.collect()
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    return _status_bytes("VmHWM") - before


# -- weights, adapters and optimizer states ------------------------------------------------------


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def one_step_optimizer(model: torch.nn.Module, name: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    if name == "adamw_torch":
        optimizer = torch.optim.AdamW(params, lr=1e-3)
    else:
        import bitsandbytes as bnb

        optimizer = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name](
            params, lr=1e-3
        )
    optimizer.step()
    return optimizer


def weights_rows(quick: bool) -> list[tuple[str, int, int, int, int]]:
    """``(case, estimated weights+adapters, measured, estimated optimizer, measured)`` rows."""
    from hf_peft_plugin.assets import minilm_path
    from transformers import AutoConfig, AutoModelForCausalLM

    cases = [
        ("llama-256", dict(MEDIUM_LLAMA), bits, opt, None)
        for bits, opt in ((4, "adamw_torch"), (8, "adamw_8bit"), (None, "adamw_torch"))
    ]
    cases.append(("all-MiniLM-L6-v2", str(minilm_path()), 4, "adamw_torch", "FEATURE_EXTRACTION"))
    if not quick:
        from hf_peft_plugin.assets import smollm2_path

        cases.append(("SmolLM2-135M", str(smollm2_path()), 4, "paged_adamw_8bit", None))
    rows = []
    for name, source, bits, opt, task in cases:
        lora = LoraConfig(r=16, alpha=32)
        est = estimate_memory(
            source, bits=bits, lora=lora, optimizer=opt, device="cpu", dtype=torch.float32, task_type=task, seq_len=128
        )
        if isinstance(source, dict):
            torch.manual_seed(0)
            base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**source), dtype=torch.float32)
            model = prepare_model(base, bits=bits, lora=lora)
        else:
            model = prepare_model(source, bits=bits, lora=lora, task_type=task)
        fp = footprint(model)
        estimated = est.quantized_weights_bytes + est.unquantized_weights_bytes + est.trainable_bytes
        rows.append(
            (
                f"{name} {bits or 'no'}-bit {opt}",
                estimated,
                fp.total_bytes,
                est.optimizer_bytes,
                optimizer_state_bytes(one_step_optimizer(model, opt)),
            )
        )
    return rows


# -- estimates for popular sizes, from public hyper-parameters -----------------------------------


def _llama(hidden, layers, inter, heads, kv, vocab, tied, positions) -> dict:
    return dict(
        model_type="llama", hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
        num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
        max_position_embeddings=positions,
    )  # fmt: skip


#: Llama-3.x from their model cards' configs; LLaMA-1 (the QLoRA paper's models) from its paper.
POPULAR = {
    "Llama-3.2-1B": _llama(2048, 16, 8192, 32, 8, 128256, True, 131072),
    "Llama-3.2-3B": _llama(3072, 28, 8192, 24, 8, 128256, True, 131072),
    "Llama-3.1-8B": _llama(4096, 32, 14336, 32, 8, 128256, False, 131072),
    "Llama-3.1-70B": _llama(8192, 80, 28672, 64, 8, 128256, False, 131072),
    "LLaMA-7B": _llama(4096, 32, 11008, 32, 32, 32000, False, 2048),
    "LLaMA-33B": _llama(6656, 60, 17920, 52, 52, 32000, False, 2048),
    "LLaMA-65B": _llama(8192, 80, 22016, 64, 64, 32000, False, 2048),
}
#: (label, estimate_memory settings) columns of the table.
POPULAR_SETUPS = [
    ("r=16, 1x2048, adamw_torch", dict(lora=LoraConfig(r=16, alpha=32), seq_len=2048, optimizer="adamw_torch")),
    (
        "QLoRA paper: r=64, 1x512, paged 32-bit",
        dict(lora=LoraConfig(r=64, alpha=16, dropout=0.05), seq_len=512, optimizer="paged_adamw_32bit"),
    ),
]


def popular_rows() -> list[tuple[str, list]]:
    rows = []
    for name, config in POPULAR.items():
        estimates = [estimate_memory(config, bits=4, batch_size=1, **kwargs) for _, kwargs in POPULAR_SETUPS]
        rows.append((name, estimates))
    return rows


def print_popular() -> None:
    print("4-bit NF4 + double quant, bf16 compute on CUDA, gradient checkpointing, batch 1:")
    print(
        "| model | 4-bit weights | unquantized | LoRA r=16 + grads + AdamW | activations 1x2048 | total | "
        + POPULAR_SETUPS[1][0]
        + " total |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, (est, paper) in popular_rows():
        adapters = est.trainable_bytes + est.gradient_bytes + est.optimizer_bytes
        print(
            f"| {name} | {format_bytes(est.quantized_weights_bytes)} | {format_bytes(est.unquantized_weights_bytes)} "
            f"| {format_bytes(adapters)} | {format_bytes(est.activation_bytes)} | {format_bytes(est.total_bytes)} "
            f"| {format_bytes(paper.total_bytes)} |"
        )


def _pct(estimated: int, measured: int) -> str:
    return f"{100 * (estimated - measured) / measured:+.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two activation cases, no SmolLM2")
    parser.add_argument("--popular", action="store_true", help="only print the table of popular model sizes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    warnings.filterwarnings("ignore")
    if args.popular:
        print_popular()
        return
    print("Weights + adapters (vs quantization.footprint) and optimizer states (vs one real step):")
    print(
        f"| {'case':<40} | {'est. weights':>12} | {'measured':>12} | {'err':>7} "
        f"| {'est. optim':>11} | {'measured':>11} | {'err':>7} |"
    )
    print(f"|{'-' * 42}|{'-' * 13}:|{'-' * 13}:|{'-' * 8}:|{'-' * 12}:|{'-' * 12}:|{'-' * 8}:|")
    for name, est_w, got_w, est_o, got_o in weights_rows(args.quick):
        print(
            f"| {name:<40} | {format_bytes(est_w):>12} | {format_bytes(got_w):>12} | {_pct(est_w, got_w):>7} "
            f"| {format_bytes(est_o):>11} | {format_bytes(got_o):>11} | {_pct(est_o, got_o):>7} |"
        )
    print()
    print("Activations (+ dequantization workspace) vs the peak RSS of one step above the RSS before it:")
    print(f"| {'case':<32} | {'estimated':>12} | {'+ workspace':>12} | {'measured':>12} | {'err':>7} |")
    print(f"|{'-' * 34}|{'-' * 13}:|{'-' * 13}:|{'-' * 13}:|{'-' * 8}:|")
    cases = QUICK_CASES if args.quick else ACTIVATION_CASES
    for case, measured in zip(cases, measure_step_peaks(cases)):
        activations, workspace = estimated_activations(case)
        print(
            f"| {case['name']:<32} | {format_bytes(activations):>12} | {format_bytes(activations + workspace):>12} "
            f"| {format_bytes(measured):>12} | {_pct(activations + workspace, measured):>7} |"
        )


if __name__ == "__main__":
    main()
