"""Side-by-side training benchmark: hf_peft_plugin against peft + bitsandbytes.

One command measures both on the same weights (loaded from the same local safetensors
directory), the same batches, seed and training loop, for 4-bit NF4, 8-bit and unquantized
backbones, each with and without gradient checkpointing, and prints a markdown table::

    python benchmarks/bench_train.py            # CPU, 60M-param random-init Llama, ~10 minutes on 2 cores
    python benchmarks/bench_train.py --quick    # smoke run, tiny settings
    python benchmarks/bench_train.py --gpu      # 1.24B-param random-init Llama, bf16 compute, + tokens/s
    python benchmarks/bench_train.py --bits 4 --floor --dtype bfloat16   # subsets, the floor, bf16 on CPU
    python benchmarks/bench_train.py --long-context   # long-context + max-context rows (long_context.py)

``--floor`` adds a third worker: the same model with LoRA on one layer only, whose step is what
the frozen base costs forward and backward, the floor under any LoRA on all linear layers.

Every (variant, setting) runs in a fresh subprocess (``--worker``), so memory is that variant's
own: on CPU the peak RSS (``VmHWM``; reset between loading and training through
``/proc/self/clear_refs``), on GPU ``torch.cuda.max_memory_allocated``. The two variants' workers
take their steps in turn, so a change in machine load hits both alike. The peft worker imports
``peft``; hf_peft_plugin never imports it itself.

What each side does (LoRA r=16, alpha=32, dropout 0, all linear layers of the blocks):

* hf_peft_plugin: ``prepare_model(path, bits=..., gradient_checkpointing=...)``: quantizes while
  loading, freezes, upcasts only the norms, non-reentrant checkpointing when asked.
* peft: ``from_pretrained(path, quantization_config=BitsAndBytesConfig(...))``, then
  ``prepare_model_for_kbit_training(use_gradient_checkpointing=<same as the row>,
  gradient_checkpointing_kwargs={"use_reentrant": False})`` (it also upcasts every
  non-4-bit fp16/bf16 parameter to fp32), then ``get_peft_model``. Unquantized rows skip
  ``prepare_model_for_kbit_training``, as peft's docs do, and enable checkpointing directly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("hf_peft_plugin", "peft")
FLOOR = "floor"  # --floor: a third worker, LoRA on one layer (see load_floor)
RESULT_PREFIX = "BENCH_RESULT "
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LORA_R, LORA_ALPHA = 16, 32
SEED = 0

#: Random-init Llama models the benchmark builds once and saves as safetensors.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # 60.0M parameters: 27.3M in the blocks (quantized), 2 x 16.4M embeddings / lm_head.
    "cpu": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "intermediate_size": 1536,
        "vocab_size": 32000,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    # 1.24B parameters, the shape of TinyLlama-class models.
    "gpu": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "vocab_size": 32000,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
    # --quick: a few seconds per worker.
    "quick": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "vocab_size": 1024,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
}


@dataclass(frozen=True)
class Setting:
    bits: int | None
    gradient_checkpointing: bool

    @property
    def label(self) -> str:
        quant = {4: "4-bit NF4", 8: "8-bit", None: "no quant"}[self.bits]
        return f"{quant}, {'GC' if self.gradient_checkpointing else 'no GC'}"


SETTINGS = [Setting(bits, gc) for bits in (4, 8, None) for gc in (False, True)]


# -- the model on disk ---------------------------------------------------------------------------


def build_model(path: Path, config_kwargs: dict[str, Any], dtype: torch.dtype, device: str) -> Path:
    """Save a random-init Llama once; later runs (and both variants) load these same weights."""
    if (path / "config.json").exists():
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, **config_kwargs)
    with torch.device(device):  # on the GPU: a 1.2B-parameter init takes seconds, not minutes
        model = LlamaForCausalLM(config).to(dtype)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    model.save_pretrained(tmp)  # safetensors
    os.replace(tmp, path)  # atomic: an interrupted build never leaves a half-written model
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


# -- memory --------------------------------------------------------------------------------------


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux ``VmHWM``)."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _reset_peak_rss() -> None:
    """Lower the high-water mark to the current RSS, so the next peak is the training step's own."""
    Path("/proc/self/clear_refs").write_text("5")


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()


