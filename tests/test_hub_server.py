"""The LocalHub fake, exercised with the real huggingface_hub client (no Xet, legacy LFS path)."""

import hashlib
import json
import threading
from pathlib import Path

import httpx2
import pytest
from hub_server import LocalHub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

REPO = "alice/adapter"


def _weights(seed: int, n: int = 4096) -> bytes:
    # Not a real safetensors file (content does not matter to the Hub), but binary like one.
    return b"\x00\x01" + hashlib.sha256(str(seed).encode()).digest() * (n // 32)


def _make_folder(tmp_path: Path, weights: bytes, name: str = "out") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "README.md").write_text("---\nlibrary_name: peft\ntags:\n- lora\n---\n# Adapter\n")
    return folder


def _push(api: HfApi, tmp_path: Path, weights: bytes, name: str = "out", **kw):
    return api.upload_folder(repo_id=REPO, folder_path=_make_folder(tmp_path, weights, name), **kw)


# ------------------------------------------------------------------------------------------------ repos


def test_create_repo_and_exist_ok(local_hub, hub_api):
    url = hub_api.create_repo(REPO)
    assert url == f"{local_hub.endpoint}/{REPO}"
    assert url.repo_id == REPO and url.repo_type == "model"
    assert hub_api.repo_exists(REPO)
    assert not hub_api.repo_exists("alice/nope")
    with pytest.raises(HfHubHTTPError) as exc:
        hub_api.create_repo(REPO)
    assert exc.value.response.status_code == 409
    assert hub_api.create_repo(REPO, exist_ok=True) == url
    # New repos start like on the Hub: an "initial commit" holding .gitattributes.
    assert list(local_hub.files(REPO)) == [".gitattributes"]
    assert [c.title for c in local_hub.commits(REPO)] == ["initial commit"]
    assert hub_api.whoami()["name"] == "alice"
    # Bare names go to the caller's namespace; orgs the user belongs to are writable.
    assert hub_api.create_repo("bare").repo_id == "alice/bare"
    assert hub_api.create_repo("acme/shared", private=True).repo_id == "acme/shared"
    assert local_hub.is_private("acme/shared")


