"""One rank of the 2-process CPU (gloo) DDP run that tests/test_distributed.py launches with torchrun.

Usage: ``torchrun --nproc_per_node 2 distributed_worker.py OUT_DIR REPO_ID``. Each rank trains the
same prepared 4-bit tiny Llama with an AdapterCallback that pushes at every save, then writes
``OUT_DIR/rank<r>.safetensors`` (its trainable tensors) and ``OUT_DIR/rank<r>.json`` (what it
serialised to disk and what it uploaded), for the test to compare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hf_peft_plugin.callback as callback_module  # noqa: E402
from hf_peft_plugin import LoraConfig, prepare_model  # noqa: E402
from hf_peft_plugin.callback import AdapterCallback  # noqa: E402

from tiny_models import CopyTaskDataset, FirstPushStarts, tiny_llama  # noqa: E402


def main(out: Path, repo_id: str) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    record: dict[str, Any] = {"files": [], "uploads": []}

    def spy_files(real):
        def wrapper(obj, path, *args, **kwargs):
            record["files"].append(os.fspath(path))
            return real(obj, path, *args, **kwargs)

        return wrapper

    def spy_upload(staged, **kwargs):
        record["uploads"].append(kwargs["commit_message"])
        return real_upload(staged, **kwargs)

    real_upload = callback_module.upload_staged
    # Every file the package writes lands through os.replace (atomic writes); the Trainer uses torch.save.
    real_replace = os.replace

    def spy_replace(src, dst, *args, **kwargs):
        record["files"].append(os.fspath(dst))
        return real_replace(src, dst, *args, **kwargs)

    os.replace = spy_replace
    safetensors.torch.save_file = spy_files(safetensors.torch.save_file)
    torch.save = spy_files(torch.save)
    gate = FirstPushStarts()
    callback_module.upload_staged = gate.watch(spy_upload)

    base = tiny_llama()  # the same base weights on every rank (seeded inside)
    torch.manual_seed(rank)  # a different LoRA init per rank: DDP must broadcast rank 0's
    model = prepare_model(base, bits=4, lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    record["initial_lora_sum"] = sum(p.sum().item() for p in model.parameters() if p.requires_grad)
    args = TrainingArguments(
        str(out / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    callback = AdapterCallback(repo_id, hub_strategy="every_save", token="hf_write_alice")
    trainer = Trainer(model=model, args=args, train_dataset=CopyTaskDataset(32), callbacks=[gate, callback])
    trainer.train()
    assert trainer.args.world_size == 2, trainer.args.world_size

    tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    safetensors.torch.save_file(tensors, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