def peak_memory(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _peak_rss()


# -- the two variants ----------------------------------------------------------------------------


def load_hf_peft_plugin(
    path: str,
    bits: int | None,
    gc: bool,
    dtype: torch.dtype,
    target_modules: str = "all-linear",
    fast_frozen_matmul: bool | None = None,
) -> torch.nn.Module:
    from hf_peft_plugin import LoraConfig, prepare_model

    lora = LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=target_modules)
    return prepare_model(
        path,
        bits=bits,
        lora=lora,
        compute_dtype=dtype,
        dtype=dtype,
        gradient_checkpointing=gc,
        fast_frozen_matmul=fast_frozen_matmul,
    )


def load_peft(path: str, bits: int | None, gc: bool, dtype: torch.dtype) -> torch.nn.Module:
    """peft's documented QLoRA recipe. ``prepare_model_for_kbit_training`` is peft's kbit path only;
    unquantized models go straight to ``get_peft_model``, as peft's docs do."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if bits is not None:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=bits == 4,
            load_in_8bit=bits == 8,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # Same checkpointing flavour as hf_peft_plugin (non-reentrant), passed explicitly: peft's
    # default is use_gradient_checkpointing=True with torch's (reentrant) default.
    gc_kwargs = {"use_reentrant": False}
    if bits is not None:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gc, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    config = peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, config)


def load_floor(path: str, bits: int | None, gc: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The same model with LoRA on one layer only (``q_proj`` of the first block). The loss is still
    back-propagated through every frozen layer to reach it, so its step is what the frozen base
    costs, forward and backward: no LoRA on all linear layers, however written, can be faster."""
    return load_hf_peft_plugin(path, bits, gc, dtype, target_modules=r"model\.layers\.0\.self_attn\.q_proj")


def load_strict(path: str, bits: int | None, gc: bool, dtype: torch.dtype) -> torch.nn.Module:
    """hf_peft_plugin with strict float32 GEMMs everywhere (``fast_frozen_matmul=False``)."""
    return load_hf_peft_plugin(path, bits, gc, dtype, fast_frozen_matmul=False)


def load_peft_bf16_mode(path: str, bits: int | None, gc: bool, dtype: torch.dtype) -> torch.nn.Module:
    """peft with torch's CPU bf16 mode for every float32 GEMM, set by hand for the whole process
    (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``): what a peft user gets from the same
    hardware feature, applied to the trainable GEMMs too."""
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    return load_peft(path, bits, gc, dtype)


#: --compare-matmul: extra workers, shown as rows against peft.
MATMUL_VARIANTS = {
    "strict": "hf_peft_plugin, strict float32 GEMMs (fast_frozen_matmul=False)",
    "peft_bf16_mode": "peft + torch's bf16 GEMM mode set globally by hand",
}
LOADERS = {
    "hf_peft_plugin": load_hf_peft_plugin,
    "peft": load_peft,
    FLOOR: load_floor,
    "strict": load_strict,
    "peft_bf16_mode": load_peft_bf16_mode,
}


# -- one worker: load, train, save ---------------------------------------------------------------


def make_batches(n: int, batch_size: int, seq_len: int, vocab_size: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, vocab_size, (batch_size, seq_len), generator=g).to(device) for _ in range(n)]


class StepRunner:
    """A plain AdamW loop, identical for both variants; one call of :meth:`step` is one timed step.

    CPU seconds (all threads of this process) are reported next to wall seconds: they are far less
    sensitive to other processes competing for the same cores."""

    def __init__(self, model: torch.nn.Module, device: str) -> None:
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()

    def step(self, ids: torch.Tensor) -> dict[str, float]:
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        return {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu_start, "loss": loss.item()}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _send(message: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(message), flush=True)


