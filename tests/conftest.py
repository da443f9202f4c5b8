
# --- local Hub fixtures ---------------------------------------------------------------------------
# A fake Hugging Face Hub (tests/hub_server.py) on 127.0.0.1:<random port>, driven by the real
# huggingface_hub client. Self-contained: other fixture sections can be added around this one.
#
#   local_hub    function-scoped, started LocalHub with the client pointed at it (see _point_client_at)
#                tokens: hf_write_alice (alice, write), hf_read_alice (alice, read-only),
#                        hf_write_bob (bob, write); org "acme" with member alice
#   hub_api      HfApi(endpoint=local_hub.endpoint, token="hf_write_alice")
import os as _hub_os
import sys as _hub_sys

import pytest as _hub_pytest

if _hub_os.path.dirname(__file__) not in _hub_sys.path:  # pytest (rootdir-less tests/) usually adds it already
    _hub_sys.path.insert(0, _hub_os.path.dirname(__file__))
from hub_server import LocalHub

HUB_TOKENS = {
    "hf_write_alice": ("alice", True),
    "hf_read_alice": ("alice", False),
    "hf_write_bob": ("bob", True),
}


def _point_client_at(monkeypatch, endpoint: str, home: str) -> None:
    """Point huggingface_hub (already imported: its constants are read at import time) at `endpoint`,
    with Xet and telemetry off, a private HF_HOME/cache, no ambient token, and instant retry back-off."""
    import importlib

    import huggingface_hub.constants as c
    from huggingface_hub import hf_api

    hf_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not the tqdm class

    hub_cache = _hub_os.path.join(home, "hub")
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HF_XET_CACHE": _hub_os.path.join(home, "xet"),
        "HF_TOKEN_PATH": _hub_os.path.join(home, "token"),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(k, raising=False)

    consts = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": c.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_PROGRESS_BARS": True,
        "HF_HUB_OFFLINE": False,
        "HF_HOME": home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": _hub_os.path.join(home, "assets"),
        "HUGGINGFACE_ASSETS_CACHE": _hub_os.path.join(home, "assets"),
        "HF_XET_CACHE": _hub_os.path.join(home, "xet"),
        "HF_TOKEN_PATH": _hub_os.path.join(home, "token"),
        "HF_STORED_TOKENS_PATH": _hub_os.path.join(home, "stored_tokens"),
        "AGENT_HARNESSES_PATH": _hub_os.path.join(home, ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": _hub_os.path.join(home, ".check_for_update_done"),
    }
    for k, v in consts.items():
        monkeypatch.setattr(c, k, v, raising=False)
    monkeypatch.setattr(hf_tqdm, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    # Top-level helpers (huggingface_hub.create_repo, upload_folder, ...) are bound methods of this
    # module-level HfApi(), whose endpoint was frozen at import time.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # transformers keeps one shared HfApi (transformers.utils.hub.hf_api()), made on first use with
    # the endpoint of that moment: a Trainer(push_to_hub=True) would then call an earlier test's server.
    transformers_hub = _hub_sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    LocalHub.patch_client_retries(monkeypatch)


@_hub_pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """A started LocalHub; huggingface_hub talks to it for the duration of the test."""
    from huggingface_hub.utils import close_session

    hub = LocalHub()
    for token, (user, write) in HUB_TOKENS.items():
        hub.add_token(token, user, write=write)
    hub.add_org("acme", members=["alice"])
    hub.start()
    close_session()  # drop pooled connections to servers of previous tests
    _point_client_at(monkeypatch, hub.endpoint, str(tmp_path / "hf_home"))
    try:
        yield hub
    finally:
        hub.stop()
        close_session()


@_hub_pytest.fixture
def hub_api(local_hub):
    """HfApi bound to the local hub, authenticated as alice (write)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=local_hub.endpoint, token="hf_write_alice")


# --- end of local Hub fixtures ---------------------------------------------------------------------
