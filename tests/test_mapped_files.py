"""A CPU model loaded from safetensors lets go of the mapped checkpoint file (mapped_files.py):
the frozen tensors that still view it are copied out, with their values and ties, and the pages
nothing views are dropped first."""

from __future__ import annotations

import mmap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_peft_plugin import LoraConfig, prepare_model
from hf_peft_plugin import mapped_files, model as model_module
from tiny_models import tiny_llama, token_batch


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama with tied embeddings, saved as safetensors."""
    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def _mapped(path) -> list:
    return [m for m in mapped_files.mapped_checkpoints() if m[2].startswith(str(path))]


def test_loading_maps_the_file_and_prepare_model_lets_it_go(checkpoint, monkeypatch):
    monkeypatch.setattr(model_module, "release_checkpoint_mapping", lambda model: 0)
    kept = prepare_model(str(checkpoint), bits=4, lora=LoraConfig(r=4))
    assert _mapped(checkpoint), "the loader no longer maps the file: this test checks nothing"
    monkeypatch.undo()

    model = prepare_model(str(checkpoint), bits=4, lora=LoraConfig(r=4))
    del kept
    assert not _mapped(checkpoint)
    saved = load_file(checkpoint / "model.safetensors")
    embed = model.model.embed_tokens.weight
    assert model.lm_head.weight is embed  # still tied
    assert torch.equal(embed, saved["model.embed_tokens.weight"])
    assert torch.equal(model.model.norm.weight, saved["model.norm.weight"])
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()  # trains from the copies


def test_an_in_place_change_to_a_mapped_weight_survives(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert _mapped(checkpoint), "the loader no longer maps the file: this test checks nothing"
    with torch.no_grad():
        model.model.embed_tokens.weight[3].add_(1.0)  # a copy-on-write page of the mapping
        model.model.layers[0].input_layernorm.weight.mul_(2.0)
    expected_embed = model.model.embed_tokens.weight.detach().clone()
    expected_norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    prepare_model(model, bits=4, lora=LoraConfig(r=4))
    assert not _mapped(checkpoint)
    assert torch.equal(model.model.embed_tokens.weight, expected_embed)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, expected_norm)


def test_only_pages_no_view_touches_are_dropped(monkeypatch):
    advised = []
    monkeypatch.setattr(mapped_files, "_advise", lambda libc, start, length: advised.append((start, start + length)) or length)
    page = mmap.PAGESIZE
    low, high = 16 * page, 32 * page
    views = [(18 * page + 16, 19 * page), (25 * page, 26 * page + 1)]  # partly into pages 18 and 26
    dropped = mapped_files._drop_unviewed_pages([(low, high, "x.safetensors")], views, libc=None)
    assert advised == [(16 * page, 18 * page), (19 * page, 25 * page), (27 * page, 32 * page)]
    assert dropped == 2 * page + 6 * page + 5 * page


def test_a_model_with_nothing_mapped_is_left_alone():
    model = tiny_llama()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    assert mapped_files.release_checkpoint_mapping(model) == 0
    assert before == {n: p.data_ptr() for n, p in model.named_parameters()}
