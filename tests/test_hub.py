"""push_adapter_to_hub against the local Hub (tests/hub_server.py): files, card, errors, round trip."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load

from hf_peft_plugin import (
    BottleneckConfig,
    ConfigError,
    HubPushError,
    LoraConfig,
    PromptTuningConfig,
    add_adapter,
    cli,
    delete_adapter,
    prepare_model,
)
from hf_peft_plugin.hub import CARD_END, CARD_START, adapter_model_card, merge_model_card, push_adapter_to_hub
from hf_peft_plugin.loading import load_adapter
from hf_peft_plugin.saving import save_adapter

from tiny_models import tiny_bert_classifier, tiny_llama, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

REPO = "alice/tiny-adapter"
TOKENS = ("hf_write_alice", "hf_read_alice", "hf_write_bob", "hf_not_a_token")


def adapted(bits: int | None = 4, seed: int = 1, **adapters) -> torch.nn.Module:
    """A prepared tiny Llama (named like a Hub model) whose adapter is far from its identity init."""
    base = tiny_llama()
    base.config._name_or_path = "acme/tiny-llama"
    model = prepare_model(base, bits=bits, **(adapters or {"lora": LoraConfig(r=4, alpha=8)}))
    shift(model, seed)
    return model.eval()


def shift(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def saved_bytes(model: torch.nn.Module, tmp_path: Path) -> dict[str, bytes]:
    folder = tmp_path / "expected"
    save_adapter(model, folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def same_tensors(a: bytes, b: bytes) -> bool:
    """safetensors files hold equal tensors (their bytes can differ: header metadata order varies)."""
    ta, tb = load(a), load(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def card_on_hub(hub, repo: str = REPO) -> ModelCard:
    return ModelCard(hub.files(repo)["README.md"].decode())


def test_first_push_uploads_the_adapter_and_a_card(local_hub, tmp_path):
    model = adapted()
    url = push_adapter_to_hub(model, REPO, token="hf_write_alice")

    assert url.endswith(local_hub.head(REPO))
    files = local_hub.files(REPO)
    assert set(files) == {".gitattributes", "README.md", "adapter_config.json", "adapter_model.safetensors"}
    expected = saved_bytes(model, tmp_path)
    assert same_tensors(files["adapter_model.safetensors"], expected["adapter_model.safetensors"])
    assert files["adapter_config.json"] == expected["adapter_config.json"]
    assert "adapter_model.safetensors" in local_hub.lfs_paths(REPO)  # went through the LFS upload path
    assert all(".lora_" in key for key in load(files["adapter_model.safetensors"]))  # no base weight
    assert [c.title for c in local_hub.commits(REPO)] == ["initial commit", "Upload adapter with hf-peft-plugin"]

    card = card_on_hub(local_hub)
    assert card.data.library_name == "hf-peft-plugin"
    assert card.data.base_model == "acme/tiny-llama"
    assert card.data.pipeline_tag == "text-generation"
    assert {"lora", "4-bit", "bitsandbytes", "peft", "base_model:adapter:acme/tiny-llama"} <= set(card.data.tags)
    text = card.text
    assert CARD_START in text and CARD_END in text
    assert "| r | `4` |" in text and "| alpha | `8` |" in text
    assert "trainable params: " in text and "all params: " in text
    assert "| quant_type | `nf4` |" in text
    assert "from hf_peft_plugin import load_pretrained" in text
    assert f'model = load_pretrained("acme/tiny-llama", "{REPO}")' in text
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in text
    assert "BitsAndBytesConfig(load_in_4bit=True" in text


def test_second_push_of_changed_weights_is_a_new_commit(local_hub, tmp_path):
    model = adapted()
    first = push_adapter_to_hub(model, REPO, token="hf_write_alice")
    old = local_hub.files(REPO)["adapter_model.safetensors"]
    shift(model, seed=2)
    second = push_adapter_to_hub(model, REPO, token="hf_write_alice", commit_message="Step 2")

    assert second != first and second.endswith(local_hub.head(REPO))
    assert [c.title for c in local_hub.commits(REPO)][-2:] == ["Upload adapter with hf-peft-plugin", "Step 2"]
    new = local_hub.files(REPO)["adapter_model.safetensors"]
    assert not same_tensors(new, old) and same_tensors(new, saved_bytes(model, tmp_path)["adapter_model.safetensors"])


def test_private_repo_is_not_readable_by_others(local_hub):
    push_adapter_to_hub(adapted(), REPO, token="hf_write_alice", private=True)
    assert local_hub.is_private(REPO)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=local_hub.endpoint, token="hf_write_bob").model_info(REPO)


def test_round_trip_gives_identical_logits(local_hub):
    model = adapted(bits=None)
    push_adapter_to_hub(model, REPO, token="hf_write_alice", private=True)
    loaded = load_adapter(tiny_llama(), REPO, token="hf_write_alice")
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        assert not torch.equal(tiny_llama()(ids).logits, model(ids).logits)


def test_existing_readme_is_updated_not_clobbered(local_hub):
    mine = "---\nlicense: mit\ntags:\n- mine\n---\n# My notes\n\nKeep me.\n"
    local_hub.seed(REPO, {"README.md": mine}, author="alice")
    model = adapted()
    push_adapter_to_hub(model, REPO, token="hf_write_alice")
    shift(model, seed=2)
    push_adapter_to_hub(model, REPO, token="hf_write_alice")  # our section is replaced, not repeated
    assert len(local_hub.commits(REPO)) == 4

    card = card_on_hub(local_hub)
    assert card.data.license == "mit" and card.data.library_name == "hf-peft-plugin"
    assert card.data.tags[0] == "mine" and "lora" in card.data.tags
    assert card.text.lstrip().startswith("# My notes\n\nKeep me.")
    assert card.text.count(CARD_START) == 1 and card.text.count("## Adapters") == 1


def test_merge_replaces_only_our_section():
    ours = adapter_model_card(adapted(), REPO, Path("/nonexistent"))
    before = f"intro\n\n{CARD_START}\nold stuff\n{CARD_END}\n\noutro\n"
    merged = merge_model_card(before, ours).text
    assert merged.startswith("intro\n\n" + CARD_START) and merged.rstrip().endswith("outro")
    assert "old stuff" not in merged and "## Adapters" in merged


def test_card_of_prompt_and_bottleneck_adapters(tmp_path):
    model = adapted(bits=8, prompt=PromptTuningConfig(num_virtual_tokens=3), bottleneck=BottleneckConfig())
    save_adapter(model, tmp_path)
    card = adapter_model_card(model, REPO, tmp_path, metrics={"loss": 1.25, "eval_loss": 1.5})
    assert {"prompt-tuning", "bottleneck-adapter", "8-bit", "bitsandbytes"} <= set(card.data.tags)
    assert "lora" not in card.data.tags and "peft" not in card.data.tags  # peft has no bottleneck format
    assert "PeftModel" not in card.text and "| num_virtual_tokens | `3` |" in card.text
    assert "| eval_loss | `1.5` |" in card.text and "| int8_threshold | `6` |" in card.text


def test_local_base_path_is_not_published(tmp_path):
    base = tiny_llama()
    base.config._name_or_path = str(tmp_path)  # an existing local folder
    model = prepare_model(base, bits=None, lora=LoraConfig(r=2))
    card = adapter_model_card(model, REPO, tmp_path)
    assert card.data.base_model is None and str(tmp_path) not in str(card)
    assert not any(t.startswith("base_model:") for t in card.data.tags)


def test_create_pr_and_revision(local_hub):
    model = adapted()
    push_adapter_to_hub(model, REPO, token="hf_write_alice")
    main = local_hub.head(REPO)
    shift(model, seed=2)  # an unchanged upload makes no commit (and no PR)
    push_adapter_to_hub(model, REPO, token="hf_write_alice", create_pr=True, commit_message="Proposal")
    assert local_hub.head(REPO) == main and [pr.title for pr in local_hub.pull_requests(REPO)] == ["Proposal"]
    url = push_adapter_to_hub(model, REPO, token="hf_write_alice", revision="experiment")
    assert url.endswith(local_hub.head(REPO, "experiment")) and local_hub.head(REPO) == main


def test_invalid_repo_id_is_a_config_error(local_hub):
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        push_adapter_to_hub(adapted(), "not a/valid/id", token="hf_write_alice")
    assert local_hub.requests == []


def failed_push(hub, caplog, repo: str = REPO, **kwargs) -> HubPushError:
    """Push, expect a HubPushError; check nothing was committed and no token was logged or raised."""
    caplog.set_level(logging.DEBUG)
    model = adapted()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    history = hub.commits(repo) if hub.repo_exists(repo) else []
    with pytest.raises(HubPushError) as info:
        push_adapter_to_hub(model, repo, **kwargs)
    hub.come_back()
    assert not hub.repo_exists(repo) or hub.commits(repo) in (history, hub.commits(repo)[:1])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    for token in TOKENS:
        assert token not in caplog.text and token not in str(info.value)
    return info.value


def test_no_token(local_hub, caplog):
    error = failed_push(local_hub, caplog)
    assert "none was found" in str(error) and "hf auth login" in str(error) and "HF_TOKEN" in str(error)


def test_invalid_token(local_hub, caplog):
    error = failed_push(local_hub, caplog, token="hf_not_a_token")
    assert "401" in str(error) and "invalid, expired or revoked" in str(error)


def test_read_only_token(local_hub, caplog):
    error = failed_push(local_hub, caplog, token="hf_read_alice")
    assert "403" in str(error) and "read-only" in str(error) and "write access" in str(error)


def test_repo_owned_by_someone_else(local_hub, caplog):
    local_hub.seed(REPO, {"notes.txt": "alice's"}, author="alice")
    error = failed_push(local_hub, caplog, token="hf_write_bob")
    assert "'alice' is neither your user nor an organization" in str(error)
    assert set(local_hub.files(REPO)) == {".gitattributes", "notes.txt"}


def test_server_down_mid_push_keeps_local_files(local_hub, caplog, tmp_path):
    model = adapted()
    local = tmp_path / "adapter"
    save_adapter(model, local)
    before = {p.name: p.read_bytes() for p in local.iterdir()}
    local_hub.go_down_after(0, "/commit/")  # dies after the LFS upload, when the commit is posted
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubPushError, match="Could not reach the Hub") as info:
        push_adapter_to_hub(model, REPO, token="hf_write_alice")
    assert "No commit was made" in str(info.value)
    local_hub.come_back()
    assert [c.title for c in local_hub.commits(REPO)] == ["initial commit"]
    assert {p.name: p.read_bytes() for p in local.iterdir()} == before
    assert "hf_write_alice" not in caplog.text


def test_network_down(local_hub, caplog):
    local_hub.stop()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(HubPushError, match="Could not reach the Hub at http://127.0.0.1") as info:
        push_adapter_to_hub(adapted(), REPO, token="hf_write_alice")
    assert "ConnectError" in str(info.value) and "hf_write_alice" not in caplog.text


# -- `hf-peft-plugin push`: a saved folder to the Hub ---------------------------------------------


@pytest.fixture
def saved_4bit_adapter(tmp_path) -> tuple[Path, Path, torch.nn.Module]:
    """A tiny Llama saved as a local base, and a trained 4-bit LoRA adapter saved for it."""
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = prepare_model(str(base_dir), bits=4, lora=LoraConfig(r=4, alpha=8))
    shift(model, seed=3)
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    return base_dir, folder, model.eval()


def test_cli_push_publishes_a_saved_folder_as_trained(local_hub, monkeypatch, saved_4bit_adapter, capsys):
    base_dir, folder, trained = saved_4bit_adapter
    monkeypatch.setenv("HF_TOKEN", "hf_write_alice")
    assert cli.main(["push", str(folder), REPO, "--bits", "4"]) == 0  # the base is read from the config
    assert capsys.readouterr().out.strip().endswith(local_hub.head(REPO))
    files = local_hub.files(REPO)
    assert same_tensors(files["adapter_model.safetensors"], (folder / "adapter_model.safetensors").read_bytes())
    card = card_on_hub(local_hub)
    assert "4-bit" in card.data.tags and "nf4" in card.text
    reloaded = load_adapter(prepare_model_base(base_dir), REPO)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def prepare_model_base(base_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=nf4, dtype=torch.float32)


def test_cli_push_bad_input_exits_2_before_loading_anything(local_hub, tmp_path, saved_4bit_adapter, capsys):
    _, folder, _ = saved_4bit_adapter
    assert cli.main(["push", str(tmp_path / "nowhere"), REPO]) == 2
    assert "holds no adapter_config.json or hf_peft_plugin_config.json" in capsys.readouterr().err
    assert cli.main(["push", str(folder), "not a/valid/id"]) == 2
    assert "not a Hub repo id" in capsys.readouterr().err
    assert cli.main(["push", str(folder), REPO, "--base", str(tmp_path / "missing-base")]) == 2
    assert "Could not load the base model" in capsys.readouterr().err
    assert local_hub.requests == []


def test_cli_push_without_a_token_exits_1_and_keeps_the_folder(local_hub, saved_4bit_adapter, capsys):
    _, folder, _ = saved_4bit_adapter
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert cli.main(["push", str(folder), REPO]) == 1
    assert "none was found" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not local_hub.repo_exists(REPO)


def test_cli_push_takes_every_adapter_of_the_folder(local_hub, monkeypatch, tmp_path):
    """The default adapter at the top (LoRA) and a named one in its sub-folder (a bottleneck
    adapter, described by this package's own config file) are pushed together."""
    from hf_peft_plugin import add_adapter, set_active_adapters

    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    model = prepare_model(str(base_dir), bits=None, lora=LoraConfig(r=4, alpha=8))
    add_adapter(model, "fr", bottleneck=BottleneckConfig(reduction_factor=4))
    set_active_adapters(model, ["default", "fr"])  # both trainable, so both move away from identity
    shift(model, seed=4)
    folder = tmp_path / "adapters"
    save_adapter(model, folder)
    assert (folder / "fr" / "hf_peft_plugin_config.json").is_file()
    monkeypatch.setenv("HF_TOKEN", "hf_write_alice")
    assert cli.main(["push", str(folder), REPO, "--bits", "none"]) == 0
    files = local_hub.files(REPO)
    for path in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()):
        assert path in files, path
    from transformers import AutoModelForCausalLM

    ids = token_batch()
    outputs = {}
    for name in ("default", "fr"):
        set_active_adapters(model, [name])
        kwargs = {} if name == "default" else {"subfolder": name, "adapter_name": name}
        reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), REPO, **kwargs)
        with torch.no_grad():
            outputs[name] = model.eval()(input_ids=ids).logits
            torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, outputs[name])
    assert not torch.allclose(outputs["default"], outputs["fr"], atol=1e-3)


