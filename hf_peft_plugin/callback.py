"""``AdapterCallback``: what an unchanged ``transformers.Trainer`` needs to train a prepared model.

Checkpoints. The model's ``save_pretrained`` (see :mod:`~hf_peft_plugin.adapter_class`) makes
every ``checkpoint-N/`` hold the adapter files instead of base weights, plus the
``model.safetensors`` of trainable tensors that the Trainer's resume and best-model restore read
(see :mod:`~hf_peft_plugin.checkpoints`). The callback hooks the model so that loading that file
does not warn about the frozen base keys, and refuses a checkpoint whose save was interrupted,
naming the last complete one. The Trainer then restores the adapter itself, at the points where it
restores full models (before the optimizer state on resume; before ``on_train_end`` for the best
model), for LoRA, soft prompts and bottleneck adapters alike.

Pushes (``push_to_hub="user/repo"``) are staged on the training thread (the adapter is written to a
temporary folder, which takes as long as a checkpoint of it) and uploaded by one background thread.
A push that has not started when a newer one arrives is dropped: only the latest state matters. A
failed push is logged with its reason and training goes on. ``on_train_end`` pushes the final
adapter (the best one with ``load_best_model_at_end``), waits for the uploads, and if the final
push failed logs an error naming the folder that keeps the unpushed adapter; the error is also in
:attr:`AdapterCallback.push_error`. It does not raise: ``trainer.train()`` returning lets the rest of
the script (``save_model``, evaluation) run, and nothing is lost.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoints import (
    TRAINABLE_WEIGHTS_NAME,
    enable_trainable_checkpoint_loading,
    save_trainable_weights,
    write_resume_file_after_push,
)
from .errors import ConfigError, HubPushError
from .fsdp import check_trainer_fsdp_request
from .hub import HUB_CHECKPOINT_FOLDER, StagedAdapter, check_repo_id, stage_adapter, upload_staged
from .model import trainable_parameters
from .state import require_state
from .trl_support import restore_adapter_dtypes

try:
    import resource
except ImportError:  # Windows
    resource = None

logger = logging.getLogger(__name__)

HubStrategy = Literal["end", "every_save", "checkpoint"]
HUB_STRATEGIES = ("end", "every_save", "checkpoint")

#: Checkpoint files never uploaded: the pickled TrainingArguments may hold ``hub_token``.
_NEVER_UPLOADED = ("training_args.bin",)


# -- logging -------------------------------------------------------------------------------------


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory so far: allocated on the accelerator, else the process's resident set (MiB).

    Peaks are read, never reset, so the Trainer's own memory metrics stay correct.
    """
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and hasattr(backend, "max_memory_allocated"):
        return {"peak_accelerator_memory_mib": round(backend.max_memory_allocated(device) / 2**20, 1)}
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    else:
        import psutil  # an accelerate dependency

        peak = psutil.Process().memory_info().peak_wset
    return {"peak_rss_mib": round(peak / 2**20, 1)}


