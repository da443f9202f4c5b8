"""AdapterCallback with an unchanged transformers.Trainer: checkpoints, resume, best model, pushes, logs."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load, load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import hf_peft_plugin.callback as callback_module
from hf_peft_plugin import ConfigError, HubPushError, LoraConfig, PromptTuningConfig, prepare_model
from hf_peft_plugin.callback import AdapterCallback
from hf_peft_plugin.checkpoints import (
    CHECKPOINT_FOLDER_KEY,
    TRAINABLE_ONLY_MARKER,
    enable_trainable_checkpoint_loading,
    save_trainable_weights,
)

from tiny_models import CopyTaskDataset, FirstPushStarts, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

REPO = "alice/tiny-run"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def model_with(method: str = "lora") -> torch.nn.Module:
    torch.manual_seed(0)
    if method == "prompt":
        return prepare_model(tiny_llama(), bits=4, prompt=PromptTuningConfig(num_virtual_tokens=4))
    return prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))


def arguments(out: Path, max_steps: int = 4, **overrides) -> TrainingArguments:
    kwargs = dict(
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
    )
    return TrainingArguments(str(out), **{**kwargs, **overrides})


def trainer(model, args, *callbacks, **kwargs) -> Trainer:
    return Trainer(model=model, args=args, train_dataset=CopyTaskDataset(32), callbacks=list(callbacks), **kwargs)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def base_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


class StopAt(TrainerCallback):
    """Stops a run after ``step`` as if it had been killed right after that checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def trainer_log(caplog):
    """caplog that also sees transformers' loggers (they do not propagate to the root logger)."""
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="transformers")
    yield caplog
    transformers_logger.removeHandler(caplog.handler)


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoints_and_save_model_write_no_base_weights(tmp_path, monkeypatch):
    """Every tensor serialised during training is recorded: none may be a base weight, even briefly."""
    written: list[tuple[str, str, torch.Tensor]] = []  # (writer, tensor name, tensor)

    def spy(writer, real):
        def wrapper(obj, *args, **kwargs):
            tensors = obj.items() if isinstance(obj, dict) else [("<object>", obj)]
            written.extend((writer, name, t) for name, t in _tensors(tensors))
            return real(obj, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(safetensors.torch, "save_file", spy("safetensors", safetensors.torch.save_file))
    monkeypatch.setattr(safetensors.torch, "save", spy("safetensors", safetensors.torch.save))
    monkeypatch.setattr(torch, "save", spy("torch.save", torch.save))

    model = model_with()
    adapter = trainable(model)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    t = trainer(model, arguments(tmp_path), AdapterCallback())
    t.train()
    t.save_model(str(tmp_path / "final"))

    assert {name for writer, name, _ in written if writer == "safetensors"} == {
        *(f"base_model.model.{n.replace('.default', '')}" for n in adapter),  # the PEFT-format adapter file
        *adapter,  # model.safetensors: the same tensors under the model's own names
        TRAINABLE_ONLY_MARKER,
        CHECKPOINT_FOLDER_KEY,
    }
    # torch.save writes the optimizer (Adam moments shaped like the trainable tensors, 0-d steps),
    # the scheduler, the RNG states (1-D uint8) and the arguments: nothing shaped like a base weight.
    shapes = {tuple(t.shape) for t in adapter.values()}
    saved = [t for writer, _, t in written if writer == "torch.save"]
    assert saved and all(t.dim() == 0 or tuple(t.shape) in shapes or _is_rng_state(t) for t in saved)
    assert not shapes & {tuple(p.shape) for p in model.parameters() if not p.requires_grad}
    assert sum(t.numel() * t.element_size() for t in saved) < 4 * adapter_bytes + 2 * 8 * 1024

    for step in (2, 4):
        files = {p.name: p.stat().st_size for p in (tmp_path / f"checkpoint-{step}").iterdir()}
        assert set(files) == ADAPTER_FILES | TRAINER_FILES | {"model.safetensors"}
        assert sum(files.values()) < base_bytes(model) / 2
    assert {p.name for p in (tmp_path / "final").iterdir()} == ADAPTER_FILES | {"training_args.bin"}


def _is_rng_state(t: torch.Tensor) -> bool:
    return t.dtype == torch.uint8 and t.dim() == 1  # packed 4-bit weights are uint8 too, but 2-D


def _tensors(items):
    for name, value in items:
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, dict):
            yield from _tensors(value.items())
        elif isinstance(value, (list, tuple)):
            yield from _tensors((name, v) for v in value)


