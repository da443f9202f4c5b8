"""DeepSpeed ZeRO-3 with a 4-bit base prepared by hf_peft_plugin, through the stock Trainer.

Not part of CI (deepspeed is not a dependency). Run on 2 CPU processes::

    pip install --no-deps deepspeed==0.19.8 hjson einops ninja py-cpuinfo msgpack
    torchrun --standalone --nproc_per_node 2 benchmarks/deepspeed_zero3.py OUT_DIR
    python benchmarks/deepspeed_zero3.py OUT_DIR --single   # the same job on one process, for the losses

Every training row is the same, so the step-1 loss must equal the loss of the unpartitioned
model on that row whatever the data order; each rank prints its share of every 4-bit weight.
``use_cpu`` stays False: with it, accelerate does not enter its DeepSpeed branch at all.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hf_peft_plugin import AdapterCallback, LoraConfig, prepare_model  # noqa: E402
from tiny_models import CopyTaskDataset, tiny_llama  # noqa: E402

ZERO3 = {
    "zero_optimization": {"stage": 3},
    # No train_batch_size: the Trainer computes it with a world size of 1 on CPU, which DeepSpeed
    # (world size 2) then rejects.
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
}


class _Losses(TrainerCallback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class _SameRow(torch.utils.data.Dataset):
    def __init__(self, row: dict[str, torch.Tensor], n: int) -> None:
        self.row, self.n = row, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.row


def main(out: str, single: bool) -> None:
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(1)
    # One process takes both ranks' rows in one batch of 4.
    setting = dict(per_device_train_batch_size=4, use_cpu=True) if single else dict(per_device_train_batch_size=2, deepspeed=ZERO3)
    args = TrainingArguments(
        out, max_steps=3, logging_steps=1, report_to=[], save_strategy="no", learning_rate=1e-3, **setting
    )  # fmt: skip
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=2))
    row = CopyTaskDataset(1)[0]
    with torch.no_grad():
        before = float(model(**{k: v[None] for k, v in row.items()}).loss)
    losses = _Losses()
    trainer = Trainer(model=model, args=args, train_dataset=_SameRow(row, 8), callbacks=[AdapterCallback(), losses])
    trainer.train()
    local = full = 0
    for name, p in trainer.model.named_parameters():
        if p.dtype == torch.uint8:  # the packed 4-bit weights
            local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            full += getattr(p, "ds_numel", p.numel())
    trainer.save_model(os.path.join(out, "final"))
    print(
        f"rank {rank}: {trainer.accelerator.state.distributed_type}, holds {local:,} of {full:,} packed 4-bit bytes; "
        f"loss before training {before:.4f}; step losses {losses.losses}",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1], single="--single" in sys.argv[2:])