def worker(args: argparse.Namespace) -> None:
    """Load, then run one step per ``step`` line on stdin; ``finish`` saves the adapter and exits.

    The driver steps the two variants' workers in turn, so both meet the same machine load."""
    device = "cuda" if args.gpu else "cpu"
    dtype = DTYPES[args.dtype]
    torch.manual_seed(SEED)
    reset_peak(device)
    start = time.perf_counter()
    model = LOADERS[args.variant](args.model, args.bits, args.gradient_checkpointing, dtype)
    load_s = time.perf_counter() - start
    load_peak = peak_memory(device)  # loading, quantizing and preparing: everything before step 1
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = make_batches(args.warmup + args.steps, args.batch_size, args.seq_len, model.config.vocab_size, device)
    runner = StepRunner(model, device)
    _send({"load_s": load_s, "load_peak_bytes": load_peak, "trainable_params": trainable})
    reset_peak(device)
    for i, command in enumerate(iter(sys.stdin.readline, "finish\n")):
        if not command:  # the driver is gone
            return
        _send(runner.step(batches[i % len(batches)]))
    result: dict[str, Any] = {"train_peak_bytes": peak_memory(device)}
    with tempfile.TemporaryDirectory() as out:
        try:
            model.save_pretrained(out)
            result["adapter_bytes"] = dir_bytes(Path(out))
        except Exception as exc:  # noqa: BLE001 - reported in the table; the training numbers still stand
            result["adapter_error"] = f"save_pretrained failed: {type(exc).__name__}: {exc}"
    _send(result)


# -- the real job: the quick start through the stock Trainer (and TRL) ---------------------------

REAL_JOB_VARIANTS = ("hf_peft_plugin", "peft", "trl")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "finetune_causal_lm.py"


