"""Fault injection: kill -9 and concurrent writers while adapters and Trainer checkpoints are saved.

Children are forked from the test process (torch, transformers and the models are already loaded,
so a child starts in milliseconds) and killed with SIGKILL, which no Python code can intercept.
Saving is byte-for-byte deterministic, so "the old or the new adapter, never a mix" is checked by
comparing every file of a folder with the two versions saved on their own.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
import traceback
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import TrainerState

from hf_peft_plugin import AdapterCallback, AdapterLoadError, LoraConfig, PromptTuningConfig, add_adapter, prepare_model
from hf_peft_plugin import atomic
from hf_peft_plugin.loading import load_adapter
from hf_peft_plugin.saving import save_adapter

from tiny_models import CopyTaskDataset, perturb_trainable, tiny_llama

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning"),
]


@pytest.fixture(autouse=True)
def one_thread_no_fsync(monkeypatch):
    """One thread for the tiny matmuls; no fsync: it guards against power loss, not kill -9 (the
    kernel keeps a killed process's writes), and takes most of a save's time on this disk."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    yield
    torch.set_num_threads(threads)


def two_adapter_model(rank: int, seed: int, alpha: float | None = None) -> torch.nn.Module:
    """``default`` (LoRA + soft prompt: four files, peft's pair and the extras) and ``fr`` (a sub-folder)."""
    lora = LoraConfig(r=rank, alpha=alpha or 2 * rank)
    model = prepare_model(tiny_llama(), bits=None, lora=lora, prompt=PromptTuningConfig(num_virtual_tokens=2))
    add_adapter(model, "fr", lora=LoraConfig(r=rank, target_modules=["q_proj"]))
    return perturb_trainable(model, seed)


def visible_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    }


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if atomic.is_temporary(p.name)]


def split(files: dict[str, bytes], sub: str | None) -> dict[str, bytes]:
    """The files of one adapter folder: the root's own (``sub=None``) or those of ``sub/``."""
    if sub is None:
        return {k: v for k, v in files.items() if "/" not in k}
    return {k: v for k, v in files.items() if k.startswith(sub + "/")}


def fork(work) -> int:
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            work()
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    return pid


def check_each_folder_is_one_version(folder: Path, versions: list[dict[str, bytes]]) -> list[int]:
    """Load every adapter folder (which finishes an interrupted save), then compare its bytes."""
    load_adapter(tiny_llama(), folder, strict=True)  # strict: a config/weights mix would raise
    load_adapter(tiny_llama(), folder, subfolder="fr", adapter_name="fr", strict=True)
    now = visible_files(folder)
    which = []
    for sub in (None, "fr"):
        matches = [i for i, v in enumerate(versions) if split(v, sub) == split(now, sub)]
        assert matches, f"{sub or 'default'} is a mix of saves: {sorted(split(now, sub))}"
        which.append(matches[0])
    return which


@pytest.mark.parametrize("same_config", [True, False], ids=["same-config", "other-rank"])
def test_kill_9_during_save_leaves_the_old_or_the_new_adapter(same_config, tmp_path):
    old, new = two_adapter_model(4, seed=1), two_adapter_model(4 if same_config else 8, seed=2)
    versions = []
    for i, model in enumerate((old, new)):
        save_adapter(model, tmp_path / f"ref{i}")
        versions.append(visible_files(tmp_path / f"ref{i}"))
    folder = tmp_path / "adapter"
    save_adapter(old, folder)
    rng = random.Random(0)
    interrupted = kills = 0
    # Kills that land between two saves prove nothing; keep going until 5 landed inside one (how
    # many that takes depends on the machine's speed), within a bound that still ends the test.
    while (kills < 20 or interrupted < 5) and kills < 200:
        kills += 1
        read, write = os.pipe()

        def keep_saving():
            os.write(write, b"x")
            for i in range(10_000):
                save_adapter((new, old)[i % 2], folder)

        pid = fork(keep_saving)
        os.read(read, 1)
        time.sleep(rng.uniform(0, 0.06))  # a save takes ~5-20 ms here: kills land anywhere in it
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read), os.close(write)
        interrupted += bool(leftovers(folder))  # killed inside a save, not between two
        check_each_folder_is_one_version(folder, versions)
        save_adapter(old, folder)
        assert leftovers(folder) == []  # the next save removed every orphan
    assert interrupted >= 5, f"only {interrupted} of {kills} kills landed inside a save"


def test_two_concurrent_writers_never_mix(tmp_path):
    a, b = two_adapter_model(4, seed=1), two_adapter_model(8, seed=2)
    versions = []
    for i, model in enumerate((a, b)):
        save_adapter(model, tmp_path / f"ref{i}")
        versions.append(visible_files(tmp_path / f"ref{i}"))
    folder = tmp_path / "adapter"
    for trial in range(20):
        pids = [fork(lambda m=m: [save_adapter(m, folder) for _ in range(2)]) for m in (a, b)]
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
        assert statuses == [0, 0]
        check_each_folder_is_one_version(folder, versions)
        assert leftovers(folder) == []


