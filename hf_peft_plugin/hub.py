"""Pushing an adapter to the Hugging Face Hub: the files ``save_adapter`` writes plus a model card,
in one commit.

Only what ``save_adapter`` writes (and the ``README.md``) is uploaded: never base-model weights,
optimizer state or the token. A push is split in two steps so that :class:`~hf_peft_plugin.callback.AdapterCallback`
can run the slow one off the training thread: :func:`stage_adapter` writes the adapter and builds the
card from the live model; :func:`upload_staged` talks to the Hub and touches nothing but the staged
folder. Every Hub failure becomes a :class:`~hf_peft_plugin.errors.HubPushError` that says what to do.
huggingface_hub already retries 429/5xx answers with back-off, so no retries are added here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import (
    BadRequestError,
    DisabledRepoError,
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .atomic import is_temporary
from .peft_format import ARTIFACT_FILES, CONFIG_NAME, EXTRAS_CONFIG_NAME
from .saving import save_adapter
from .errors import ConfigError, HubPushError
from .model import trainable_parameters
from .state import TASK_AUTO_CLASSES, AdapterSpec, AdapterState, require_state
from .targeting import adapter_layers

LIBRARY_NAME = "hf-peft-plugin"
#: Our part of a README lies between these markers; a later push replaces only that part.
CARD_START = "<!-- hf-peft-plugin:start -->"
CARD_END = "<!-- hf-peft-plugin:end -->"
README_NAME = "README.md"
#: Folder of the repo that holds the resumable checkpoint (``AdapterCallback(hub_strategy="checkpoint")``).
HUB_CHECKPOINT_FOLDER = "last-checkpoint"

PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "FEATURE_EXTRACTION": "feature-extraction",
}
_METHOD_TAGS = {"lora": "lora", "prompt": "prompt-tuning", "bottleneck": "bottleneck-adapter"}
_METHOD_TITLES = {"lora": "LoRA", "prompt": "Prompt tuning", "bottleneck": "Bottleneck adapter"}


def check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except (HFValidationError, TypeError) as exc:
        raise ConfigError(
            f"{repo_id!r} is not a Hub repo id; use 'user/name' or 'org/name' (letters, digits, '-', '_', '.')."
        ) from exc


# -- model card ----------------------------------------------------------------------------------


def hub_base_model(state: AdapterState) -> str | None:
    """The base model's Hub id, or ``None`` for a local path: the Hub rejects a ``base_model`` that is
    not a repo id, and a local path (``/home/<user>/...``) has no place on a public page."""
    name = state.base_model_name_or_path
    if not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def adapter_model_card(
    model: nn.Module, repo_id: str, folder: str | os.PathLike, metrics: Mapping[str, float] | None = None
) -> ModelCard:
    """The card for the adapter of ``model`` that ``save_adapter`` wrote to ``folder``.

    YAML: ``library_name``, ``base_model``, ``tags``, ``pipeline_tag``. Body (between
    :data:`CARD_START`/:data:`CARD_END`): the adapters and their settings, parameter counts, the
    base's quantization, ``metrics`` when given, and code that loads the adapter.
    """
    state = require_state(model)
    base = hub_base_model(state)
    methods = list(dict.fromkeys(m for spec in state.adapters.values() for m in spec.methods))
    tags = [LIBRARY_NAME, *(_METHOD_TAGS[m] for m in methods)]
    if any(spec.lora is not None and spec.lora.use_dora for spec in state.adapters.values()):
        tags.append("dora")
    if state.quantization is not None:
        tags += [f"{state.quantization.bits}-bit", "bitsandbytes"]
    folder = Path(folder)
    peft_ready = _peft_loadable(folder)
    if peft_ready:
        tags.append("peft")
    if base is not None:
        tags.append(f"base_model:adapter:{base}")
    data = ModelCardData(
        library_name=LIBRARY_NAME, base_model=base, tags=tags, pipeline_tag=PIPELINE_TAGS.get(state.task_type)
    )
    body = "\n".join(
        [
            CARD_START,
            f"# {repo_id.rpartition('/')[2]}",
            "",
            f"Adapter{'s' if len(state.adapters) > 1 else ''} for "
            + (f"[`{base}`](https://huggingface.co/{base})" if base else "a local base model")
            + f", trained with `{LIBRARY_NAME}` ({', '.join(_METHOD_TITLES[m] for m in methods)}). "
            "This repository holds the adapter only: the base model's weights are not in it.",
            "",
            *_adapter_sections(model, state),
            "## Parameters",
            "",
            f"`{trainable_parameters(model)}`",
            "",
            *_quantization_section(state),
            *_metrics_section(metrics),
            *_usage_section(state, repo_id, base, folder, peft_ready),
            CARD_END,
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}\n")


def _peft_loadable(folder: Path) -> bool:
    """peft loads the whole adapter: every adapter folder has peft's pair and none of our extras."""
    configs = [p.parent for p in folder.rglob(CONFIG_NAME)]
    return bool(configs) and not any(folder.rglob(EXTRAS_CONFIG_NAME))