def _quick_start_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_causal_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Lockstep:
    """A TrainerCallback (built lazily: transformers' Trainer modules import peft) that waits for the
    driver before each step and reports the step's wall time and real tokens after it."""

    def __new__(cls, counter):
        from transformers import TrainerCallback

        class Lockstep(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if sys.stdin.readline() != "step\n":
                    sys.exit(0)
                counter.tokens = 0
                self.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _send({"wall_s": time.perf_counter() - self.start, "tokens": counter.tokens})

        return Lockstep()


class _TokenCounter:
    """Real (non-pad) tokens of the training forwards: the mask's sum, or every token without a mask."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tokens = 0
        model.register_forward_pre_hook(self, with_kwargs=True, prepend=True)

    def __call__(self, model, args, kwargs) -> None:
        if model.training:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()


def real_job_worker(args: argparse.Namespace) -> None:
    """The quick start's data, model and settings (SmolLM2-135M-Instruct 4-bit, LoRA r=16 alpha=32
    dropout 0.05 all-linear, batch 8, lr 2e-3 cosine): hf_peft_plugin with padding-free batches and
    its chunked loss, peft with the quick start's padded collator, or TRL's SFTTrainer + peft."""
    from transformers import AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

    from hf_peft_plugin.assets import smollm2_path

    qs = _quick_start_module()
    path = str(smollm2_path())
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows, test_rows = qs.load_records(str(qs.DATA))
    import random

    random.seed(SEED)
    random.shuffle(train_rows)
    train = qs.GlossDataset(train_rows[:1200], tokenizer, 64)
    held_out = qs.GlossDataset(test_rows[:64], tokenizer, 64)
    steps = args.warmup + args.steps
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench_real_job."), per_device_train_batch_size=8, per_device_eval_batch_size=16,
        max_steps=steps, learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
        logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, seed=SEED, remove_unused_columns=False,
    )  # fmt: skip
    if args.variant == "hf_peft_plugin":
        from hf_peft_plugin import AdapterCallback, LoraConfig, padding_free_collator, prepare_model

        model = prepare_model(path, bits=4, lora=LoraConfig(r=16, alpha=32, dropout=0.05, target_modules="all-linear"))
        counter = _TokenCounter(model)
        trainer = Trainer(
            model=model, args=TrainingArguments(**common), train_dataset=train, eval_dataset=held_out,
            data_collator=padding_free_collator(model), callbacks=[AdapterCallback(), _Lockstep(counter)],
        )  # fmt: skip
    else:
        import peft
        from transformers import AutoModelForCausalLM

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        )
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
        if args.variant == "peft":
            base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
            model = peft.get_peft_model(base, lora)
            counter = _TokenCounter(model)
            trainer = Trainer(
                model=model, args=TrainingArguments(**common), train_dataset=train, eval_dataset=held_out,
                data_collator=qs.pad_collator(tokenizer.pad_token_id), callbacks=[_Lockstep(counter)],
            )  # fmt: skip
        else:
            import datasets
            from trl import SFTConfig, SFTTrainer

            def as_dataset(ds):
                return datasets.Dataset.from_list(
                    [{"input_ids": r["input_ids"], "completion_mask": [int(l != -100) for l in r["labels"]]} for r in ds.items]
                )

            config = SFTConfig(**common, max_length=64, completion_only_loss=True, gradient_checkpointing=False, bf16=False)
            trainer = SFTTrainer(
                model=base, args=config, train_dataset=as_dataset(train), eval_dataset=as_dataset(held_out),
                processing_class=tokenizer, peft_config=lora,
            )  # fmt: skip
            counter = _TokenCounter(trainer.model)
            trainer.add_callback(_Lockstep(counter))
    _send({"trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)})
    trainer.train()
    if sys.stdin.readline() != "finish\n":
        return
    _send({"eval_loss": trainer.evaluate()["eval_loss"], "train_peak_bytes": _peak_rss()})


def run_real_job(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """All variants load in parallel, then take their steps in turn (rotating order), then evaluate."""
    workers = {}
    for v in args.variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--real-job", "--variant", v,
               "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        workers[v] = Worker(args, v, None, {}, cmd=cmd)
    results: dict[str, dict[str, Any]] = {v: {"steps": []} for v in args.variants}
    try:
        for v in args.variants:
            results[v].update(workers[v].request(None))
        for i in range(args.warmup + args.steps):
            order = args.variants[i % len(args.variants) :] + args.variants[: i % len(args.variants)]
            for v in order:
                results[v]["steps"].append(workers[v].request("step"))
        for v in args.variants:
            results[v].update(workers[v].request("finish"))
    finally:
        for w in workers.values():
            w.close()
    for r in results.values():
        timed = r.pop("steps")[args.warmup :]
        r["step_times"] = [s["wall_s"] for s in timed]
        r["step_tokens"] = [s["tokens"] for s in timed]
        r["tokens_per_s"] = sum(r["step_tokens"]) / sum(r["step_times"])
        r["step_s"] = statistics.median(r["step_times"])
    return results


def format_real_job(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    ours = results.get("hf_peft_plugin", {})
    lines = [
        "| variant | batches | real tokens/s | vs peft | per-step ratio (median, peft time / ours) | step time, median | held-out loss | vs peft | trainable |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    peft_r = results.get("peft", {})
    import importlib.util

    chunked = importlib.util.find_spec("hf_peft_plugin.loss") is not None
    batches = {"hf_peft_plugin": "padding-free" + (" + chunked loss" if chunked else ""), "peft": "padded (quick start's collator)", "trl": "TRL's default (padded)"}
    for v, r in results.items():
        speed = r["tokens_per_s"] / peft_r["tokens_per_s"] if peft_r else float("nan")
        paired = statistics.median(b / a for a, b in zip(r["step_times"], peft_r["step_times"])) if peft_r else float("nan")
        loss = r["eval_loss"] / peft_r["eval_loss"] if peft_r else float("nan")
        lines.append(
            f"| {v} | {batches[v]} | {r['tokens_per_s']:,.0f} | {speed:.2f} | {paired:.2f} | {_ms(r['step_s'])} | "
            f"{r['eval_loss']:.4f} | {loss:.3f} | {r['trainable_params']:,} |"
        )
    del ours
    return "\n".join(lines)


# -- the driver ----------------------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    pass


class Worker:
    """One variant in its own fresh process, driven line by line over stdin/stdout."""

    def __init__(
        self, args: argparse.Namespace, variant: str, setting: Setting | None, env: dict[str, str], cmd: list[str] | None = None
    ) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - a file, not a pipe: a chatty worker cannot block
        if cmd is not None:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env={**os.environ, **env}
            )
            return
        cmd = [
            sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--model", args.model,
            "--bits", str(setting.bits), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--dtype", args.dtype,
        ]  # fmt: skip
        if setting.gradient_checkpointing:
            cmd.append("--gradient-checkpointing")
        if args.gpu:
            cmd.append("--gpu")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env={**os.environ, **env}
        )

    def request(self, command: str | None) -> dict[str, Any]:
        try:
            if command is not None:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith(RESULT_PREFIX):
                    return json.loads(line[len(RESULT_PREFIX) :])
        except BrokenPipeError:
            pass
        self.proc.wait()
        self.stderr.seek(0)
        tail = [line.strip() for line in self.stderr.read().strip().splitlines()[-3:]]
        raise WorkerFailed(f"worker exited with {self.proc.returncode}: " + " | ".join(tail))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.stderr.close()


#: glibc's default mmap threshold, pinned (by default it grows at run time): freed tensors then go
#: straight back to the OS, so peak RSS follows live memory instead of the allocator's caching,
#: which varies by +-10% from run to run. It also makes steps slower, so it is used only for a
#: separate memory pass of a few steps (the optimizer state exists after step 1).
MEMORY_PASS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
MEMORY_PASS_STEPS = 3


def run_pass(args: argparse.Namespace, setting: Setting, steps: int, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Both variants load in parallel, then take their ``steps`` in turn (ABBA order), then save."""
    workers = {v: Worker(args, v, setting, env) for v in args.variants}
    results: dict[str, dict[str, Any]] = {v: {"steps": []} for v in args.variants}

    def request(variant: str, command: str | None) -> dict[str, Any] | None:
        if "error" in results[variant]:
            return None
        try:
            return workers[variant].request(command)
        except WorkerFailed as exc:
            results[variant]["error"] = str(exc)
            return None

    try:
        for v in args.variants:
            results[v].update(request(v, None) or {})
        for i in range(steps):
            for v in args.variants if i % 2 == 0 else args.variants[::-1]:
                step = request(v, "step")
                if step is not None:
                    results[v]["steps"].append(step)
        for v in args.variants:
            results[v].update(request(v, "finish") or {})
    finally:
        for w in workers.values():
            w.close()
    return results


