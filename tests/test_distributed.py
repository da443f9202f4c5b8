"""Multi-process training on CPU (gloo) with torchrun: DDP, and FSDP2 with the 4-bit base sharded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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


# -- FSDP2: the frozen 4-bit base sharded across 2 processes, the adapter replicated ------------

FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")
FSDP_REPO = "alice/fsdp-run"


def _fsdp_run(mode: str, out: Path, base: Path, *extra: str, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launcher] if processes > 1 else [sys.executable]
    return subprocess.run(
        [*command, str(FSDP_WORKER), mode, str(out), str(base), *extra], env=env, capture_output=True, text=True, timeout=180
    )


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]


def _record(out: Path, mode: str, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((out / f"{mode}-rank{rank}.json").read_text()), load_file(out / f"{mode}-rank{rank}.safetensors")


def test_fsdp_two_processes_match_one_shard_the_base_and_survive_a_dead_rank(local_hub, tmp_path):
    """One straight 2-process run, the same job on 1 process, a run whose rank 1 dies, and its resume."""
    from tiny_models import tiny_llama

    straight, single, crashed = tmp_path / "straight", tmp_path / "single", tmp_path / "crashed"
    for folder in (straight, single, crashed):
        folder.mkdir()
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)  # safetensors: the 2-process runs stream it into shards
    _ok(_fsdp_run("straight", straight, base, FSDP_REPO))
    _ok(_fsdp_run("single", single, base, processes=1))

    (rec0, lora0), (rec1, lora1) = _record(straight, "straight", 0), _record(straight, "straight", 1)
    ref, ref_lora = _record(single, "single", 0)

    # Same data order: each global batch of the single run is rank 0's rows then rank 1's.
    steps = len(ref["losses"])
    assert steps == 4
    assert [a + b for a, b in zip(rec0["batches"], rec1["batches"])][:steps] == ref["batches"][:steps]
    # Same losses per step (within 1e-5) and the same LoRA tensors (within 1e-6), on both ranks.
    for rec in (rec0, rec1):
        assert len(rec["losses"]) == steps
        assert all(abs(a - b) < 1e-5 for a, b in zip(rec["losses"], ref["losses"])), (rec["losses"], ref["losses"])
    assert lora0.keys() == ref_lora.keys() == lora1.keys()
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in ref_lora.items())  # it trained
    for k in ref_lora:
        assert torch.allclose(lora0[k], ref_lora[k], rtol=0, atol=1e-6), k
        assert torch.equal(lora0[k], lora1[k]), k

    # Each rank holds half of every packed 4-bit weight (and of the other frozen tensors).
    for rec in (rec0, rec1):
        shares = rec["sharded"]
        assert shares["quantized_full"] == rec["quantized_total"] > 0  # every 4-bit weight is sharded
        assert shares["quantized_local"] * 2 == shares["quantized_full"]
        assert abs(shares["other_local"] / shares["other_full"] - 0.5) < 0.02

    # Streamed into shards: no rank ever held the whole base. Each block was sharded before the next
    # was read, so the most a rank held stays below what one whole-model load leaves on every rank.
    for rec in (rec0, rec1):
        held = rec["load"]
        assert held["units"] == 2
        assert held["final_bytes"] <= held["peak_bytes"] < held["full_bytes"], held
        assert rec["checks"]["in_memory_vs_streamed_base"] == 0.0

    # The memory planner's per-rank figure matches what each rank holds (the sharded terms).
    from hf_peft_plugin import LoraConfig, estimate_memory

    planned = estimate_memory(
        tiny_llama().config, lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        device="cpu", batch_size=2, seq_len=16, num_processes=2, fsdp=True,
    )  # fmt: skip
    for rec in (rec0, rec1):
        frozen = planned.quantized_weights_bytes + planned.unquantized_weights_bytes
        assert abs(frozen - rec["frozen_bytes_this_rank"]) <= 0.01 * rec["frozen_bytes_this_rank"]
        assert planned.trainable_bytes == rec["trainable_bytes"]
    print(f"planned frozen bytes per rank {frozen}, measured {rec0['frozen_bytes_this_rank']}")

    # Checkpoints: rank 0 writes the adapter (full tensors, gathered: the ranks hold the same ones) and
    # the trainable-weights file; no file holds a base weight; rank 1 writes only its RNG state.
    run = straight / "run"
    assert written_in(run, rec1["files"]) == {"checkpoint-2/rng_state_1.pth", "checkpoint-4/rng_state_1.pth"}
    by_rank0 = written_in(run, rec0["files"])
    assert {"checkpoint-4/adapter_model.safetensors", "checkpoint-4/model.safetensors"} <= by_rank0
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        names = {p.name for p in (run / checkpoint).iterdir()}
        assert not any(n.startswith("pytorch_model_fsdp") or n.endswith(".distcp") for n in names), names
        trainable = load_file(run / checkpoint / "model.safetensors")
        assert {k for k in trainable if not k.startswith("_hf_peft_plugin_")} == set(ref_lora)  # markers aside
        saved = load_file(run / checkpoint / "adapter_model.safetensors")
        assert saved.keys() == {"base_model.model." + k.replace(".default", "") for k in ref_lora}
    final = load_file(run / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(final[k], lora0[k]) for k in lora0)

    # Pushes: from rank 0 only, and the pushed adapter is the trained one.
    assert rec1["uploads"] == []
    # (a push still queued when the next one comes is replaced by it: the middle one may be skipped)
    assert rec0["uploads"][0] == "Training in progress, step 2"
    assert rec0["uploads"][-1] == "End of training, step 4"
    assert [c.title for c in local_hub.commits(FSDP_REPO)][1:] == rec0["uploads"]
    pushed = load(local_hub.files(FSDP_REPO)["adapter_model.safetensors"])
    assert all(torch.equal(pushed["base_model.model." + k.replace(".default", "")], v) for k, v in lora0.items())

    # save_adapter and merge_and_unload after FSDP training.
    assert load_file(straight / "adapter" / "adapter_model.safetensors").keys() == saved.keys()
    for rec in (rec0, rec1):
        checks = rec["checks"]
        assert checks["gathered_vs_sharded"] == 0.0
        assert checks["merged_vs_sharded"] < 1e-5 * max(1.0, checks["logits_scale"])
        assert checks["merged_has_no_4bit"]
        # Bad input: clear errors naming what to set.
        assert "quant_storage=torch.float32" in checks["uint8_storage"]
        assert "bits=4" in checks["eight_bit"]
        assert "one dtype" in checks["mixed_dtypes"] and "torch.bfloat16" in checks["mixed_dtypes"]
        assert "drops an FSDP plugin on CPU" in checks["trainer_fsdp_request"]
        assert "prepare_model(..., fsdp=True)" in checks["trainer_fsdp_request"]

    # A rank that dies mid-run (rank 1 exits at step 4) loses nothing: the run resumes from checkpoint-2
    # and ends exactly where the straight run ended.
    died = _fsdp_run("die", crashed, base)
    assert died.returncode != 0
    assert sorted(p.name for p in (crashed / "run").iterdir()) == ["checkpoint-2"]
    _ok(_fsdp_run("resume", crashed, base))
    resumed, resumed_lora = _record(crashed, "resume", 0)
    # The log history holds steps 1-2 from checkpoint-2 and steps 3-4 trained after the resume.
    assert len(resumed["losses"]) == steps
    assert all(abs(a - b) < 1e-6 for a, b in zip(resumed["losses"], rec0["losses"])), resumed["losses"]
    assert resumed["batches"][:2] == rec0["batches"][2:4]  # it went on from step 3, not from scratch
    for k in lora0:
        assert torch.allclose(resumed_lora[k], lora0[k], rtol=0, atol=1e-6), k


def test_fsdp_without_torch_distributed_says_how_to_launch():
    import torch.distributed as dist

    from hf_peft_plugin import LoraConfig, ShardingError, prepare_model

    from tiny_models import tiny_llama

    assert not dist.is_initialized()
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShardingError, match="torchrun --nproc_per_node"):
        prepare_model(model, bits=4, lora=LoraConfig(r=2), fsdp=True)
    after = model.state_dict()  # refused before quantizing: the model is as it was
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_planner_gives_per_rank_figures_for_fsdp(tmp_path, capsys):
    from hf_peft_plugin import LoraConfig, estimate_memory
    from hf_peft_plugin.cli import main

    from tiny_models import tiny_llama

    config = tiny_llama().config
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    common = dict(lora=lora, device="cpu", batch_size=2, seq_len=16)
    one = estimate_memory(config, **common)
    ddp = estimate_memory(config, **common, num_processes=4)
    four = estimate_memory(config, **common, num_processes=4, fsdp=True)
    assert ddp.total_bytes == one.total_bytes  # DDP: every rank holds everything
    # 2 blocks of q, k, v, o, gate, up, down at half a byte per weight; 1/4 of that stays per rank
    packed = 2 * sum(i * o // 2 for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)])
    assert one.quantized_weights_bytes - four.quantized_weights_bytes == packed - packed // 4
    assert four.unquantized_weights_bytes * 4 >= one.unquantized_weights_bytes > four.unquantized_weights_bytes * 3
    assert four.trainable_bytes == one.trainable_bytes and four.optimizer_bytes == one.optimizer_bytes
    assert 0 < four.fsdp_gather_bytes and four.total_bytes < one.total_bytes

    config.save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--rank", "2", "--device", "cpu", "--seq-len", "16", "--num-processes", "4", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 4 (FSDP, base sharded)" in out and "total per rank" in out


def test_merging_a_sharded_model_says_to_unshard_it_first():
    from hf_peft_plugin import LoraConfig, ShardingError, merge_adapters, merge_and_unload, prepare_model

    from tiny_models import tiny_llama

    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=2), quant_storage=torch.float32)
    model._hf_peft_plugin_fsdp = "sharded"  # what shard_model marks (sharding itself needs 2 processes)
    for merge in (merge_and_unload, merge_adapters):
        with pytest.raises(ShardingError, match=r"unshard_model\(model\) on every rank"):
            merge(model)
    assert any(hasattr(m, "quant_state") for m in model.modules())  # left as it was


def test_streaming_into_shards_reads_nothing_up_front_draws_no_randomness_and_says_when_it_cannot(tmp_path, caplog):
    """What decides between streaming a checkpoint into shards and loading it whole (one process)."""
    import logging

    import transformers

    from hf_peft_plugin.sharded_loading import checkpoint_files, streamable

    from tiny_models import tiny_llama

    tied = tmp_path / "tied"
    tiny_llama(tie_word_embeddings=True).save_pretrained(tied)
    auto = transformers.AutoModelForCausalLM
    before = torch.random.get_rng_state()
    found = streamable(str(tied), auto, torch.float32, {})
    assert torch.equal(torch.random.get_rng_state(), before)  # adapters initialised next come out the same
    skeleton, files = found
    assert all(t.device.type == "meta" for t in skeleton.state_dict(keep_vars=True).values())
    assert "lm_head.weight" not in files and skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    assert not skeleton.training  # eval mode, as from_pretrained returns a model

    # Sharded checkpoints are found through their index.
    split = tmp_path / "split"
    tiny_llama().save_pretrained(split, max_shard_size="40KB")
    assert (split / "model.safetensors.index.json").exists()
    assert len(set(checkpoint_files(str(split)).values())) > 1 and streamable(str(split), auto, torch.float32, {})

    # Where it cannot stream, it says why and prepare_model loads the model whole.
    no_safetensors = tmp_path / "bin"
    tiny_llama().save_pretrained(no_safetensors)
    (no_safetensors / "model.safetensors").rename(no_safetensors / "pytorch_model.bin")  # name only: never read
    renamed = tmp_path / "renamed"
    tiny_llama().save_pretrained(renamed)
    from safetensors.torch import load_file, save_file

    weights = load_file(renamed / "model.safetensors")
    save_file({k.replace("model.", "transformer.", 1): v for k, v in weights.items()}, renamed / "model.safetensors")
    cases = {
        str(no_safetensors): "neither a local folder nor a Hub repository of safetensors",
        str(tmp_path / "no-such-folder"): "neither a local folder nor a Hub repository of safetensors",
        str(renamed): "do not hold ['model.embed_tokens.weight'",
    }
    for path, why in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_peft_plugin.sharded_loading"):
            assert streamable(path, auto, torch.float32, {}) is None
        assert why in caplog.text and "Loading the whole model on each rank" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_peft_plugin.sharded_loading"):
        assert streamable(str(tied), auto, torch.float32, {"device_map": "auto"}) is None
    assert "arguments streaming does not take (['device_map'])" in caplog.text


def test_a_hub_id_is_streamed_from_the_hub_cache(local_hub, hub_api, tmp_path):
    """prepare_model("org/name", fsdp=True): config and safetensors fetched once into the cache,
    the adapter's config naming the id, not the cache folder."""
    import transformers

    from hf_peft_plugin.sharded_loading import streamable

    from tiny_models import tiny_llama

    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    (folder / "README.md").write_text("not needed to load")
    hub_api.create_repo("alice/tiny-llama")
    hub_api.upload_folder(repo_id="alice/tiny-llama", folder_path=folder)
    skeleton, files = streamable("alice/tiny-llama", transformers.AutoModelForCausalLM, torch.float32, {"revision": "main"})
    assert skeleton.config._name_or_path == "alice/tiny-llama"
    snapshot = Path(next(iter(files.values()))).parent
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert str(snapshot).startswith(str(tmp_path / "hf_home"))  # the Hub cache, not the working folder