def test_a_config_from_another_save_is_caught_on_load(tmp_path):
    """What a writer that does not take the lock (peft, a copy by hand) can still produce: the same
    rank, so the shapes fit, but twice the scaling."""
    a, b = two_adapter_model(4, seed=1, alpha=8), two_adapter_model(4, seed=2, alpha=16)
    save_adapter(a, tmp_path / "a")
    save_adapter(b, tmp_path / "b")
    (tmp_path / "a" / "adapter_config.json").write_bytes((tmp_path / "b" / "adapter_config.json").read_bytes())
    with pytest.raises(AdapterLoadError, match="not the config that was saved with adapter_model.safetensors"):
        load_adapter(tiny_llama(), tmp_path / "a", strict=True)


# -- Trainer checkpoints ---------------------------------------------------------------------------


def training_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))


def run(out: Path, model: torch.nn.Module) -> Trainer:
    args = TrainingArguments(
        str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2, report_to=[],
        use_cpu=True, disable_tqdm=True, seed=7, logging_steps=10,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=CopyTaskDataset(32), callbacks=[AdapterCallback()])


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def kill_self_at_step_4(where: str):
    """Patch ``where`` so the process SIGKILLs itself there while checkpoint-4 is being saved."""

    def at_checkpoint_4(path) -> bool:
        return "checkpoint-4" in str(path)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "writing the adapter files":
        real = atomic._write_bytes
        atomic._write_bytes = lambda p, d: die() if at_checkpoint_4(p) and p.name.startswith(".adapter_model") else real(p, d)
    elif where == "after the commit, before the renames":
        real_apply = atomic._apply
        atomic._apply = lambda d, j: die() if at_checkpoint_4(d) else real_apply(d, j)
    elif where == "before the optimizer state":
        real_opt = Trainer._save_optimizer_and_scheduler
        Trainer._save_optimizer_and_scheduler = lambda self, d: die() if at_checkpoint_4(d) else real_opt(self, d)
    elif where == "writing trainer_state.json":
        real_state = TrainerState.save_to_json

        def half_then_die(self, path):
            if at_checkpoint_4(path):
                Path(path).write_text('{\n  "best_global_step": null,\n  "best_met')  # cut short
                die()
            real_state(self, path)

        TrainerState.save_to_json = half_then_die
    elif where == "after the Trainer's save, before on_save":
        real_on_save = AdapterCallback.on_save
        AdapterCallback.on_save = lambda self, args, state, *a, **k: (
            die() if state.global_step == 4 else real_on_save(self, args, state, *a, **k)
        )


KILL_POINTS = [
    "writing the adapter files",
    "after the commit, before the renames",
    "before the optimizer state",
    "writing trainer_state.json",
    "after the Trainer's save, before on_save",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    # Module-scoped, so built before the per-test one-thread setting: set it here too, so the
    # reference trains with the thread count the killed and resumed runs use.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = run(tmp_path_factory.mktemp("straight"), training_model())
        t.train()
    finally:
        torch.set_num_threads(threads)
    return trainable(t.model)


@pytest.mark.parametrize("where", KILL_POINTS)
def test_kill_9_during_a_checkpoint_then_resume(where, tmp_path, uninterrupted):
    out = tmp_path / "run"

    def train_until_killed():
        kill_self_at_step_4(where)
        run(out, training_model()).train()

    pid = fork(train_until_killed)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert (out / "checkpoint-4").is_dir()

    resumed = run(out, training_model())
    try:
        resumed.train(resume_from_checkpoint=True)
    except AdapterLoadError as exc:  # the newest checkpoint is incomplete: the error says which one to use
        message = str(exc)
        assert "checkpoint-4 is incomplete" in message and str(out / "checkpoint-2") in message
        assert where != "after the Trainer's save, before on_save"  # that checkpoint is complete
        resumed = run(out, training_model())
        resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert resumed.state.global_step == 6
    final = trainable(resumed.model)
    assert final.keys() == uninterrupted.keys() and all(torch.equal(final[k], uninterrupted[k]) for k in final)


def test_kill_9_at_random_moments_of_a_run_then_resume(tmp_path, uninterrupted):
    rng = random.Random(1)
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        pid = fork(lambda: run(out, training_model()).train())
        deadline = time.monotonic() + 60
        while not (out / "checkpoint-2").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        resumed = run(out, training_model())
        newest = max(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), default=None)
        if newest is not None and not (newest / "model.safetensors").exists():
            # Killed after the Trainer made the folder and before save_pretrained's first file: no file of
            # ours is there yet, and transformers itself refuses it, naming the folder. Known window
            # (closing note of issue 14); the user deletes that folder, as its message implies.
            with pytest.raises(ValueError, match=f"Can't find a valid checkpoint at {newest}"):
                resumed.train(resume_from_checkpoint=True)
            shutil.rmtree(newest)
            resumed = run(out, training_model())
        try:
            resumed.train(resume_from_checkpoint=True if any(out.glob("checkpoint-*")) else None)
        except AdapterLoadError as exc:
            resumed = run(out, training_model())
            if "no complete checkpoint" in str(exc):
                resumed.train()  # killed while saving the first one: start again
            else:
                resumed.train(resume_from_checkpoint=str(exc).split("resume_from_checkpoint=")[1].split("'")[1])
        final = trainable(resumed.model)
        assert all(torch.equal(final[k], uninterrupted[k]) for k in final)