def last_metrics(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The latest training loss and evaluation metrics in the Trainer's log history (for the card)."""
    metrics: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            wanted = key in ("loss", "train_loss", "epoch", "step") or (
                key.startswith("eval_") and not key.endswith(("_runtime", "_per_second"))
            )
            if wanted and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[key] = value
    return metrics


# -- the callback --------------------------------------------------------------------------------


class AdapterCallback(TrainerCallback):
    """Adapter-only checkpoints that resume, best-adapter restore, Hub pushes and extra logs.

    Pass it when building the Trainer (``Trainer(..., callbacks=[AdapterCallback()])``) with a model
    from :func:`~hf_peft_plugin.prepare_model`: it hooks the model in ``on_init_end``, before
    ``train(resume_from_checkpoint=...)`` reads a checkpoint.

    ``push_to_hub``: repo id to push the adapter to (``None``: no pushes). ``hub_strategy``:
    ``"end"`` pushes once, after training; ``"every_save"`` also at every checkpoint; ``"checkpoint"``
    also uploads the latest resumable checkpoint (adapter, optimizer, scheduler, RNG and trainer
    state; never ``training_args.bin``) to ``last-checkpoint/``. ``private`` applies when the repo is
    created; ``token=None`` takes ``TrainingArguments.hub_token``, else the logged-in token. Pushes
    run on the main process only. ``restore_adapter_dtype``: TRL's trainers cast the adapter to bf16
    for a 4/8-bit model in their ``__init__`` (see :mod:`~hf_peft_plugin.trl_support`); the callback
    casts it back to float32 at ``on_init_end``, before the optimizer exists (``False`` keeps TRL's
    cast). With ``TrainingArguments(push_to_hub=True)`` the Trainer pushes
    (the adapter only, through the model's ``save_pretrained``) and this callback does not, so
    nothing is pushed twice.

    Logs: ``trainable_params``/``all_params``/``trainable_percent`` with the first log after train
    begin, and ``peak_accelerator_memory_mib`` (``peak_rss_mib`` on CPU) with every log. They reach
    the console and ``trainer.state.log_history``; reporting integrations (``report_to``) run before
    user callbacks and do not see them.
    """

    def __init__(
        self,
        push_to_hub: str | None = None,
        *,
        hub_strategy: HubStrategy = "end",
        private: bool = True,
        token: str | None = None,
        revision: str = "main",
        endpoint: str | None = None,
        log_memory: bool = True,
        restore_adapter_dtype: bool = True,
    ) -> None:
        if hub_strategy not in HUB_STRATEGIES:
            raise ConfigError(f"hub_strategy must be one of {HUB_STRATEGIES}; got {hub_strategy!r}.")
        if push_to_hub is not None:
            check_repo_id(push_to_hub)
        elif hub_strategy != "end":
            raise ConfigError(f"hub_strategy={hub_strategy!r} needs push_to_hub='user/repo' to push to.")
        self.repo_id = push_to_hub
        self.hub_strategy = hub_strategy
        self.private = private
        self.token = token
        self.revision = revision
        self.endpoint = endpoint
        self.log_memory = log_memory
        self.restore_adapter_dtype = restore_adapter_dtype
        #: The error of the final push, if it failed (earlier failures are only logged).
        self.push_error: HubPushError | None = None
        self._pushing = push_to_hub is not None
        self._first_log: dict[str, float] = {}
        self._pusher: _BackgroundPusher | None = None
        self._last_checkpoint: Path | None = None
        self._token: str | None = None

    # -- events ---------------------------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if kwargs.get("model") is not None:  # None with model_init: the model comes at train begin
            self._attach(kwargs["model"], args)
            if self.restore_adapter_dtype:  # undo TRL's QLoRA bf16 cast (see trl_support), before any step
                changed = restore_adapter_dtypes(kwargs["model"])
                if changed:
                    logger.info("hf_peft_plugin: restored %d adapter tensors to the dtype they were created in", len(changed))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs["model"]
        self._attach(model, args)
        report = trainable_parameters(model)
        logger.info("hf_peft_plugin: %s", report)
        self._first_log = {
            "trainable_params": report.trainable,
            "all_params": report.total,
            "trainable_percent": round(report.percent, 4),
        }
        self._last_checkpoint = None
        self._token = self.token if self.token is not None else args.hub_token
        if self._pushing and state.is_world_process_zero and self._pusher is None:
            self._pusher = _BackgroundPusher()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and not (args.fsdp or args.deepspeed):  # those resume from their own files
            if not checkpoint.is_dir():
                logger.warning("hf_peft_plugin: %s does not exist; not adding the resumable adapter file.", checkpoint)
                return
            if not (checkpoint / TRAINABLE_WEIGHTS_NAME).is_file():  # save_pretrained wrote it unless renamed
                save_trainable_weights(kwargs["model"], checkpoint)
        self._last_checkpoint = checkpoint
        if self._pusher is not None and self.hub_strategy != "end":
            message = f"Training in progress, step {state.global_step}"
            self._push(kwargs["model"], state, message, self._checkpoint_to_push())

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        logs = kwargs.get("logs")
        if logs is None:
            return
        extra, self._first_log = self._first_log, {}
        if self.log_memory:
            extra.update(memory_stats(args.device))
        logs.update(extra)
        if state.log_history:  # the Trainer appended its copy of `logs` just before calling on_log
            state.log_history[-1].update(extra)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._pusher is None:
            return
        # The final push carries the latest checkpoint too: it may replace a queued push that had it.
        message = f"End of training, step {state.global_step}"
        final = self._push(kwargs["model"], state, message, self._checkpoint_to_push(), final=True)
        self._pusher.wait()
        self._pusher = None
        if final is not None and final.exception() is not None:
            self.push_error = final.exception()

    # -- helpers --------------------------------------------------------------------------------
    def _checkpoint_to_push(self) -> Path | None:
        if self.hub_strategy != "checkpoint" or self._last_checkpoint is None:
            return None
        return self._last_checkpoint if self._last_checkpoint.is_dir() else None

    def _attach(self, model: nn.Module, args: TrainingArguments) -> None:
        require_state(model)
        check_trainer_fsdp_request(model, args)
        enable_trainable_checkpoint_loading(model)
        if args.push_to_hub:  # the Trainer uploads checkpoints: model.safetensors comes after, in on_save
            write_resume_file_after_push(model)
        if self._pushing and args.push_to_hub:
            logger.warning(
                "hf_peft_plugin: TrainingArguments(push_to_hub=True) makes the Trainer push (the adapter only); "
                "AdapterCallback(push_to_hub=%r) will not push as well. Set only one of them.",
                self.repo_id,
            )
            self._pushing = False

    def _push(
        self, model: nn.Module, state: TrainerState, message: str, checkpoint: Path | None, final: bool = False
    ) -> Future | None:
        folder = Path(tempfile.mkdtemp(prefix="hf-peft-plugin-push-"))
        try:
            staged = stage_adapter(model, folder, self.repo_id, last_metrics(state.log_history))
            if checkpoint is not None:
                shutil.copytree(
                    checkpoint, folder / HUB_CHECKPOINT_FOLDER, ignore=shutil.ignore_patterns(*_NEVER_UPLOADED, ".*")
                )
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            logger.exception("hf_peft_plugin: could not stage the adapter for a push to %s; skipping it.", self.repo_id)
            return None
        upload = {
            "private": self.private,
            "token": self._token,
            "revision": self.revision,
            "commit_message": message,
            "endpoint": self.endpoint,
            "replace_folders": (HUB_CHECKPOINT_FOLDER,) if checkpoint is not None else (),
        }
        return self._pusher.submit(staged, upload, final)


class _BackgroundPusher:
    """Uploads on one background thread, in order; a queued upload is replaced by a newer one."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-peft-plugin-push")
        self._queued: tuple[Future, StagedAdapter] | None = None

    def submit(self, staged: StagedAdapter, upload: dict[str, Any], final: bool) -> Future:
        if self._queued is not None and self._queued[0].cancel():
            shutil.rmtree(self._queued[1].folder, ignore_errors=True)
            logger.info("hf_peft_plugin: dropped a push that had not started; a newer one replaces it.")
        future = self._executor.submit(_upload, staged, upload, final)
        self._queued = (future, staged)
        return future

    def wait(self) -> None:
        self._executor.shutdown(wait=True)


def _upload(staged: StagedAdapter, upload: dict[str, Any], final: bool) -> str:
    """Upload on the background thread. A failed push removes its staged folder, except the final
    one's, which keeps the unpushed adapter (named in the log) until it is pushed by hand."""
    try:
        url = upload_staged(staged, **upload)
    except Exception as exc:
        expected = isinstance(exc, HubPushError)
        if final:
            logger.error(
                "hf_peft_plugin: the final push of the adapter failed%s. %s The adapter is kept in %s; push it "
                "with push_adapter_to_hub(model, %r) or upload that folder once the problem is fixed.",
                "" if expected else " unexpectedly",
                exc if expected else f"{type(exc).__name__}: {exc}",
                staged.folder,
                staged.repo_id,
                exc_info=not expected,
            )
        else:
            shutil.rmtree(staged.folder, ignore_errors=True)
            logger.warning(
                "hf_peft_plugin: a push failed; training goes on and the next push retries. %s",
                exc if expected else f"{type(exc).__name__}: {exc}",
                exc_info=not expected,
            )
        raise
    shutil.rmtree(staged.folder, ignore_errors=True)
    logger.info("hf_peft_plugin: pushed the adapter to %s", url)
    return url