def measure_setting(args: argparse.Namespace, setting: Setting) -> dict[str, dict[str, Any]]:
    """The timing pass gives step times, loss, parameters and adapter size; on CPU, a separate
    memory pass gives peak RSS (the timing pass's RSS, under the default allocator, is kept too)."""
    results = run_pass(args, setting, args.warmup + args.steps, env={})
    for r in results.values():
        steps = r.pop("steps")
        timed = steps[args.warmup :]
        if "error" not in r and timed:
            wall, cpu = [s["wall_s"] for s in timed], [s["cpu_s"] for s in timed]
            r.update(step_s=statistics.median(wall), step_min_s=min(wall), step_cpu_s=statistics.median(cpu))
            r.update(step_times=wall, first_loss=steps[0]["loss"])
    if args.gpu:  # the CUDA allocator's own statistics are exact
        return results
    memory = run_pass(args, setting, MEMORY_PASS_STEPS, env=MEMORY_PASS_ENV)
    for v, r in results.items():
        r["train_peak_default_malloc_bytes"] = r.pop("train_peak_bytes", None)
        r["load_peak_default_malloc_bytes"] = r.pop("load_peak_bytes", None)
        m = memory[v]
        if "error" in m:
            r.setdefault("error", "memory pass: " + m["error"])
        else:
            r.update(train_peak_bytes=m["train_peak_bytes"], load_peak_bytes=m["load_peak_bytes"])
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


METRICS: list[tuple[str, str, Any]] = [
    # (label, result key, formatter)
    ("step time, median", "step_s", _ms),
    ("step CPU time, median", "step_cpu_s", _ms),
    ("peak memory, training", "train_peak_bytes", _mib),
    ("peak memory, load + prepare", "load_peak_bytes", _mib),
    ("peak RSS, training, default malloc", "train_peak_default_malloc_bytes", _mib),
    ("trainable parameters", "trainable_params", lambda v: f"{v:,}"),
    ("adapter files", "adapter_bytes", _mib),
    ("loss at step 1 (same model?)", "first_loss", lambda v: f"{v:.4f}"),
]