def test_cli_push_builds_the_classifier_as_wide_as_the_saved_head(local_hub, monkeypatch, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base_dir = tmp_path / "bert"
    tiny_bert_classifier(num_labels=2).save_pretrained(base_dir)  # the base's own config says 2
    three = {"num_labels": 3, "ignore_mismatched_sizes": True}
    model = prepare_model(str(base_dir), bits=4, lora=LoraConfig(r=4), task_type="SEQ_CLS", **three)
    shift(model, seed=5)
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    monkeypatch.setenv("HF_TOKEN", "hf_write_alice")
    assert cli.main(["push", str(folder), REPO]) == 0
    assert "text-classification" in card_on_hub(local_hub).data.pipeline_tag
    reloaded = load_adapter(AutoModelForSequenceClassification.from_pretrained(base_dir, **three), REPO)
    assert reloaded.classifier.modules_to_save["default"].out_features == 3


# -- connection dropped mid-upload, local errors, request ids, privacy, stale files ---------------


def test_connection_dropped_mid_upload_is_a_hub_push_error(local_hub, caplog, tmp_path):
    model = adapted()
    local = tmp_path / "adapter"
    save_adapter(model, local)
    before = {p.name: p.read_bytes() for p in local.iterdir()}
    local_hub.drop_next("/__lfs__/", times=-1)  # every try of the weights upload loses its connection
    error = failed_push(local_hub, caplog, token="hf_write_alice")
    assert "Could not reach the Hub" in str(error) and "RemoteProtocolError" in str(error)
    assert "No commit was made" in str(error)
    assert local_hub.requests_matching("/__lfs__/") and not local_hub.requests_matching("/commit/")
    assert {p.name: p.read_bytes() for p in local.iterdir()} == before


def test_an_unreadable_staged_file_is_a_local_error_not_the_network(local_hub, caplog, monkeypatch):
    import hf_peft_plugin.hub as hub_module

    def unreadable(path_in_repo, path_or_fileobj):
        raise PermissionError(13, "Permission denied", path_or_fileobj)

    monkeypatch.setattr(hub_module, "CommitOperationAdd", unreadable)
    error = failed_push(local_hub, caplog, token="hf_write_alice")
    assert "Could not reach the Hub" not in str(error)
    assert "local problem" in str(error) and "PermissionError" in str(error) and "Permission denied" in str(error)


def test_the_hubs_request_id_is_in_the_message(local_hub, caplog):
    error = failed_push(local_hub, caplog, token="hf_read_alice")
    assert "(request id Root=1-" in str(error)


def test_repos_are_private_unless_asked_otherwise(local_hub):
    push_adapter_to_hub(adapted(), "alice/default", token="hf_write_alice")
    push_adapter_to_hub(adapted(), "alice/public", token="hf_write_alice", private=False)
    assert local_hub.is_private("alice/default") and not local_hub.is_private("alice/public")


def test_a_deleted_adapter_leaves_the_repo_with_the_next_push(local_hub):
    model = adapted()
    add_adapter(model, "fr", lora=LoraConfig(r=2, target_modules=["q_proj"]))
    push_adapter_to_hub(model, REPO, token="hf_write_alice")
    assert {"fr/adapter_config.json", "fr/adapter_model.safetensors"} <= set(local_hub.files(REPO))
    delete_adapter(model, "fr")
    push_adapter_to_hub(model, REPO, token="hf_write_alice")
    assert not [p for p in local_hub.files(REPO) if p.startswith("fr/")]


def test_cli_push_public_and_private(local_hub, monkeypatch, saved_4bit_adapter, capsys):
    base_dir, folder, _ = saved_4bit_adapter
    monkeypatch.setenv("HF_TOKEN", "hf_write_alice")
    assert cli.main(["push", str(folder), "alice/cli-default", "--base", str(base_dir)]) == 0
    assert cli.main(["push", str(folder), "alice/cli-public", "--base", str(base_dir), "--public"]) == 0
    assert local_hub.is_private("alice/cli-default") and not local_hub.is_private("alice/cli-public")


def test_cli_push_connection_dropped_exits_1_with_a_message(local_hub, monkeypatch, saved_4bit_adapter, capsys):
    base_dir, folder, _ = saved_4bit_adapter
    monkeypatch.setenv("HF_TOKEN", "hf_write_alice")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    local_hub.drop_next("/__lfs__/", times=-1)
    assert cli.main(["push", str(folder), REPO, "--base", str(base_dir)]) == 1
    err = capsys.readouterr().err
    assert "\nhf-peft-plugin: Could not reach the Hub" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def _list_config(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("[1, 2]")


def _truncate_weights(folder: Path) -> None:
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-64])


CLI_BAD_FILES = {
    "config not json": (lambda d: (d / "adapter_config.json").write_text("{oops"), "not valid JSON"),
    "config is a list": (_list_config, "must hold a JSON object; it holds a list"),
    "truncated weights": (_truncate_weights, "not a readable safetensors file"),
}


@pytest.mark.parametrize("problem", sorted(CLI_BAD_FILES))
def test_cli_push_of_bad_files_exits_2_with_a_message(problem, local_hub, tmp_path, capsys):
    model = prepare_model(tiny_bert_classifier(), bits=None, lora=LoraConfig(r=2, target_modules=["query"]))
    folder = tmp_path / "adapter"
    save_adapter(model, folder)
    assert "classifier" in json.loads((folder / "adapter_config.json").read_text())["modules_to_save"]
    damage, message = CLI_BAD_FILES[problem]
    damage(folder)
    assert cli.main(["push", str(folder), REPO, "--base", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-peft-plugin: ") and message in err and "Traceback" not in err
    assert local_hub.requests == []
