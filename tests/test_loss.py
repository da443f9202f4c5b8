"""The chunked linear cross-entropy equals transformers' own loss, and logits stay available."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
)

from hf_peft_plugin import ConfigError, LoraConfig, PromptTuningConfig, prepare_model
from hf_peft_plugin.loss import default_chunk_size
from tests.tiny_models import VOCAB, CopyTaskDataset, perturb_trainable, tiny_llama, token_batch, train_copy_task

CHUNK = 5  # tokens per chunk: several chunks per batch, the last one partial


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not scored
    labels[1, -3:] = -100  # padding
    return labels


def _step(model, ids, labels, **kwargs):
    """Loss, gradients of the trainable parameters and the output's logits of one training step."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, out.logits


def _pair(build, **prepare):
    """The same model prepared with and without the chunked loss, same (perturbed) adapters."""
    models = []
    for chunked in (True, False):
        model = prepare_model(build(), bits=None, chunked_loss=chunked, loss_chunk_size=CHUNK, **prepare)
        models.append(perturb_trainable(model))
    return models


CASES = {
    "lora all-linear": dict(lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear")),
    "tied embeddings": dict(lora=LoraConfig(r=4, alpha=8, dropout=0.0)),
    "lora on lm_head": dict(lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "lm_head"])),
    "trained lm_head copy": dict(lora=LoraConfig(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])),
    "soft prompt": dict(lora=None, prompt=PromptTuningConfig(num_virtual_tokens=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_transformers(case):
    # num_items_in_batch, as the Trainer passes it (the mean over labelled tokens: the other tests)
    num_items = 23
    build = (lambda: tiny_llama(tie_word_embeddings=True)) if case == "tied embeddings" else tiny_llama
    chunked, standard = _pair(build, **CASES[case])
    ids = token_batch(2, 12)
    extra = {"num_items_in_batch": torch.tensor(num_items)}
    loss, grads, logits = _step(chunked, ids, _labels(ids), **extra)
    ref_loss, ref_grads, ref_logits = _step(standard, ids, _labels(ids), **extra)
    assert logits is None and ref_logits.shape[-1] == VOCAB
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    if case == "soft prompt":  # the gradient reached the prompt's input embeddings
        assert next(iter(grads.values())).abs().sum() > 0


def test_full_logits_are_never_built():
    chunked, standard = _pair(tiny_llama, lora=LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["lm_head"]))
    for model, most in ((chunked, CHUNK), (standard, 2 * 12)):
        rows = []
        head = model.get_output_embeddings()
        handle = head.register_forward_hook(lambda m, i, o: rows.append(o.reshape(-1, o.shape[-1]).shape[0]))
        ids = token_batch(2, 12)
        _step(model, ids, _labels(ids))
        handle.remove()
        assert max(rows) == most
    assert sum(rows) == 2 * 12  # the standard path projected every position, the chunked one only 15 of 24


def test_packed_rows_without_attention_mask():
    """A padding-free batch: one row, position_ids restarting per example, -100 at each example's start."""
    chunked, standard = _pair(tiny_llama, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    ids = token_batch(1, 20)
    positions = torch.cat([torch.arange(8), torch.arange(12)]).unsqueeze(0)
    labels = ids.clone()
    labels[0, 0] = labels[0, 8] = -100
    loss, grads, _ = _step(chunked, ids, labels, position_ids=positions)
    ref_loss, ref_grads, _ = _step(standard, ids, labels, position_ids=positions)
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


def test_shift_labels_and_bf16():
    chunked, standard = _pair(tiny_llama, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    ids = token_batch(2, 12)
    shifted = torch.nn.functional.pad(_labels(ids), (0, 1), value=-100)[:, 1:]
    loss, _, _ = _step(chunked, ids, _labels(ids), shift_labels=shifted)
    ref_loss, _, _ = _step(standard, ids, _labels(ids))
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for model in (chunked, standard):
        model.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads, _ = _step(chunked, ids, _labels(ids))
        ref_loss, ref_grads, _ = _step(standard, ids, _labels(ids))
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) <= 1e-2
    for name in grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), rtol=0.05, atol=0.02)


SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
)
TRANSFORMED = {
    "gemma2 softcap": (Gemma2Config, Gemma2ForCausalLM, dict(final_logit_softcapping=2.0, head_dim=16)),
    "cohere logit_scale": (CohereConfig, CohereForCausalLM, dict(logit_scale=0.3)),
    "granite logits_scaling": (GraniteConfig, GraniteForCausalLM, dict(logits_scaling=4.0)),
}


@pytest.mark.parametrize("case", list(TRANSFORMED))
def test_final_logit_scaling_and_softcapping(case):
    config_cls, model_cls, extra = TRANSFORMED[case]

    def build():
        torch.manual_seed(0)
        return model_cls(config_cls(**SMALL, **extra))

    chunked, standard = _pair(build, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    ids = token_batch(2, 12)
    loss, grads, logits = _step(chunked, ids, _labels(ids))
    ref_loss, ref_grads, _ = _step(standard, ids, _labels(ids))
    assert logits is None
    assert abs(loss.item() - ref_loss.item()) <= 1e-5
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


def test_unknown_logit_transform_falls_back_with_one_log_line(caplog):
    def build():
        model = tiny_llama()
        model.config.lm_head_multiplier = 2.0  # a transform this loss does not know for llama
        return model

    model = prepare_model(build(), bits=None, lora=LoraConfig(r=4, alpha=8))
    ids = token_batch(2, 12)
    with caplog.at_level(logging.INFO, logger="hf_peft_plugin.loss"):
        for _ in range(2):
            _, _, logits = _step(model, ids, _labels(ids))
    assert logits is not None and logits.shape == (2, 12, VOCAB)
    lines = [r.getMessage() for r in caplog.records if "lm_head_multiplier" in r.getMessage()]
    assert len(lines) == 1 and "standard (full-logits) loss" in lines[0]


def test_logits_when_they_can_be_wanted():
    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=4, alpha=8))
    ids = token_batch(2, 12)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 12, VOCAB) and out.loss is not None
    model.train()
    assert model(input_ids=ids).logits.shape == (2, 12, VOCAB)  # no labels
    assert model(ids, labels=ids).logits is None  # positional input_ids, training with labels
    off = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=4, alpha=8), chunked_loss=False).train()
    assert off(input_ids=ids, labels=ids).logits.shape == (2, 12, VOCAB)


def test_trainer_train_evaluate_predict(tmp_path):
    """Gradient accumulation (num_items_in_batch) gives the same losses; evaluate/predict get logits."""
    from transformers import Trainer, TrainingArguments

    losses = []
    for chunked in (False, True):  # the chunked model, last, is the one evaluated below
        model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=4, alpha=8, dropout=0.0), chunked_loss=chunked)
        losses.append(train_copy_task(model, tmp_path / str(chunked), steps=6, gradient_accumulation_steps=2))
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5) and len(losses[0]) == 3

    seen = {}

    def metrics(pred):
        seen["shape"] = pred.predictions.shape
        return {"n": float(pred.predictions.shape[0])}

    args = TrainingArguments(output_dir=str(tmp_path / "eval"), report_to=[], use_cpu=True, per_device_eval_batch_size=4)
    trainer = Trainer(model=model, args=args, eval_dataset=CopyTaskDataset(8), compute_metrics=metrics)
    result = trainer.evaluate()
    assert seen["shape"] == (8, 16, VOCAB) and result["eval_n"] == 8.0 and result["eval_loss"] > 0
    assert trainer.predict(CopyTaskDataset(4)).predictions.shape == (4, 16, VOCAB)


def test_bad_settings_raise_config_error():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="loss_chunk_size"):
            prepare_model(tiny_llama(), bits=None, loss_chunk_size=bad)
    with pytest.raises(ConfigError, match="chunked_loss"):
        prepare_model(tiny_llama(), bits=None, chunked_loss="yes")
    assert default_chunk_size(128_256) == 64 and default_chunk_size(49_152) == 128 and default_chunk_size(128) == 4096


def test_four_bit_with_gradient_checkpointing_trains():
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4, alpha=8), gradient_checkpointing=True)
    ids = token_batch(2, 12)
    loss, grads, logits = _step(model, ids, _labels(ids))
    assert logits is None and torch.isfinite(loss)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
