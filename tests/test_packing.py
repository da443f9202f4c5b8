"""Padding-free batches: packed examples never see each other, and train exactly as when padded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from hf_peft_plugin import BottleneckConfig, ConfigError, LoraConfig, PromptTuningConfig, prepare_model
from hf_peft_plugin.packing import check_packing_supported, is_packed, padding_free_collator
from tiny_models import CAUSAL_LMS, VOCAB, perturb_trainable, tiny_bert_classifier, tiny_llama, token_batch

LENGTHS = (5, 11, 8)


def examples(prompt_len: int = 2) -> list[dict]:
    """Answer-only labels: the first ``prompt_len`` tokens of each example are unscored."""
    rows = []
    for i, n in enumerate(LENGTHS):
        ids = token_batch(1, n, seed=10 + i)[0].tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
    return rows


def padded(rows: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, segments: list[tuple[int, int, int]]) -> torch.Tensor:
    """Mean next-token loss of each example; ``segments``: (row, start, end) in the batch."""
    out = []
    for row, start, end in segments:
        out.append(F.cross_entropy(logits[row, start : end - 1].float(), labels[row, start + 1 : end]))
    return torch.stack(out)


def padded_segments(rows: list[dict], extra: int = 0) -> list[tuple[int, int, int]]:
    return [(i, extra, extra + len(r["input_ids"])) for i, r in enumerate(rows)]


def packed_segments(rows: list[dict], extra: int = 0) -> list[tuple[int, int, int]]:
    out, at = [], 0
    for r in rows:
        out.append((0, at + extra, at + extra + len(r["input_ids"])))
        at += extra + len(r["input_ids"])
    return out


def with_attention(model, implementation: str):
    model.set_attn_implementation(implementation)
    return model


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_transformers_lets_packed_examples_see_each_other_while_a_cache_is_on(implementation):
    """Why the guard exists: transformers 5.24 builds the block-diagonal mask from position_ids
    only without a cache, and a causal LM creates one whenever config.use_cache is on."""
    model = with_attention(tiny_llama(), implementation).train()
    rows = examples()
    batch = DataCollatorWithFlattening()(rows)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    leaky = model(**inputs).logits
    apart = model(**inputs, use_cache=False).logits
    assert model.config.use_cache
    assert (leaky - apart).abs().max() > 1e-3
    alone = model(input_ids=torch.tensor([rows[1]["input_ids"]])).logits[0]
    start = len(rows[0]["input_ids"])
    torch.testing.assert_close(apart[0, start : start + len(alone)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", sorted(CAUSAL_LMS))
def test_packed_batch_gives_each_example_its_padded_loss(family, implementation):
    model = CAUSAL_LMS[family]()
    for module in model.modules():  # GPT-2's dropout would make train-mode outputs random
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model = perturb_trainable(prepare_model(with_attention(model, implementation), bits=None, lora=LoraConfig(r=4)))
    rows = examples()
    pad, pack = padded(rows), padding_free_collator(model)(rows)
    assert set(pack) == {"input_ids", "labels", "position_ids"} and pack["input_ids"].shape == (1, sum(LENGTHS))
    for mode in ("eval", "train"):  # train: no checkpointing, so transformers would create a cache
        getattr(model, mode)()
        with torch.no_grad():
            got = model(input_ids=pack["input_ids"], position_ids=pack["position_ids"]).logits
            want = model(input_ids=pad["input_ids"], attention_mask=pad["attention_mask"]).logits
        losses_packed = per_example_losses(got, pack["input_ids"], packed_segments(rows))
        losses_padded = per_example_losses(want, pad["input_ids"], padded_segments(rows))
        torch.testing.assert_close(losses_packed, losses_padded, atol=1e-5, rtol=0)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_loss_and_gradients_match_padded_with_lora_and_bottleneck(gradient_checkpointing):
    model = prepare_model(
        tiny_llama(),
        bits=4,
        lora=LoraConfig(r=4),
        bottleneck=BottleneckConfig(bottleneck_size=8),
        gradient_checkpointing=gradient_checkpointing,
    )
    model = perturb_trainable(model).train()
    rows = examples()
    loss_pad, grads_pad = _loss_and_grads(model, padded(rows))
    loss_pack, grads_pack = _loss_and_grads(model, padding_free_collator(model)(rows))
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-5, rtol=0)
    assert any("bottleneck" in n or "adapter" in n for n in grads_pad) and any("lora_" in n for n in grads_pad)
    for name in grads_pad:
        torch.testing.assert_close(grads_pack[name], grads_pad[name], atol=1e-5, rtol=1e-4, msg=name)


def test_soft_prompt_goes_before_every_packed_example():
    n = 3
    model = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=4), prompt=PromptTuningConfig(num_virtual_tokens=n))
    model = perturb_trainable(model)
    rows = examples()
    pad, pack = padded(rows), padding_free_collator(model)(rows)
    with torch.no_grad():
        got = model(input_ids=pack["input_ids"], position_ids=pack["position_ids"]).logits
        want = model(input_ids=pad["input_ids"], attention_mask=pad["attention_mask"]).logits
    assert got.shape[1] == sum(LENGTHS) + n * len(LENGTHS)
    # Outputs are laid out [prompt][example] per example; the targets are the original ids.
    targets = torch.cat([torch.cat([torch.zeros(n, dtype=torch.long), torch.tensor(r["input_ids"])]) for r in rows])[None]
    losses_packed = per_example_losses(got, targets, packed_segments(rows, extra=n))
    pad_targets = torch.cat([torch.zeros((len(rows), n), dtype=torch.long), pad["input_ids"]], dim=1)
    losses_padded = per_example_losses(want, pad_targets, padded_segments(rows, extra=n))
    torch.testing.assert_close(losses_packed, losses_padded, atol=1e-5, rtol=0)

    model.train()  # the training loss and the prompt's gradient, through the chunked loss
    loss_pad, grads_pad = _loss_and_grads(model, pad)
    loss_pack, grads_pack = _loss_and_grads(model, pack)
    torch.testing.assert_close(loss_pack, loss_pad, atol=1e-5, rtol=0)
    [prompt_grad] = [n for n in grads_pad if "prompt_encoder" in n]
    assert grads_pad[prompt_grad].abs().sum() > 0
    for name in grads_pad:
        torch.testing.assert_close(grads_pack[name], grads_pad[name], atol=1e-5, rtol=1e-4, msg=name)


def test_soft_prompt_fills_rows_with_fewer_examples():
    """Two packed rows with 2 and 1 examples: the shorter row is filled with a block of its own."""
    n = 2
    model = perturb_trainable(prepare_model(tiny_llama(), bits=None, prompt=PromptTuningConfig(num_virtual_tokens=n)))
    a, b, c = (token_batch(1, 6, seed=s)[0] for s in (1, 2, 3))
    ids = torch.stack([torch.cat([a, b]), torch.cat([c, token_batch(1, 6, seed=4)[0]])])
    positions = torch.stack([torch.cat([torch.arange(6), torch.arange(6)]), torch.arange(12)])
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=positions).logits
        alone = model(input_ids=c[None]).logits[0]
    assert got.shape[1] == 12 + 2 * n
    torch.testing.assert_close(got[1, n : n + 6], alone[n:], atol=1e-5, rtol=0)


def test_packing_needs_attention_that_keeps_examples_apart():
    model = prepare_model(tiny_llama(), bits=None)
    pack = padding_free_collator(model)(examples())
    model.config._attn_implementation = "flash_attention_2"
    check_packing_supported(model)  # one row: the varlen kernel takes the restarts from position_ids
    two_rows = {k: v.expand(2, -1) for k, v in pack.items()}
    with pytest.raises(ConfigError, match="only in a batch of one row"):
        model(**two_rows)
    model.config._attn_implementation = "my_custom_kernel"
    with pytest.raises(ConfigError, match="attn_implementation='sdpa'"):
        model(**pack)
    with pytest.raises(ConfigError, match="attn_implementation='sdpa'"):
        padding_free_collator(model)
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ConfigError, match="use_cache=False"):
        model(**pack, use_cache=True)
    with pytest.raises(ConfigError, match="decoder-only causal LM"):
        padding_free_collator(prepare_model(tiny_bert_classifier(), bits=None))


def test_only_restarting_positions_without_a_mask_count_as_packed():
    assert is_packed(torch.tensor([[0, 1, 2, 0, 1]]))
    assert not is_packed(torch.tensor([[3, 4, 5, 6]]))
    assert not is_packed(None)
    # Left-padded generation passes restarting positions *with* a mask: transformers' own path.
    model = prepare_model(tiny_llama(), bits=None).eval()
    ids = torch.randint(3, VOCAB, (1, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    out = model(input_ids=ids, attention_mask=mask, position_ids=torch.tensor([[1, 1, 0, 1, 2]]))
    assert out.logits.shape == (1, 5, VOCAB)
