"""A prepared CPU model gives back the checkpoint pages only the loader read (mapped_files.py):
the pages its tensors touch stay, pages someone wrote to stay, other mappings are not touched."""

from __future__ import annotations

import gc
import mmap
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_peft_plugin import LoraConfig, prepare_model
from hf_peft_plugin import mapped_files, model as model_module
from tiny_models import tiny_llama, token_batch

PAGE = mmap.PAGESIZE


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama with tied embeddings, laid out as the Hub cache does: the folder's
    model.safetensors is a link to a blob, so the mapping is named after the blob."""
    folder = tmp_path / "snapshots" / "main"
    tiny_llama(tie_word_embeddings=True, hidden_size=256, intermediate_size=512).save_pretrained(folder)
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    os.replace(folder / "model.safetensors", blob)
    (folder / "model.safetensors").symlink_to(blob)
    return folder


def _mapping(blob_folder):
    found = [m for m in mapped_files.file_mappings() if m[2].startswith(str(blob_folder))]
    assert found, "the loader no longer maps the file: these tests check nothing"
    return found


def _resident(mappings) -> int:
    """Bytes of the mappings' pages in memory."""
    return sum(int((mapped_files.page_flags(low, high) < 0).sum()) * PAGE for low, high, _ in mappings)


def _touched(model, mappings) -> int:
    """Bytes of the pages the model's tensors touch inside the mappings."""
    pages = set()
    for start, end in mapped_files._tensor_spans(model):
        if any(low <= start < high for low, high, _ in mappings):
            pages.update(range(start // PAGE, -(-end // PAGE)))
    return len(pages) * PAGE


def test_prepare_model_gives_back_what_only_the_loader_read(checkpoint, monkeypatch):
    blobs = checkpoint.parents[1] / "blobs"
    monkeypatch.setattr(model_module, "drop_unread_checkpoint_pages", lambda model: 0)
    kept = prepare_model(str(checkpoint), bits=4, lora=LoraConfig(r=4))
    before = _mapping(blobs)
    assert _resident(before) > _touched(kept, before)  # the quantized layers' float32 sources
    monkeypatch.undo()
    del kept
    gc.collect()

    model = prepare_model(str(checkpoint), bits=4, lora=LoraConfig(r=4))
    after = _mapping(blobs)
    assert 0 < _resident(after) <= _touched(model, after)
    saved = load_file(checkpoint / "model.safetensors")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, saved["model.embed_tokens.weight"])
    assert torch.equal(model.model.norm.weight, saved["model.norm.weight"])
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()


def test_a_page_someone_wrote_to_is_kept(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    _mapping(checkpoint.parents[1] / "blobs")
    up = model.model.layers[0].mlp.up_proj.weight  # quantized below: no longer the model's, still ours
    with torch.no_grad():
        up[5].add_(1.0)  # a copy-on-write page of the mapping
        model.model.embed_tokens.weight[3].add_(1.0)
    expected_up, expected_embed = up.detach().clone(), model.model.embed_tokens.weight.detach().clone()
    prepare_model(model, bits=4, lora=LoraConfig(r=4))
    assert type(model.model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    assert torch.equal(up, expected_up)  # its written page stayed; its clean pages read back the same
    assert torch.equal(model.model.embed_tokens.weight, expected_embed)


def test_another_models_mapping_is_not_touched(checkpoint, tmp_path):
    other = AutoModelForCausalLM.from_pretrained(checkpoint)
    mappings = _mapping(checkpoint.parents[1] / "blobs")
    other_sum = sum(float(p.detach().double().sum()) for p in other.parameters())  # reads every page in
    resident = _resident(mappings)
    tiny_llama(seed=1).save_pretrained(tmp_path / "second")
    prepare_model(str(tmp_path / "second"), bits=4, lora=LoraConfig(r=4))
    assert _resident(mappings) == resident
    assert sum(float(p.detach().double().sum()) for p in other.parameters()) == other_sum


def test_only_clean_pages_no_tensor_touches_are_given_back(monkeypatch):
    low, high = 16 * PAGE, 32 * PAGE
    spans = [(18 * PAGE + 16, 19 * PAGE), (25 * PAGE, 26 * PAGE + 1)]  # partly into pages 18 and 26
    assert mapped_files._unviewed_runs(low, high, spans) == [(16 * PAGE, 18 * PAGE), (19 * PAGE, 25 * PAGE), (27 * PAGE, 32 * PAGE)]
    # Page flags: present file page, present anonymous (written) page, absent page.
    flags = {20: mapped_files._PRESENT | mapped_files._FILE_PAGE, 21: mapped_files._PRESENT, 22: 0, 23: mapped_files._PRESENT | mapped_files._FILE_PAGE}

    def page_flags(start, end):
        values = [flags.get(p, mapped_files._PRESENT | mapped_files._FILE_PAGE) for p in range(start // PAGE, end // PAGE)]
        return torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)

    monkeypatch.setattr(mapped_files, "page_flags", page_flags)
    assert mapped_files._clean_file_runs(19 * PAGE, 25 * PAGE) == [(19 * PAGE, 21 * PAGE), (23 * PAGE, 25 * PAGE)]


def test_a_model_with_nothing_mapped_is_left_alone():
    model = tiny_llama()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert mapped_files.drop_unread_checkpoint_pages(model) == 0
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}
