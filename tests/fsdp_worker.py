"""One rank of the 2-process CPU (gloo) FSDP runs that tests/test_distributed.py launches with torchrun.

Usage: ``torchrun --nproc_per_node 2 fsdp_worker.py MODE OUT_DIR BASE_DIR [REPO_ID]``, MODE one of

* ``straight``: prepare the 4-bit tiny Llama saved in BASE_DIR with ``fsdp=True`` (streamed into
  shards block by block, hf_peft_plugin/sharded_loading.py), train 4 steps with the stock Trainer
  (checkpoints at steps 2 and 4, an AdapterCallback pushing at every save), then check
  ``save_adapter``, ``unshard_model`` + ``merge_and_unload`` and the bad-input errors;
* ``die``: the same job, but rank 1 exits abruptly when step 4 begins (after checkpoint-2);
* ``resume``: the same job resumed from the last checkpoint in OUT_DIR.

Each rank writes ``OUT_DIR/<mode>-rank<r>.json`` (losses, batches seen, sharded bytes, files it wrote,
uploads, checks) and ``OUT_DIR/<mode>-rank<r>.safetensors`` (its final trainable tensors).
The same job runs single-process when launched without torchrun (``MODE=single``) as the reference:
BASE_DIR loaded whole by transformers' ``from_pretrained``, as any non-FSDP run loads it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_peft_plugin.callback as callback_module  # noqa: E402
from hf_peft_plugin import (  # noqa: E402
    LoraConfig,
    ShardingError,
    disable_adapters,
    merge_and_unload,
    prepare_model,
    save_adapter,
)
from hf_peft_plugin.callback import AdapterCallback  # noqa: E402
from hf_peft_plugin.fsdp import sharded_bytes, unshard_model  # noqa: E402
from hf_peft_plugin.quantization import footprint  # noqa: E402
from hf_peft_plugin.sharded_loading import LOAD_ATTRIBUTE  # noqa: E402

from tiny_models import CopyTaskDataset, FirstPushStarts, tiny_llama, token_batch  # noqa: E402

STEPS = 4
GLOBAL_BATCH = 4
LORA = dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])


class Batches:
    """A collator that records the rows of every batch it builds (their first token identifies them)."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        self.seen.append(batch["input_ids"][:, 0].tolist())
        return batch