def test_upload_folder_lfs_and_regular(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    weights = _weights(1)
    info = _push(hub_api, tmp_path, weights)

    assert len(info.oid) == 40 and info.oid == local_hub.head(REPO)
    assert info.commit_url == f"{local_hub.endpoint}/{REPO}/commit/{info.oid}"
    assert info.pr_url is None
    files = local_hub.files(REPO)
    assert files["adapter_model.safetensors"] == weights
    assert json.loads(files["adapter_config.json"]) == {"peft_type": "LORA", "r": 8}
    assert local_hub.lfs_paths(REPO) == {"adapter_model.safetensors"}
    assert hashlib.sha256(weights).hexdigest() in local_hub.lfs_objects(REPO)
    # The safetensors went through preupload -> LFS batch -> unauthenticated PUT -> verify -> commit.
    assert [r.method for r in local_hub.requests_matching("/__lfs__/")] == ["PUT"]
    assert local_hub.requests_matching("/__lfs__/")[0].user is None
    assert local_hub.requests_matching("objects/verify")

    model = hub_api.model_info(REPO, files_metadata=True)
    assert model.sha == info.oid
    assert model.card_data.library_name == "peft" and "lora" in model.tags
    siblings = {s.rfilename: s for s in model.siblings}
    assert siblings["adapter_model.safetensors"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert siblings["adapter_model.safetensors"].size == len(weights)
    assert siblings["adapter_config.json"].lfs is None


def test_second_commit_new_oid_and_download(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    first = _push(hub_api, tmp_path, _weights(1), "v1")
    path1 = hf_hub_download(REPO, "adapter_model.safetensors", endpoint=local_hub.endpoint)
    assert Path(path1).read_bytes() == _weights(1)

    second = _push(hub_api, tmp_path, _weights(2), "v2", commit_message="retrain")
    assert second.oid != first.oid
    assert [c.title for c in local_hub.commits(REPO)] == ["initial commit", "Upload folder using huggingface_hub", "retrain"]
    assert local_hub.commits(REPO)[-1].parent == first.oid
    assert hub_api.list_repo_commits(REPO)[0].commit_id == second.oid

    # Default env: top-level function, constants-based endpoint.
    path2 = hf_hub_download(REPO, "adapter_model.safetensors")
    assert Path(path2).read_bytes() == _weights(2)
    assert f"snapshots/{second.oid}/" in Path(path2).as_posix()
    old = hf_hub_download(REPO, "adapter_model.safetensors", revision=first.oid)
    assert Path(old).read_bytes() == _weights(1)

    snap = Path(snapshot_download(REPO))
    assert (snap / "adapter_model.safetensors").read_bytes() == _weights(2)
    assert sorted(p.name for p in snap.iterdir()) == [
        ".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]
    local = Path(snapshot_download(REPO, local_dir=tmp_path / "local", revision=first.oid))
    assert (local / "adapter_model.safetensors").read_bytes() == _weights(1)


def test_no_op_commit_is_skipped_by_client(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    folder = _make_folder(tmp_path, _weights(1))
    first = hub_api.upload_folder(repo_id=REPO, folder_path=folder)
    again = hub_api.upload_folder(repo_id=REPO, folder_path=folder)
    assert again.oid == first.oid
    assert len(local_hub.commits(REPO)) == 2


def test_list_files_tree_and_delete(local_hub, hub_api):
    hub_api.create_repo(REPO)
    hub_api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("a/b/weights.safetensors", _weights(3)),
            CommitOperationAdd("a/notes.txt", b"hello"),
            CommitOperationAdd("top.json", b"{}"),
        ],
        commit_message="nested",
    )
    assert sorted(hub_api.list_repo_files(REPO)) == [
        ".gitattributes", "a/b/weights.safetensors", "a/notes.txt", "top.json"
    ]
    root = {e.path: type(e).__name__ for e in hub_api.list_repo_tree(REPO)}
    assert root == {".gitattributes": "RepoFile", "a": "RepoFolder", "top.json": "RepoFile"}
    sub = {e.path for e in hub_api.list_repo_tree(REPO, path_in_repo="a")}
    assert sub == {"a/b", "a/notes.txt"}
    lfs = next(e for e in hub_api.list_repo_tree(REPO, recursive=True) if e.path.endswith(".safetensors"))
    assert lfs.lfs.sha256 == hashlib.sha256(_weights(3)).hexdigest() and lfs.size == len(_weights(3))
    assert hub_api.file_exists(REPO, "a/notes.txt") and not hub_api.file_exists(REPO, "zzz")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.txt")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "top.json", revision="nope")

    hub_api.create_commit(REPO, operations=[CommitOperationDelete("a/")], commit_message="rm a")
    assert sorted(local_hub.files(REPO)) == [".gitattributes", "top.json"]
    with pytest.raises(RemoteEntryNotFoundError):
        hub_api.delete_file("not-there.txt", REPO)


# ------------------------------------------------------------------------------------------------ auth


def test_private_repo_invisible_to_others(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO, private=True)
    _push(hub_api, tmp_path, _weights(1))
    assert hub_api.model_info(REPO).private is True

    bob = HfApi(endpoint=local_hub.endpoint, token="hf_write_bob")
    anon = HfApi(endpoint=local_hub.endpoint, token=False)
    for api in (bob, anon):
        with pytest.raises(RepositoryNotFoundError):
            api.model_info(REPO)
        with pytest.raises(RepositoryNotFoundError):
            api.list_repo_files(REPO)
        assert not api.repo_exists(REPO)
    with pytest.raises(RepositoryNotFoundError) as exc:
        anon.model_info(REPO)
    assert exc.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as exc:
        bob.model_info(REPO)
    assert exc.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "adapter_config.json", token="hf_write_bob")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "adapter_config.json")  # anonymous (no ambient token)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, token="hf_write_bob")
    # The owner's read-only token can read.
    path = hf_hub_download(REPO, "adapter_config.json", token="hf_read_alice")
    assert json.loads(Path(path).read_text())["r"] == 8


def test_bad_token_is_401(local_hub):
    api = HfApi(endpoint=local_hub.endpoint, token="hf_bogus")
    with pytest.raises(HfHubHTTPError) as exc:
        api.whoami()
    assert exc.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("alice/x")
    assert exc.value.response.status_code == 401
    assert not isinstance(exc.value, RepositoryNotFoundError)
    assert "Invalid credentials" in str(exc.value)


def test_read_only_token_cannot_write(local_hub, hub_api):
    hub_api.create_repo(REPO)
    ro = HfApi(endpoint=local_hub.endpoint, token="hf_read_alice")
    assert ro.whoami()["auth"]["accessToken"]["role"] == "read"
    before = local_hub.head(REPO)
    with pytest.raises(HfHubHTTPError) as exc:
        ro.create_commit(REPO, operations=[CommitOperationAdd("x.txt", b"x")], commit_message="nope")
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        ro.create_repo("alice/other")
    assert exc.value.response.status_code == 403
    assert local_hub.head(REPO) == before


def test_cannot_write_other_namespace(local_hub, hub_api):
    bob = HfApi(endpoint=local_hub.endpoint, token="hf_write_bob")
    with pytest.raises(HfHubHTTPError) as exc:
        bob.create_repo(REPO)
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        bob.create_repo("acme/bobs")
    assert exc.value.response.status_code == 403
    hub_api.create_repo(REPO)
    with pytest.raises(HfHubHTTPError) as exc:
        bob.upload_file(path_or_fileobj=b"hack", path_in_repo="x.txt", repo_id=REPO)
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:  # LFS path too
        bob.upload_file(path_or_fileobj=_weights(9), path_in_repo="w.safetensors", repo_id=REPO)
    assert exc.value.response.status_code == 403
    # exist_ok + 403 on a repo that exists: the client falls back to repo_info and does not raise.
    assert bob.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert list(local_hub.files(REPO)) == [".gitattributes"]


def test_create_pr(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    main_before = local_hub.head(REPO)
    info = _push(hub_api, tmp_path, _weights(5), create_pr=True)
    assert info.pr_url == f"{local_hub.endpoint}/{REPO}/discussions/1"
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert local_hub.head(REPO) == main_before  # main untouched
    assert local_hub.files(REPO, revision="refs/pr/1")["adapter_model.safetensors"] == _weights(5)
    path = hf_hub_download(REPO, "adapter_model.safetensors", revision="refs/pr/1")
    assert Path(path).read_bytes() == _weights(5)
    refs = hub_api.list_repo_refs(REPO, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]

    # Non-owners can open PRs (with a write token) but not push to main.
    bob = HfApi(endpoint=local_hub.endpoint, token="hf_write_bob")
    pr2 = bob.upload_file(path_or_fileobj=b"fix", path_in_repo="fix.txt", repo_id=REPO, create_pr=True)
    assert pr2.pr_num == 2 and local_hub.pull_requests(REPO)[1].author == "bob"


def test_branches_and_tags(local_hub, hub_api):
    hub_api.create_repo(REPO)
    hub_api.upload_file(path_or_fileobj=b"1", path_in_repo="v.txt", repo_id=REPO)
    hub_api.create_branch(REPO, branch="dev")
    hub_api.upload_file(path_or_fileobj=b"2", path_in_repo="v.txt", repo_id=REPO, revision="dev")
    hub_api.create_tag(REPO, tag="v1")
    assert local_hub.files(REPO, "main")["v.txt"] == b"1"
    assert local_hub.files(REPO, "dev")["v.txt"] == b"2"
    assert Path(hf_hub_download(REPO, "v.txt", revision="v1")).read_bytes() == b"1"
    refs = hub_api.list_repo_refs(REPO)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    with pytest.raises(RevisionNotFoundError):
        hub_api.upload_file(path_or_fileobj=b"3", path_in_repo="v.txt", repo_id=REPO, revision="nope")


def test_invalid_readme_metadata(local_hub, hub_api):
    hub_api.create_repo(REPO)
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        hub_api.upload_file(path_or_fileobj=b"---\nfoo: [unclosed\n---\n", path_in_repo="README.md", repo_id=REPO)
    with pytest.warns(UserWarning, match="empty or missing yaml metadata"):
        hub_api.upload_file(path_or_fileobj=b"# no metadata\n", path_in_repo="README.md", repo_id=REPO)


# ------------------------------------------------------------------------------------------------ faults


def _state(hub: LocalHub, repo: str):
    return [c.oid for c in hub.all_commits(repo)], hub.refs(repo), hub.files(repo)


def test_server_error_on_commit_leaves_no_partial_commit(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    _push(hub_api, tmp_path, _weights(1), "v1")
    before = _state(local_hub, REPO)
    local_hub.fail_next("/commit/", status=500)
    with pytest.raises(HfHubHTTPError) as exc:
        _push(hub_api, tmp_path, _weights(2), "v2")
    assert exc.value.response.status_code == 500
    assert _state(local_hub, REPO) == before
    # The push can simply be retried.
    _push(hub_api, tmp_path, _weights(2), "v3")
    assert local_hub.files(REPO)["adapter_model.safetensors"] == _weights(2)


def test_server_dies_mid_push(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    _push(hub_api, tmp_path, _weights(1), "v1")
    before = _state(local_hub, REPO)
    local_hub.go_down_after(0, "/commit/")  # LFS upload goes through, the commit POST never gets an answer
    with pytest.raises(httpx2.TransportError):
        _push(hub_api, tmp_path, _weights(2), "v2")
    assert local_hub.is_down
    assert hashlib.sha256(_weights(2)).hexdigest() in local_hub.lfs_objects(REPO)  # orphan object only
    with pytest.raises(httpx2.TransportError):
        hub_api.model_info(REPO)
    assert _state(local_hub, REPO) == before
    local_hub.come_back()
    assert hub_api.model_info(REPO).sha == before[1]["branches"]["main"]


def test_server_dies_during_lfs_upload(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    before = _state(local_hub, REPO)
    local_hub.go_down_after(0, "/__lfs__/")
    with pytest.raises(RuntimeError, match="Error while uploading"):
        _push(hub_api, tmp_path, _weights(1))
    assert _state(local_hub, REPO) == before
    assert local_hub.lfs_objects(REPO) == {}


def test_transient_errors_are_retried_by_client(local_hub, hub_api, tmp_path):
    hub_api.create_repo(REPO)
    local_hub.fail_next("/preupload/", status=503)
    local_hub.fail_next("/__lfs__/", status=500, times=2)
    local_hub.drop_next("/info/lfs/objects/batch")
    info = _push(hub_api, tmp_path, _weights(4))
    assert local_hub.head(REPO) == info.oid
    assert [r.status for r in local_hub.requests_matching("/__lfs__/")] == [500, 500, 200]


def test_lfs_object_reused_and_sha_checked(local_hub, hub_api):
    hub_api.create_repo(REPO)
    hub_api.upload_file(path_or_fileobj=_weights(7), path_in_repo="a.safetensors", repo_id=REPO)
    hub_api.upload_file(path_or_fileobj=_weights(7), path_in_repo="b.safetensors", repo_id=REPO)
    assert len(local_hub.requests_matching("/__lfs__/", "PUT")) == 1  # batch said: already stored

    # A PUT whose bytes do not match the announced sha256 is refused.
    oid = hashlib.sha256(b"expected").hexdigest()
    r = get_session().post(
        f"{local_hub.endpoint}/{REPO}.git/info/lfs/objects/batch",
        headers={"Authorization": "Bearer hf_write_alice"},
        json={"operation": "upload", "objects": [{"oid": oid, "size": 8}], "hash_algo": "sha256"},
    )
    href = r.json()["objects"][0]["actions"]["upload"]["href"]
    assert get_session().put(href, content=b"tampered").status_code == 400
    # And a commit cannot reference an LFS object that was never uploaded.
    body = (
        json.dumps({"key": "header", "value": {"summary": "x"}}) + "\n"
        + json.dumps({"key": "lfsFile", "value": {"path": "c.bin", "algo": "sha256", "oid": oid, "size": 8}}) + "\n"
    )
    r = get_session().post(
        f"{local_hub.endpoint}/api/models/{REPO}/commit/main",
        headers={"Authorization": "Bearer hf_write_alice", "Content-Type": "application/x-ndjson"},
        content=body.encode(),
    )
    assert r.status_code == 400 and "c.bin" not in local_hub.files(REPO)


def test_parent_commit_conflict(local_hub, hub_api):
    hub_api.create_repo(REPO)
    stale = local_hub.head(REPO)
    hub_api.upload_file(path_or_fileobj=b"1", path_in_repo="v.txt", repo_id=REPO)
    with pytest.raises(HfHubHTTPError) as exc:
        hub_api.upload_file(path_or_fileobj=b"2", path_in_repo="v.txt", repo_id=REPO, parent_commit=stale)
    assert exc.value.response.status_code == 412


def test_bad_request_maps_to_bad_request_error(local_hub, hub_api):
    hub_api.create_repo(REPO)
    r = get_session().post(
        f"{local_hub.endpoint}/api/models/{REPO}/commit/main",
        headers={"Authorization": "Bearer hf_write_alice"},
        content=b"not json\n",
    )
    from huggingface_hub.utils import hf_raise_for_status

    with pytest.raises(BadRequestError):
        hf_raise_for_status(r)


# ------------------------------------------------------------------------------------------------ variants


def test_multipart_and_cdn_redirect(local_hub, tmp_path):
    """A second hub with other options, addressed with explicit `endpoint=`: multipart LFS upload, and LFS
    downloads through a 302 to a 'CDN' origin (http://localhost:PORT vs http://127.0.0.1:PORT) that the
    client calls without its Authorization header."""
    with LocalHub(multipart_chunk_size=1000, lfs_redirect=True) as hub:
        hub.add_token("hf_write_alice", "alice")
        api = HfApi(endpoint=hub.endpoint, token="hf_write_alice")
        api.create_repo(REPO, private=True)
        weights = _weights(8, n=5000)
        api.upload_file(path_or_fileobj=weights, path_in_repo="w.safetensors", repo_id=REPO)
        assert len(hub.requests_matching("/part/", "PUT")) == -(-len(weights) // 1000)
        assert hub.files(REPO)["w.safetensors"] == weights

        path = hf_hub_download(REPO, "w.safetensors", token="hf_write_alice", endpoint=hub.endpoint)
        assert Path(path).read_bytes() == weights
        cdn = hub.requests_matching("/__cdn__/", "GET")
        assert len(cdn) == 1 and cdn[0].user is None
        assert not local_hub.requests  # the fixture's hub saw nothing


def test_seeded_repo_download(local_hub):
    oid = local_hub.seed("bob/base", {"config.json": "{}", "model.safetensors": _weights(0)})
    assert local_hub.lfs_paths("bob/base") == {"model.safetensors"}
    snap = Path(snapshot_download("bob/base", allow_patterns=["*.json"]))
    assert snap.name == oid and [p.name for p in snap.iterdir()] == ["config.json"]


def test_context_manager_stops_cleanly():
    before = {t.ident for t in threading.enumerate()}
    with LocalHub() as hub:
        hub.add_token("t", "u")
        endpoint = hub.endpoint
        client = httpx2.Client()  # keep-alive connection left open on purpose
        assert client.get(f"{endpoint}/api/whoami-v2", headers={"Authorization": "Bearer t"}).json()["name"] == "u"
    assert not hub.running
    extra = [(t.name, t.daemon) for t in threading.enumerate() if t.is_alive() and t.ident not in before]
    assert not extra, extra
    with pytest.raises(httpx2.TransportError):
        client.get(f"{endpoint}/api/whoami-v2")
    client.close()
