"""``accelerate launch`` with 2 CPU processes (the config file users copy from docs/), the stock
Trainer and AdapterCallback: 2 ranks, equal adapters, only rank 0 writes and pushes, and the result
equals a ``torchrun`` run of the same job (tests/distributed_worker.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load, load_file

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "distributed_worker.py"
CONFIG = TESTS.parent / "docs" / "accelerate_cpu_2_processes.yaml"


def _written(folder: Path, paths: list[str]) -> set[str]:
    names = set()
    for path in map(Path, paths):
        if path.is_relative_to(folder):
            name = re.sub(r"^\.(.+)\.[0-9a-f]{8}\.tmp$", r"\1", path.name)  # atomic writes' temporary names
            names.add(path.parent.relative_to(folder).joinpath(name).as_posix())
    return names


def test_accelerate_launch_runs_two_cpu_ranks_like_torchrun(local_hub, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    accelerate_out, torchrun_out = tmp_path / "accelerate", tmp_path / "torchrun"
    accelerate_out.mkdir()
    torchrun_out.mkdir()
    launches = {
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                       "--main_process_port", "0", str(WORKER), str(accelerate_out), "alice/accelerate-run"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     str(WORKER), str(torchrun_out), "alice/torchrun-run"],
    }
    running = {k: subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for k, c in launches.items()}
    for name, process in running.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{output[-6000:]}"

    records = [json.loads((accelerate_out / f"rank{r}.json").read_text()) for r in (0, 1)]  # the worker asserts world_size 2
    rank0, rank1 = (load_file(accelerate_out / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(k.endswith("lora_B.default.weight") and rank0[k].abs().sum() > 0 for k in rank0)  # it trained
    assert records[0]["initial_lora_sum"] != records[1]["initial_lora_sum"]  # the ranks started apart

    run = accelerate_out / "run"
    assert _written(run, records[1]["files"]) == {"checkpoint-2/rng_state_1.pth", "checkpoint-4/rng_state_1.pth"}
    assert records[1]["uploads"] == []
    assert {"checkpoint-4/adapter_model.safetensors", "checkpoint-4/optimizer.pt"} <= _written(run, records[0]["files"])
    assert records[0]["uploads"][0] == "Training in progress, step 2"
    assert records[0]["uploads"][-1] == "End of training, step 4"
    assert [c.title for c in local_hub.commits("alice/accelerate-run")][1:] == records[0]["uploads"]
    pushed = load(local_hub.files("alice/accelerate-run")["adapter_model.safetensors"])
    assert all(torch.equal(pushed["base_model.model." + k.replace(".default", "")], v) for k, v in rank0.items())

    torchrun_rank0 = load_file(torchrun_out / "rank0.safetensors")
    assert torchrun_rank0.keys() == rank0.keys()
    assert all(torch.equal(torchrun_rank0[k], rank0[k]) for k in rank0)  # the same job, the same adapter