def _table(rows: Sequence[tuple[str, Any]], header: tuple[str, str] = ("setting", "value")) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(f"`{v}`" for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"`{k}`: {v}" for k, v in value.items()) if value else "-"
    if isinstance(value, float):
        return f"`{value:.6g}`"
    return "-" if value is None else f"`{value}`"


def _adapter_sections(model: nn.Module, state: AdapterState) -> list[str]:
    lines = ["## Adapters", ""]
    counts = _adapter_parameter_counts(model)
    for name, spec in state.adapters.items():
        where = "this folder" if name == "default" else f"sub-folder `{name}/`"
        active = " (active)" if name in state.active else ""
        lines += [f"### `{name}`{active}", "", f"{counts.get(name, 0):,} parameters, in {where}.", ""]
        for method in spec.methods:
            lines += [f"**{_METHOD_TITLES[method]}**", "", *_table(_config_rows(spec, method))]
    return lines


def _adapter_parameter_counts(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for _, layer in adapter_layers(model):
        for name in layer.adapter_names():
            for p in layer.adapter_parameters(name):
                if id(p) not in seen:
                    seen.add(id(p))
                    counts[name] = counts.get(name, 0) + p.numel()
    return counts


def _config_rows(spec: AdapterSpec, method: str) -> list[tuple[str, Any]]:
    config = getattr(spec, method)
    rows = [(f.name, getattr(config, f.name)) for f in fields(config) if f.repr]
    if method == "lora":
        rows.append(("adapted layers", len(spec.lora_targets)))
    if spec.modules_to_save and method == spec.methods[0]:
        rows.append(("trained heads", spec.modules_to_save))
    return rows


def _quantization_section(state: AdapterState) -> list[str]:
    q = state.quantization
    lines = ["## Base model during training", ""]
    if q is None:
        return lines + [f"Not quantized; compute dtype `{state.compute_dtype}`.", ""]
    rows: list[tuple[str, Any]] = [("bits", q.bits)]
    if q.bits == 4:
        rows += [
            ("quant_type", q.quant_type),
            ("double_quant", q.double_quant),
            ("quant_storage", str(q.quant_storage)),
        ]
    else:
        rows.append(("int8_threshold", q.int8_threshold))
    rows += [("compute_dtype", str(state.compute_dtype)), ("kept in full precision", q.skip_modules)]
    return lines + ["Quantized with bitsandbytes:", "", *_table(rows)]


def _metrics_section(metrics: Mapping[str, float] | None) -> list[str]:
    if not metrics:
        return []
    return ["## Training metrics (last logged)", "", *_table(list(metrics.items()), ("metric", "value"))]


def _usage_section(state: AdapterState, repo_id: str, base: str | None, folder: Path, peft_ready: bool) -> list[str]:
    auto_class = TASK_AUTO_CLASSES[state.task_type]
    base_id = base or "<path of the base model>"
    q = state.quantization
    imports = f"from transformers import {auto_class}" + (", BitsAndBytesConfig" if q is not None else "")
    load_base = [f'base = {auto_class}.from_pretrained("{base_id}")']
    if q is not None:
        bnb = (
            f'load_in_4bit=True, bnb_4bit_quant_type="{q.quant_type}", bnb_4bit_use_double_quant={q.double_quant}'
            if q.bits == 4
            else "load_in_8bit=True"
        )
        load_base = [
            "# As trained: the base quantized with bitsandbytes (drop quantization_config for full precision).",
            f'base = {auto_class}.from_pretrained("{base_id}", quantization_config=BitsAndBytesConfig({bnb}))',
        ]
    if (folder / CONFIG_NAME).is_file() or (folder / EXTRAS_CONFIG_NAME).is_file():
        ours = [f'model = load_pretrained("{base_id}", "{repo_id}")']
        peft = [f'model = PeftModel.from_pretrained(base, "{repo_id}")']
    else:  # no "default" adapter: every adapter lives in a sub-folder
        name = next(iter(state.adapters))
        ours = [f'model = load_pretrained("{base_id}", "{repo_id}", subfolder="{name}")']
        peft = [f'model = PeftModel.from_pretrained(base, "{repo_id}", subfolder="{name}")']
    lines = [
        "## Usage",
        "",
        f"With `{LIBRARY_NAME}` (the base is loaded and quantized as it was in training, which the adapter records):",
        "",
        "```python",
        "from hf_peft_plugin import load_pretrained",
        "",
    ]
    lines += [*ours, "```", ""]
    if peft_ready:
        lines += [
            "With `peft` (the files are in its format):",
            "",
            "```python",
            imports,
            "from peft import PeftModel",
            "",
        ]
        lines += [*load_base, *peft, "```", ""]
    return lines


def merge_model_card(existing: str | None, ours: ModelCard) -> ModelCard:
    """``ours`` folded into the README already in the repo, keeping everything the user wrote.

    Metadata: our keys (``library_name``, ``base_model``, ``pipeline_tag``) describe this artifact and
    win; tags are the union; the user's other keys stay. Body: our section between the markers is
    replaced, or appended below the user's text the first time.
    """
    if not existing or not existing.strip():
        return ours
    theirs = ModelCard(existing, ignore_metadata_errors=True)
    data = theirs.data
    for key, value in ours.data.to_dict().items():
        if key == "tags":
            old = data.tags or []
            value = list(dict.fromkeys([*([old] if isinstance(old, str) else old), *value]))
        setattr(data, key, value)
    section = ours.text.strip()
    body = theirs.text
    start, end = body.find(CARD_START), body.find(CARD_END)
    if start != -1 and end > start:
        body = body[:start] + section + body[end + len(CARD_END) :]
    else:
        body = body.rstrip() + "\n\n" + section + "\n"
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body.lstrip()}")