Results = dict[Setting, dict[str, dict[str, Any]]]


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Median over timed steps of (ours / peft) for steps taken back to back: the ratio least
    disturbed by a machine whose load changes during the run."""
    if "step_times" not in a or "step_times" not in b or len(a["step_times"]) != len(b["step_times"]):
        return None
    return statistics.median(x / y for x, y in zip(a["step_times"], b["step_times"]))


def format_table(results: Results, args: argparse.Namespace) -> str:
    ours, theirs = VARIANTS
    cpu_only = ("step_cpu_s", "train_peak_default_malloc_bytes")
    metrics = [m for m in METRICS if not (args.gpu and m[1] in cpu_only)]
    if args.gpu:
        for by_variant in results.values():
            for r in by_variant.values():
                if "step_s" in r:
                    r["tokens_per_s"] = args.batch_size * args.seq_len / r["step_s"]
        metrics.insert(1, ("tokens/s", "tokens_per_s", lambda v: f"{v:,.0f}"))
    memory = "GPU max_memory_allocated" if args.gpu else "peak RSS of a fresh process, mmap threshold pinned"
    lines = [
        f"| setting | metric (memory: {memory}) | {ours} | {theirs} | ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for setting, by_variant in results.items():
        a, b = by_variant.get(ours, {}), by_variant.get(theirs, {})
        for label, key, fmt in metrics:
            va, vb = a.get(key), b.get(key)
            cell_a = fmt(va) if va is not None else _missing(a, key)
            cell_b = fmt(vb) if vb is not None else _missing(b, key)
            ratio = f"{va / vb:.2f}" if va is not None and vb else "-"
            lines.append(f"| {setting.label} | {label} | {cell_a} | {cell_b} | {ratio} |")
            if key == "step_s" and (paired := paired_ratio(a, b)) is not None:
                lines.append(f"| {setting.label} | step time, per-step ratio (median) | | | {paired:.2f} |")
            for extra, extra_label in MATMUL_VARIANTS.items():
                if key == "step_s" and (other := by_variant.get(extra, {})).get("step_s") is not None and vb:
                    paired = paired_ratio(other, b)
                    per_step = "" if paired is None else f" (per-step {paired:.2f})"
                    lines.append(
                        f"| {setting.label} | step time, {extra_label} | {_ms(other['step_s'])} | | "
                        f"{other['step_s'] / vb:.2f}{per_step} |"
                    )
            if key == "step_s" and (floor := by_variant.get(FLOOR, {}).get("step_s")) is not None and vb:
                lines.append(
                    f"| {setting.label} | step time, floor: LoRA on one layer only | {_ms(floor)} | | {floor / vb:.2f} |"
                )
    return "\n".join(lines)


def _missing(result: dict[str, Any], key: str) -> str:
    if "error" in result or (key == "adapter_bytes" and "adapter_error" in result):
        return "failed"
    return "-"


def format_failures(results: Results) -> str:
    lines = [
        f"- {setting.label}, {variant}: {r.get('error') or r['adapter_error']}"
        for setting, by_variant in results.items()
        for variant, r in by_variant.items()
        if "error" in r or "adapter_error" in r
    ]
    return "\n".join(["", "Failures:", *lines]) if lines else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local model directory (default: a random-init Llama built once in --cache-dir)")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "hf_peft_plugin_bench"))
    p.add_argument("--steps", type=int, help="timed steps per variant (default 10; --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2; --quick 1)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 4; --gpu 8)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128; --gpu 512)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--bits", default="4,8,none", help="comma-separated subset of 4,8,none")
    p.add_argument("--gc", default="off,on", help="gradient checkpointing: comma-separated subset of off,on")
    p.add_argument("--quick", action="store_true", help="tiny model and few steps: a smoke run")
    p.add_argument("--gpu", action="store_true", help="CUDA, bf16 compute, ~1.2B-param model, adds tokens/s")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="compute dtype (default float32 on CPU, as the package does; bf16 with --gpu)"
    )
    p.add_argument("--json", help="also write the raw results to this file")
    p.add_argument(
        "--real-job", action="store_true",
        help="the quick start's job through the Trainer: hf_peft_plugin (padding-free) vs peft (padded) vs TRL SFTTrainer + peft",
    )  # fmt: skip
    # internal: one measurement in this (fresh) process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--floor", action="store_true", help="also time the floor: the same model with LoRA on one layer only"
    )
    p.add_argument(
        "--compare-matmul", action="store_true",
        help="also time hf_peft_plugin with strict float32 GEMMs and peft with torch's bf16 GEMM mode set globally",
    )  # fmt: skip
    p.add_argument("--variant", choices=(*VARIANTS, FLOOR, *MATMUL_VARIANTS, "trl"), help=argparse.SUPPRESS)
    p.add_argument("--gradient-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick and args.gpu:
        p.error("--quick and --gpu are exclusive")
    defaults = {"steps": 3, "warmup": 1, "batch_size": 2, "seq_len": 32} if args.quick else {"steps": 10, "warmup": 2}
    defaults.setdefault("batch_size", 8 if args.gpu else 4)
    defaults.setdefault("seq_len", 512 if args.gpu else 128)
    defaults.setdefault("dtype", "bfloat16" if args.gpu else "float32")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 2:
        p.error("--steps, --batch-size must be >= 1, --warmup >= 0 and --seq-len >= 2")
    if args.worker:
        if not args.real_job:
            args.bits = None if args.bits == "None" else int(args.bits)
        return args
    if args.real_job:
        args.variants = [v.strip() for v in args.variants.replace("hf_peft_plugin,peft", ",".join(REAL_JOB_VARIANTS)).split(",")]
        return args
    args.variants = [v.strip() for v in args.variants.split(",")]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if args.floor:
        args.variants.append(FLOOR)
    if args.compare_matmul:
        args.variants += list(MATMUL_VARIANTS)
    bits = {"4": 4, "8": 8, "none": None}
    gcs = {"off": False, "on": True}
    try:
        wanted_bits = [bits[b.strip().lower()] for b in args.bits.split(",")]
        wanted_gc = [gcs[g.strip().lower()] for g in args.gc.split(",")]
    except KeyError as exc:
        p.error(f"unknown --bits/--gc value {exc}; use --bits 4,8,none and --gc off,on")
    args.settings = [s for s in SETTINGS if s.bits in wanted_bits and s.gradient_checkpointing in wanted_gc]
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device; torch sees none")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--long-context" in argv:  # the long-context and max-context rows live in long_context.py
        import long_context

        return long_context.main([a for a in argv if a != "--long-context"])
    args = parse_args(argv)
    if args.worker:
        real_job_worker(args) if args.real_job else worker(args)
        return
    if args.real_job:
        print(f"CPU: {_cpu_line()}", file=sys.stderr)
        load_before = os.getloadavg()[0]
        results = run_real_job(args)
        print(
            f"Real job (examples/finetune_causal_lm.py's data and settings, stock Trainer), {args.warmup} warm-up + "
            f"{args.steps} timed steps of 8 examples per variant, steps taken in turn; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; 1-min load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end.\n"
            f"CPU: {_cpu_line()}\n"
        )
        print(format_real_job(results, args))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        return
    kind = "quick" if args.quick else "gpu" if args.gpu else "cpu"
    if args.model is None:
        cache = Path(args.cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        dtype = torch.bfloat16 if args.gpu else torch.float32  # the stored weights; compute is --dtype
        args.model = str(
            build_model(cache / f"llama-{kind}", MODEL_CONFIGS[kind], dtype, "cuda" if args.gpu else "cpu")
        )
    elif not (Path(args.model) / "config.json").is_file():
        sys.exit(f"--model {args.model!r} is not a local model directory (no config.json in it).")
    params = _parameter_count(Path(args.model))
    compute = (
        f"{args.dtype} on {torch.cuda.get_device_name()}"
        if args.gpu
        else f"{args.dtype} on CPU, {torch.get_num_threads()} threads"
    )
    header = (
        f"model `{args.model}` ({params / 1e6:.1f}M params), batch {args.batch_size}x{args.seq_len} tokens, "
        f"{args.warmup} warm-up + {args.steps} timed steps, LoRA r={LORA_R} alpha={LORA_ALPHA} all-linear, "
        f"{compute}, torch {torch.__version__}"
    )
    print(header, file=sys.stderr)
    load_before = os.getloadavg()[0]
    results: Results = {}
    for setting in args.settings:
        start = time.perf_counter()
        results[setting] = measure_setting(args, setting)
        status = ", ".join(f"{v} {'failed' if 'error' in r else _ms(r['step_s'])}" for v, r in results[setting].items())
        print(f"  {setting.label:18s} {time.perf_counter() - start:6.1f} s  {status}", file=sys.stderr)
    load_after = os.getloadavg()[0]
    print(f"{header}; 1-min load average {load_before:.1f} at start, {load_after:.1f} at end.\nCPU: {_cpu_line()}\n")
    print(format_table(results, args))
    print(format_failures(results))
    if args.json:
        rows = [{"setting": asdict(s), "variant": v, **r} for s, by_v in results.items() for v, r in by_v.items()]
        Path(args.json).write_text(json.dumps({"header": header, "results": rows}, indent=1))


def _cpu_line() -> str:
    """The CPU model and the flags that decide kernel speed here (the whole ``lscpu`` flag list is
    printed with ``--lscpu``)."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, flags: {' '.join(wanted)}"


def _parameter_count(model_dir: Path) -> int:
    """Parameters in the model's safetensors files, read from their headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not iterable
                total += math.prod(st.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    main()
