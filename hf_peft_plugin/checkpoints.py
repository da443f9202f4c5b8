"""What a ``transformers.Trainer`` checkpoint of a prepared model needs to resume.

The Trainer only reloads adapters into peft's ``PeftModel``: for any other model,
``resume_from_checkpoint`` and ``load_best_model_at_end`` read ``model.safetensors`` and pass its
tensors to ``model.load_state_dict(..., strict=False)``. So every ``checkpoint-N/`` gets that file
holding the *trainable* tensors only, under the model's own parameter names, plus two entries of
this package: a marker saying it is adapter-only on purpose, and the folder it was written into.

It is written by the model's ``save_pretrained``, the first thing the Trainer writes into a
checkpoint, in the same unit as the adapter files (:mod:`~hf_peft_plugin.atomic`); the Trainer's
``trainer_state.json`` comes last. A checkpoint without a valid ``trainer_state.json`` was
interrupted while being saved: loading it is refused with an error naming the last complete one.
"""

from __future__ import annotations

import json
import os
import re
import weakref
from pathlib import Path
from typing import Any

import safetensors
import torch
from torch import nn

from .atomic import write_atomically
from .errors import AdapterLoadError
from .saving import safetensors_bytes
from .state import require_state

#: transformers' SAFE_WEIGHTS_NAME: what ``Trainer._load_from_checkpoint``/``_load_best_model`` read.
TRAINABLE_WEIGHTS_NAME = "model.safetensors"
#: A 0-d entry of that file: it is adapter-only on purpose, the frozen base keys are not missing.
TRAINABLE_ONLY_MARKER = "_hf_peft_plugin_trainable_only"
#: A 1-d uint8 entry of that file: the UTF-8 path of the checkpoint folder it was written into.
CHECKPOINT_FOLDER_KEY = "_hf_peft_plugin_checkpoint_folder"
#: The Trainer's last file in a checkpoint (transformers' TRAINER_STATE_NAME).
TRAINER_STATE_NAME = "trainer_state.json"
#: Names the Trainer gives checkpoint folders (transformers' PREFIX_CHECKPOINT_DIR + "-<step>").
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_OUR_KEYS = (TRAINABLE_ONLY_MARKER, CHECKPOINT_FOLDER_KEY)


#: Models whose Trainer pushes checkpoints itself (``TrainingArguments(push_to_hub=True)``): it
#: uploads any ``model.safetensors`` it finds, so the callback's ``on_save`` (after the push) writes it.
_WRITTEN_AFTER_PUSH: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def write_resume_file_after_push(model: nn.Module) -> None:
    _WRITTEN_AFTER_PUSH.add(model)


def wants_resume_file(model: nn.Module, directory: str | os.PathLike) -> bool:
    """Whether ``save_pretrained(directory)`` is writing a Trainer checkpoint that needs ``model.safetensors``."""
    return _CHECKPOINT_NAME.match(Path(directory).name) is not None and model not in _WRITTEN_AFTER_PUSH


def is_trainer_checkpoint(directory: str | os.PathLike) -> bool:
    return _CHECKPOINT_NAME.match(Path(directory).name) is not None


def trainable_weights(model: nn.Module, directory: str | os.PathLike) -> bytes:
    """The bytes of ``model.safetensors`` for a checkpoint in ``directory``."""
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    return _with_our_keys(tensors, directory)


def _with_our_keys(tensors: dict[str, torch.Tensor], directory: str | os.PathLike) -> bytes:
    folder = os.fsencode(os.path.abspath(directory))
    tensors = {
        **tensors,
        TRAINABLE_ONLY_MARKER: torch.zeros(()),
        CHECKPOINT_FOLDER_KEY: torch.frombuffer(bytearray(folder), dtype=torch.uint8),
    }
    return safetensors_bytes(tensors, {"format": "pt"})