class DieAt(TrainerCallback):
    """Rank 1 exits without cleanup when ``step`` begins: a crashed rank, not a clean shutdown."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and int(os.environ.get("RANK", 0)) == 1:
            os._exit(17)


def spy(record: dict[str, Any], gate: FirstPushStarts) -> None:
    def files(real):
        def wrapper(obj, path, *args, **kwargs):
            record["files"].append(os.fspath(path))
            return real(obj, path, *args, **kwargs)

        return wrapper

    real_upload = callback_module.upload_staged

    def upload(staged, **kwargs):
        record["uploads"].append(kwargs["commit_message"])
        return real_upload(staged, **kwargs)

    # Every file the package writes lands through os.replace (atomic writes); the Trainer uses torch.save.
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        record["files"].append(os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace
    safetensors.torch.save_file = files(safetensors.torch.save_file)
    torch.save = files(torch.save)
    callback_module.upload_staged = gate.watch(upload)


def training_args(out: Path, world: int, **extra: Any) -> TrainingArguments:
    return TrainingArguments(
        str(out / "run"),
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo" if world > 1 else None,
        **extra,
    )


def main(mode: str, out: Path, base_dir: str, repo_id: str | None) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(1)
    record: dict[str, Any] = {"files": [], "uploads": [], "checks": {}}
    gate = FirstPushStarts()
    spy(record, gate)
    args = training_args(out, world)  # first: under torchrun it starts torch.distributed (gloo)
    # The single-process reference stores its 4-bit weights the way fsdp=True picks (float32).
    # Loading draws no random numbers either way, so the LoRA init after this seed is the same.
    torch.manual_seed(1)
    model = prepare_model(base_dir, bits=4, lora=LoraConfig(**LORA), quant_storage=torch.float32, fsdp=world > 1)
    if world > 1:
        load = getattr(model, LOAD_ATTRIBUTE)  # set only when the base was streamed into shards
        record["load"] = {k: getattr(load, k) for k in ("peak_bytes", "final_bytes", "full_bytes", "units")}
        shares = sharded_bytes(model)
        kinds = ("quantized_local", "quantized_full", "other_local", "other_full")
        record["sharded"] = {k: getattr(shares, k) for k in kinds}
        record["quantized_total"] = sum(
            m.weight.numel() * m.weight.element_size() for m in model.modules() if hasattr(m, "quant_state")
        )
        # This rank's frozen bytes, for the planner: its shards, the (replicated) quantization
        # constants and buffers. footprint() counts each packed weight in full, plus its constants.
        constants = footprint(model).quantized_bytes - shares.quantized_full
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        record["frozen_bytes_this_rank"] = shares.local + constants + buffers
        record["trainable_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    batches = Batches()
    callbacks: list[TrainerCallback] = []
    if repo_id:
        callbacks += [gate, AdapterCallback(repo_id, hub_strategy="every_save", token="hf_write_alice")]
    else:
        callbacks.append(AdapterCallback())
    if mode == "die":
        callbacks.append(DieAt(4))
    trainer = Trainer(
        model=model, args=args, train_dataset=CopyTaskDataset(32), data_collator=batches, callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    record["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record["batches"] = batches.seen
    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    safetensors.torch.save_file(tensors, str(out / f"{mode}-rank{rank}.safetensors"))

    if mode == "straight":
        after_training(model, out, rank, record, base_dir)
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(record))


def after_training(model: torch.nn.Module, out: Path, rank: int, record: dict[str, Any], base_dir: str) -> None:
    """save_adapter and merge_and_unload on the trained sharded model; then the bad-input errors."""
    checks = record["checks"]
    if rank == 0:
        save_adapter(model, out / "adapter")
    x = token_batch(2, 12)
    model.eval()
    with torch.no_grad():
        sharded_logits = model(input_ids=x).logits  # a collective: every rank runs it
        # The other FSDP route, a model already in memory sharded after preparing, holds the same base.
        in_memory = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(**LORA), fsdp=True).eval()
        with disable_adapters(model):
            streamed_base = model(input_ids=x).logits
        with disable_adapters(in_memory):
            checks["in_memory_vs_streamed_base"] = (in_memory(input_ids=x).logits - streamed_base).abs().max().item()
        del in_memory
    unshard_model(model)
    with torch.no_grad():
        gathered_logits = model(input_ids=x).logits
        merged = merge_and_unload(model, dtype=torch.float32)
        merged_logits = merged(input_ids=x).logits
    checks["gathered_vs_sharded"] = (gathered_logits - sharded_logits).abs().max().item()
    checks["merged_vs_sharded"] = (merged_logits - sharded_logits).abs().max().item()
    checks["merged_has_no_4bit"] = not any(hasattr(m, "quant_state") for m in merged.modules())
    checks["logits_scale"] = sharded_logits.abs().max().item()

    def error_of(build) -> str:
        try:
            build()
        except ShardingError as exc:
            return str(exc)
        return "no error"

    lora = LoraConfig(**LORA)
    checks["uint8_storage"] = error_of(
        lambda: prepare_model(tiny_llama(), bits=4, lora=lora, quant_storage=torch.uint8, fsdp=True)
    )
    checks["eight_bit"] = error_of(lambda: prepare_model(tiny_llama(), bits=8, lora=lora, fsdp=True))

    def mixed():
        base = tiny_llama()
        base.model.layers[0].input_layernorm.to(torch.bfloat16)
        prepare_model(base, bits=None, lora=lora, fsdp=True)

    checks["mixed_dtypes"] = error_of(mixed)

    def trainer_fsdp_request():  # the standard request, which accelerate drops on CPU
        fsdp_args = training_args(
            out / "fsdp-args", 2, fsdp="full_shard auto_wrap", fsdp_config={"fsdp_version": 2}
        )
        base = prepare_model(tiny_llama(), bits=4, lora=lora, quant_storage=torch.float32)
        Trainer(model=base, args=fsdp_args, train_dataset=CopyTaskDataset(8), callbacks=[AdapterCallback()])

    checks["trainer_fsdp_request"] = error_of(trainer_fsdp_request)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
