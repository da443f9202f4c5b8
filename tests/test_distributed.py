"""Two-process DDP training on CPU (gloo) with torchrun: ranks agree, only rank 0 saves and pushes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load, load_file

WORKER = Path(__file__).with_name("distributed_worker.py")
REPO = "alice/ddp-run"


def written_in(folder: Path, paths: list[str]) -> set[str]:
    """Files under ``folder`` among ``paths``; atomic writes' temporary names mapped to the final ones."""
    names = set()
    for path in map(Path, paths):
        if path.is_relative_to(folder):
            name = re.sub(r"^\.(.+)\.[0-9a-f]{8}\.tmp$", r"\1", path.name)
            names.add(path.parent.relative_to(folder).joinpath(name).as_posix())
    return names


def test_two_processes_train_identical_adapters_and_only_rank_0_writes(local_hub, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(WORKER), str(tmp_path), REPO], env=env, capture_output=True, text=True, timeout=150
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]

    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(k.endswith("lora_B.default.weight") and rank0[k].abs().sum() > 0 for k in rank0)  # it trained

    record = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert record[0]["initial_lora_sum"] != record[1]["initial_lora_sum"]  # the ranks started apart
    run = tmp_path / "run"
    # Rank 1 writes only its own RNG state (the Trainer keeps one per rank for an exact resume).
    assert written_in(run, record[1]["files"]) == {"checkpoint-2/rng_state_1.pth", "checkpoint-4/rng_state_1.pth"}
    assert record[1]["uploads"] == []
    by_rank0 = written_in(run, record[0]["files"])
    assert {
        "checkpoint-4/model.safetensors",
        "checkpoint-4/adapter_model.safetensors",
        "checkpoint-4/optimizer.pt",
    } <= by_rank0
    assert record[0]["uploads"][0] == "Training in progress, step 2"
    assert record[0]["uploads"][-1] == "End of training, step 4"

    titles = [c.title for c in local_hub.commits(REPO)][1:]
    assert titles == record[0]["uploads"]
    pushed = load(local_hub.files(REPO)["adapter_model.safetensors"])
    assert pushed.keys() == {"base_model.model." + k.replace(".default", "") for k in rank0}
    assert all(torch.equal(pushed["base_model.model." + k.replace(".default", "")], v) for k, v in rank0.items())