# -- staging and uploading -----------------------------------------------------------------------


@dataclass(frozen=True)
class StagedAdapter:
    """A folder laid out as the repo should look (README excluded), and the card to merge in."""

    folder: Path
    repo_id: str
    card: ModelCard


def stage_adapter(
    model: nn.Module, folder: str | os.PathLike, repo_id: str, metrics: Mapping[str, float] | None = None
) -> StagedAdapter:
    """Write the adapter of ``model`` to ``folder`` and build its card (reads the model: call it from
    the thread that trains it)."""
    save_adapter(model, folder)
    return StagedAdapter(Path(folder), repo_id, adapter_model_card(model, repo_id, folder, metrics))


def upload_staged(
    staged: StagedAdapter,
    *,
    private: bool = True,
    token: str | None = None,
    revision: str = "main",
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
    replace_folders: Sequence[str] = (),
) -> str:
    """Create the repo if needed, merge the card into its README and commit every staged file at
    once; returns the commit URL. Adapter files in the repo that the staged folder no longer has
    (an adapter deleted since the last push), and files under ``replace_folders`` it no longer
    has, are deleted in the same commit. Raises :class:`HubPushError`."""
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(staged.repo_id, api.endpoint, token):
        repo_id = api.create_repo(staged.repo_id, private=private, exist_ok=True).repo_id
        if revision != "main" and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        existing_readme = _remote_readme(api, repo_id, revision)
        remote_files = api.list_repo_files(repo_id, revision=revision)
    with _hub_errors(repo_id, api.endpoint, token):  # local files: an OSError here is not the Hub's
        (staged.folder / README_NAME).write_text(str(merge_model_card(existing_readme, staged.card)), encoding="utf-8")
        operations: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=path.relative_to(staged.folder).as_posix(), path_or_fileobj=str(path))
            for path in sorted(staged.folder.rglob("*"))
            if path.is_file() and not is_temporary(path.name)
        ]
    uploaded = {op.path_in_repo for op in operations}
    operations += [
        CommitOperationDelete(path_in_repo=path)
        for path in remote_files
        if path not in uploaded
        and (any(path.startswith(f"{folder}/") for folder in replace_folders) or _is_adapter_file(path, replace_folders))
    ]
    with _hub_errors(repo_id, api.endpoint, token):
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or "Upload adapter with hf-peft-plugin",
            revision=revision,
            create_pr=create_pr,
        )
    return info.commit_url