def save_trainable_weights(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the trainable tensors of ``model`` to ``directory/model.safetensors`` (atomically)."""
    data = trainable_weights(model, directory)
    write_atomically(Path(directory) / TRAINABLE_WEIGHTS_NAME, lambda tmp: Path(tmp).write_bytes(data))


def mark_checkpoint_started(directory: str | os.PathLike) -> None:
    """Before anything else is written into a new checkpoint: a ``model.safetensors`` holding only
    our entries, so that resuming from a checkpoint killed at any later point gets the clear
    error of :func:`check_checkpoint_complete`, not transformers' "Can't find a valid checkpoint"."""
    path = Path(directory) / TRAINABLE_WEIGHTS_NAME
    if not path.exists():
        data = _with_our_keys({}, directory)
        write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def checkpoint_is_complete(folder: Path) -> bool:
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        with safetensors.safe_open(str(folder / TRAINABLE_WEIGHTS_NAME), framework="pt") as f:
            return any(k not in _OUR_KEYS for k in f.keys())  # not only mark_checkpoint_started's placeholder
    except Exception:  # missing, truncated or corrupted: not complete
        return False


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    found = []
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            match = _CHECKPOINT_NAME.match(entry.name)
            if match and entry.is_dir() and checkpoint_is_complete(entry):
                found.append((int(match.group(1)), entry))
    return max(found, key=lambda x: x[0])[1] if found else None


def check_checkpoint_complete(folder: Path, placeholder: bool = False) -> None:
    """Raise :class:`AdapterLoadError` naming ``folder`` and the last complete checkpoint next to it,
    when the Trainer did not finish writing ``folder``."""
    if not placeholder and checkpoint_is_complete(folder):
        return
    last = last_complete_checkpoint(folder.parent)
    advice = (
        f"Resume from the last complete one: trainer.train(resume_from_checkpoint={str(last)!r}), or delete "
        f"{folder.name} so that resume_from_checkpoint=True picks {last.name}."
        if last is not None
        else f"There is no complete checkpoint in {folder.parent}: delete {folder.name} and train from the start."
    )
    raise AdapterLoadError(
        f"The checkpoint {folder} is incomplete: training was stopped while it was being saved (it has no valid "
        f"{TRAINER_STATE_NAME}, which the Trainer writes last). {advice}"
    )


def _refuse_incomplete_checkpoint(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Pre-hook of ``load_state_dict``: before any tensor is loaded, refuse a file from an
    interrupted checkpoint. A file whose folder was moved since cannot be checked and loads."""
    entry = state_dict.get(prefix + CHECKPOINT_FOLDER_KEY)
    if prefix or entry is None:
        return
    folder = Path(os.fsdecode(bytes(entry.to(torch.uint8).tolist())))
    placeholder = all(k in _OUR_KEYS for k in state_dict)  # mark_checkpoint_started's: no save finished
    if placeholder or (is_trainer_checkpoint(folder) and folder.is_dir()):
        check_checkpoint_complete(folder, placeholder)


def _drop_frozen_missing_keys(module: nn.Module, incompatible_keys: Any) -> None:
    """Post-hook of ``load_state_dict``: a state dict carrying the marker is adapter-only, so only
    trainable parameters it lacks are missing. Other loads are left alone."""
    if TRAINABLE_ONLY_MARKER not in incompatible_keys.unexpected_keys:
        return
    for key in _OUR_KEYS:
        if key in incompatible_keys.unexpected_keys:
            incompatible_keys.unexpected_keys.remove(key)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if k in trainable]


#: Owner key in :attr:`AdapterState.hooks` of the checkpoint-loading hooks.
CHECKPOINT_HOOKS = "checkpoints"


def enable_trainable_checkpoint_loading(model: nn.Module) -> None:
    """Let ``model.load_state_dict(strict=False)`` take a :func:`save_trainable_weights` file quietly,
    and refuse one from an interrupted checkpoint. Idempotent; the handles live in the model's state."""
    state = require_state(model)
    if not state.hooks.get(CHECKPOINT_HOOKS):
        state.add_hooks(
            CHECKPOINT_HOOKS,
            [
                model.register_load_state_dict_pre_hook(_refuse_incomplete_checkpoint),
                model.register_load_state_dict_post_hook(_drop_frozen_missing_keys),
            ],
        )