def test_trainable_weights_file_loads_quietly_only_with_its_marker(tmp_path):
    trained = model_with()
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(1.0)
    save_trainable_weights(trained, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    unhooked = model_with().load_state_dict(tensors, strict=False)
    assert set(unhooked.unexpected_keys) == {TRAINABLE_ONLY_MARKER, CHECKPOINT_FOLDER_KEY}
    assert len(unhooked.missing_keys) > 20

    model = model_with()
    enable_trainable_checkpoint_loading(model)
    enable_trainable_checkpoint_loading(model)  # idempotent
    hooked = model.load_state_dict(tensors, strict=False)
    assert hooked.missing_keys == [] and hooked.unexpected_keys == []
    a, b = trainable(trained), trainable(model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    partial = {k: v for k, v in tensors.items() if not k.startswith("_hf_peft_plugin")}  # other loads: unchanged
    assert len(model.load_state_dict(partial, strict=False).missing_keys) > 20
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(partial)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, trainer_log):
    """2k steps straight vs k, resume, k: bitwise equal (torch.equal) adapter, Adam state and step.

    Exact equality is expected and required: both runs execute the same float32 CPU kernels on the
    same batches in the same order, so any difference means something was not restored."""
    straight = trainer(model_with(), arguments(tmp_path / "straight"), AdapterCallback())
    straight.train()

    interrupted = tmp_path / "interrupted"
    trainer(model_with(), arguments(interrupted), AdapterCallback(), StopAt(2)).train()
    assert [p.name for p in interrupted.iterdir()] == ["checkpoint-2"]
    trainer_log.clear()
    resumed_model = model_with()
    resumed = trainer(resumed_model, arguments(interrupted), AdapterCallback())
    resumed.train(resume_from_checkpoint=True)

    assert resumed.state.global_step == straight.state.global_step == 4
    a, b = trainable(straight.model), trainable(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert len(sa) == len(a) and sa.keys() == sb.keys()
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert straight.lr_scheduler.state_dict() == resumed.lr_scheduler.state_dict()
    assert "Loading model from" in trainer_log.text and "missing keys" not in trainer_log.text
    assert "unexpected keys" not in trainer_log.text


class BestAt(TrainerCallback):
    """Adds ``eval_score``, highest at ``step``: the best checkpoint is known in advance (not the last)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_score"] = float(state.global_step == self.step)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_load_best_model_at_end_restores_the_best_adapter(method, tmp_path, trainer_log):
    args = arguments(
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
    )
    model = model_with(method)
    t = trainer(model, args, AdapterCallback(), BestAt(4), eval_dataset=CopyTaskDataset(8))
    t.train()

    assert t.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    saved = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    now = model.get_adapter_state_dict()
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
    assert not all(torch.equal(now[k], last[k]) for k in saved)
    assert "missing keys" not in trainer_log.text and "Loading best model from" in trainer_log.text


def test_callback_needs_a_prepared_model(tmp_path):
    with pytest.raises(TypeError, match="prepare_model"):
        trainer(tiny_llama(), arguments(tmp_path), AdapterCallback())


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="hub_strategy must be one of"):
        AdapterCallback(REPO, hub_strategy="all_checkpoints")
    with pytest.raises(ConfigError, match="needs push_to_hub"):
        AdapterCallback(hub_strategy="every_save")
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        AdapterCallback("a/b/c")


# -- logs ----------------------------------------------------------------------------------------


def test_logs_trainable_parameters_and_peak_memory(tmp_path, trainer_log):
    model = model_with()
    t = trainer(model, arguments(tmp_path, max_steps=3, save_strategy="no"), AdapterCallback())
    t.train()
    losses = [e for e in t.state.log_history if "loss" in e]
    assert len(losses) == 3
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert losses[0]["trainable_params"] == n and losses[0]["all_params"] > 10 * n
    assert 0 < losses[0]["trainable_percent"] < 10
    assert "trainable_params" not in losses[1]
    assert all(e["peak_rss_mib"] > 50 for e in losses)  # the process holds torch: tens of MiB at least
    assert f"trainable params: {n:,}" in trainer_log.text


# -- pushes --------------------------------------------------------------------------------------


def hub_tensors(hub, path: str = "adapter_model.safetensors", repo: str = REPO) -> dict[str, torch.Tensor]:
    return load(hub.files(repo)[path])


def assert_pushed_final_adapter(hub, model):
    now, pushed = model.get_adapter_state_dict(), hub_tensors(hub)
    assert now.keys() == pushed.keys() and all(torch.equal(now[k], pushed[k]) for k in now)


def our_commits(hub, repo: str = REPO) -> list[str]:
    return [c.title for c in hub.commits(repo)][1:]  # without the Hub's "initial commit"


def test_push_at_end_only_once_to_a_private_repo(local_hub, tmp_path):
    model = model_with()
    cb = AdapterCallback(REPO, token="hf_write_alice")
    trainer(model, arguments(tmp_path), cb).train()
    assert our_commits(local_hub) == ["End of training, step 4"]
    assert local_hub.is_private(REPO) and cb.push_error is None
    assert set(local_hub.files(REPO)) == {".gitattributes", "README.md", *ADAPTER_FILES}
    assert_pushed_final_adapter(local_hub, model)
    readme = local_hub.files(REPO)["README.md"].decode()
    assert "| loss |" in readme and "| step | `4` |" in readme  # last training metrics


def test_push_every_save_then_the_final_adapter(local_hub, tmp_path, monkeypatch):
    model = model_with()
    gate = FirstPushStarts()
    monkeypatch.setattr(callback_module, "upload_staged", gate.watch(callback_module.upload_staged))
    trainer(
        model, arguments(tmp_path), gate, AdapterCallback(REPO, hub_strategy="every_save", token="hf_write_alice")
    ).train()
    commits = our_commits(local_hub)
    # A push still queued when a newer one comes is dropped, so step 4's may give way to the final one.
    assert commits[0] == "Training in progress, step 2" and commits[-1] == "End of training, step 4"
    assert set(commits[1:-1]) <= {"Training in progress, step 4"}
    assert_pushed_final_adapter(local_hub, model)
    assert not any(p.startswith(("model.", "optimizer", "last-checkpoint")) for p in local_hub.files(REPO))


def test_push_checkpoint_uploads_a_resumable_checkpoint(local_hub, tmp_path):
    local_hub.seed(REPO, {"last-checkpoint/stale.txt": "from an older run"}, author="alice")
    cb = AdapterCallback(REPO, hub_strategy="checkpoint")  # the token comes from TrainingArguments.hub_token
    trainer(model_with(), arguments(tmp_path, hub_token="hf_write_alice"), cb).train()
    assert cb.push_error is None
    files = local_hub.files(REPO)
    in_checkpoint = {p.removeprefix("last-checkpoint/") for p in files if p.startswith("last-checkpoint/")}
    assert in_checkpoint == ADAPTER_FILES | (TRAINER_FILES - {"training_args.bin"}) | {"model.safetensors"}
    assert b'"global_step": 4' in files["last-checkpoint/trainer_state.json"]
    assert all(b"hf_write_alice" not in content for content in files.values())
    pushed = load(files["last-checkpoint/model.safetensors"])
    assert set(pushed) == set(load_file(tmp_path / "checkpoint-4" / "model.safetensors"))


def test_pushes_never_block_training_and_run_in_order(local_hub, tmp_path, monkeypatch, caplog):
    """The first upload hangs until training is over: every step still runs, the queued step-4 push
    is replaced by the final one, and on_train_end waits for both."""
    release, uploads = threading.Event(), []
    real_upload = callback_module.upload_staged

    def slow_upload(staged, **kwargs):
        uploads.append(kwargs["commit_message"])
        if len(uploads) == 1:
            assert release.wait(timeout=60)
        return real_upload(staged, **kwargs)

    gate = FirstPushStarts()  # step 3 begins only once the first upload is under way
    monkeypatch.setattr(callback_module, "upload_staged", gate.watch(slow_upload))
    steps_during_upload = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if uploads and not release.is_set():
                steps_during_upload.append(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            release.set()  # runs before AdapterCallback.on_train_end, which waits for the uploads

    caplog.set_level(logging.INFO, logger="hf_peft_plugin")
    model = model_with()
    args = arguments(tmp_path, max_steps=6)
    trainer(model, args, gate, Watch(), AdapterCallback(REPO, hub_strategy="every_save", token="hf_write_alice")).train()
    assert steps_during_upload == [3, 4, 5, 6]
    assert uploads == ["Training in progress, step 2", "End of training, step 6"]
    assert our_commits(local_hub) == uploads and "dropped a push that had not started" in caplog.text
    assert_pushed_final_adapter(local_hub, model)


def test_failed_pushes_are_logged_and_training_carries_on(local_hub, tmp_path, caplog):
    local_hub.go_down()
    caplog.set_level(logging.DEBUG)
    cb = AdapterCallback(REPO, hub_strategy="every_save", token="hf_write_alice")
    t = trainer(model_with(), arguments(tmp_path), cb)
    t.train()
    assert t.state.global_step == 4
    assert "a push failed; training goes on" in caplog.text and "Could not reach the Hub" in caplog.text
    assert isinstance(cb.push_error, HubPushError)
    kept = Path(caplog.text.split("The adapter is kept in ")[1].split(";")[0])
    assert ADAPTER_FILES <= {p.name for p in kept.iterdir()}  # the unpushed final adapter, not lost
    assert "hf_write_alice" not in caplog.text
    local_hub.come_back()
    assert not local_hub.repo_exists(REPO)


def test_trainers_own_push_uploads_the_adapter_and_callback_does_not_push(local_hub, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hf_peft_plugin")
    args = arguments(tmp_path, push_to_hub=True, hub_model_id="alice/trainer-push", hub_token="hf_write_alice")
    model = model_with()
    t = trainer(model, args, AdapterCallback(REPO, token="hf_write_alice"))
    t.train()
    t.push_to_hub()
    assert "will not push as well" in caplog.text and not local_hub.repo_exists(REPO)
    files = local_hub.files("alice/trainer-push")
    assert set(files) <= {".gitattributes", "README.md", "training_args.bin", *ADAPTER_FILES}
    assert ADAPTER_FILES <= set(files)
    assert_pushed_final_adapter_to(files, model)
    big = {p: len(c) for p, c in files.items() if p != "adapter_model.safetensors" and len(c) > 20_000}
    assert not big


def assert_pushed_final_adapter_to(files, model):
    now, pushed = model.get_adapter_state_dict(), load(files["adapter_model.safetensors"])
    assert now.keys() == pushed.keys() and all(torch.equal(now[k], pushed[k]) for k in now)


def test_connection_dropped_mid_upload_is_a_hub_push_error_and_training_finishes(
    local_hub, tmp_path, caplog, monkeypatch
):
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))  # where the callback stages its pushes
    local_hub.drop_next("/__lfs__/", times=-1)  # every upload of the weights loses its connection
    caplog.set_level(logging.INFO, logger="hf_peft_plugin")
    cb = AdapterCallback(REPO, hub_strategy="every_save", token="hf_write_alice")
    t = trainer(model_with(), arguments(tmp_path / "out"), cb)
    t.train()
    assert t.state.global_step == 4
    assert isinstance(cb.push_error, HubPushError) and "Could not reach the Hub" in str(cb.push_error)
    assert "unexpectedly" not in caplog.text and "a push failed; training goes on" in caplog.text
    kept = Path(caplog.text.split("The adapter is kept in ")[1].split(";")[0])
    assert [p for p in staging.iterdir() if p.name.startswith("hf-peft-plugin-push-")] == [kept]  # others removed
    assert ADAPTER_FILES <= {p.name for p in kept.iterdir()}
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / "out" / "checkpoint-4").iterdir()}  # local files intact
    assert our_commits(local_hub) == []