def _is_adapter_file(path: str, skip: Sequence[str]) -> bool:
    """A file ``save_adapter`` writes: at the top (``default``) or in an adapter's sub-folder."""
    parts = path.split("/")
    return parts[-1] in ARTIFACT_FILES and len(parts) <= 2 and parts[0] not in (*skip, HUB_CHECKPOINT_FOLDER)


def _remote_readme(api: HfApi, repo_id: str, revision: str) -> str | None:
    with tempfile.TemporaryDirectory(prefix="hf-peft-plugin-readme-") as cache:
        try:
            path = api.hf_hub_download(repo_id, README_NAME, revision=revision, cache_dir=cache)
        except EntryNotFoundError:
            return None
        return Path(path).read_text(encoding="utf-8")


@contextlib.contextmanager
def _hub_errors(repo_id: str, endpoint: str, token: str | None) -> Iterator[None]:
    """Turn what the Hub client raises into a :class:`HubPushError`; anything else propagates."""
    try:
        yield
    except Exception as exc:
        error = _push_error(exc, repo_id, endpoint, token)
        if error is None:
            raise
        raise error from exc


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it (``__cause__``, else ``__context__``): huggingface_hub wraps, e.g. a
    dropped connection during an LFS upload becomes ``RuntimeError("Error while uploading ...")``."""
    seen: list[BaseException] = []
    while exc is not None and all(exc is not e for e in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _is_network_error(exc: BaseException) -> bool:
    """A failure to talk to the server: the HTTP client's transport errors (huggingface_hub uses
    httpx; requests/urllib3 for older versions), or the socket's own."""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    transport = tuple(
        getattr(module, name)
        for module, name in (
            (sys.modules.get("httpx2"), "TransportError"),
            (sys.modules.get("httpx"), "TransportError"),
            (sys.modules.get("requests"), "ConnectionError"),
            (sys.modules.get("requests"), "Timeout"),
            (sys.modules.get("urllib3.exceptions"), "HTTPError"),
        )
        if module is not None and hasattr(module, name)
    )
    return bool(transport) and isinstance(exc, transport)


def _push_error(exc: Exception, repo_id: str, endpoint: str, token: str | None) -> HubPushError | None:
    """A :class:`HubPushError` saying what went wrong and what to do (the token is never in it), or
    ``None`` for an exception that is not about the Hub, the network or the local files (a bug: it
    propagates). The whole cause chain is read, and huggingface_hub's typed errors decide."""
    kept = "No commit was made (a commit is all or nothing) and no local file was changed."
    namespace = repo_id.partition("/")[0] if "/" in repo_id else "your user name"
    chain = _chain(exc)
    if any(isinstance(e, LocalTokenNotFoundError) for e in chain):
        return HubPushError(_no_token(repo_id, kept))
    http = next((e for e in chain if isinstance(e, HfHubHTTPError)), None)
    if http is not None:
        return HubPushError(_http_message(http, repo_id, namespace, token, kept))
    network = next((e for e in chain if _is_network_error(e)), None)
    if network is not None:
        return HubPushError(
            f"Could not reach the Hub at {endpoint} to push {repo_id!r} ({type(network).__name__}: {network}). Check "
            f"the network connection (and HF_ENDPOINT or proxy settings), then push again. {kept}"
        )
    local = next((e for e in chain if isinstance(e, OSError)), None)
    if local is not None:  # not the network: a staged file that could not be read
        where = f" ({local.filename})" if getattr(local, "filename", None) else ""
        return HubPushError(
            f"Could not read the adapter files staged for the push to {repo_id!r}{where}: {type(local).__name__}: "
            f"{local.strerror or local}. This is a local problem (disk, permissions, temporary folder), not the Hub; "
            f"fix it and push again. {kept}"
        )
    return None


def _no_token(repo_id: str, kept: str) -> str:
    return (
        f"Pushing to {repo_id!r} needs a Hugging Face token with write access, and none was found. Log in with "
        f"`hf auth login`, set the HF_TOKEN environment variable, or pass token=... . {kept}"
    )


def _http_message(exc: HfHubHTTPError, repo_id: str, namespace: str, token: str | None, kept: str) -> str:
    status = exc.response.status_code if exc.response is not None else None
    said = f" The Hub said: {exc.server_message.strip()}" if exc.server_message else ""
    request = f" (request id {exc.request_id})" if getattr(exc, "request_id", None) else ""
    if status == 401 and token is None and get_token() is None:
        return _no_token(repo_id, kept)
    if isinstance(exc, RevisionNotFoundError):
        advice = f"The branch does not exist in {repo_id!r}; create it, or push to 'main'."
    elif isinstance(exc, RepositoryNotFoundError) and status != 401:
        advice = (
            f"{repo_id!r} cannot be written with this token: '{namespace}' is neither your user nor an organization "
            "you can write to, or the token is read-only. Use a token with write access, or push to a repo in your own "
            "namespace."
        )
    elif isinstance(exc, DisabledRepoError):
        advice = f"{repo_id!r} is disabled on the Hub; push to another repo."
    elif isinstance(exc, BadRequestError):
        advice = "The Hub rejected the request as malformed (400)."
    elif status == 401 or isinstance(exc, RepositoryNotFoundError):
        advice = (
            "The Hub rejected the token (401): it is invalid, expired or revoked. Create a token with write "
            "access at https://huggingface.co/settings/tokens and pass it as token=... ."
        )
    elif status in (403, 404):
        advice = (
            f"The token may not write to {repo_id!r} ({status}): it is read-only, or '{namespace}' is neither your "
            "user nor an organization you can write to. Use a token with write access, or push to a repo in "
            "your own namespace."
        )
    elif status in (409, 412):
        advice = f"Someone else changed {repo_id!r} during the push ({status}); push again."
    elif status is not None and (status == 429 or status >= 500):
        advice = (
            f"The Hub is unavailable or rate-limiting ({status}) even after huggingface_hub's retries; "
            "push again later."
        )
    else:
        advice = f"The Hub refused the push ({status})."
    return f"Could not push to {repo_id!r}. {advice}{said}{request} {kept}"


def push_adapter_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    revision: str = "main",
    commit_message: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> str:
    """Upload the adapter of a prepared ``model`` (what ``save_adapter`` writes) and a model card to
    ``repo_id`` in one commit; returns the commit URL.

    The repo is created if needed, private unless ``private=False`` (an adapter may hold what
    private training data taught it; make it public on purpose). ``private`` applies only when the
    repo is created: an existing repo keeps its visibility. An existing README is updated,
    not replaced. ``token=None`` uses the logged-in token (``hf auth login`` / ``HF_TOKEN``).
    Raises :class:`HubPushError` when the Hub cannot be reached or refuses the push.
    """
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="hf-peft-plugin-push-") as folder:
        staged = stage_adapter(model, folder, repo_id)
        return upload_staged(
            staged,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            endpoint=endpoint,
        )
