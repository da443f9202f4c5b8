"""Prompt tuning: the soft prompt inside forward, generation with a KV cache, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForTokenClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from hf_peft_plugin import (
    ConfigError,
    PromptTuningConfig,
    disable_adapters,
    prepare_model,
    trainable_parameters,
)
from hf_peft_plugin.config import QuantizationConfig
from hf_peft_plugin.quantization import quantize_model

from tiny_models import VOCAB, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

N = 4  # virtual tokens
HIDDEN = 64


def prompted(base: nn.Module, n: int = N, bits: int | None = None, init: str = "vocab", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return prepare_model(base, bits=bits, prompt=PromptTuningConfig(num_virtual_tokens=n, init=init, **kwargs)).eval()


def prompt_of(model: nn.Module) -> torch.Tensor:
    return model.prompt_encoder.embeddings["default"]


def tiny_llama_classifier(seed: int = 0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        num_labels=3,
    )
    return LlamaForSequenceClassification(config).eval()


WORDS = {"[UNK]": 3, "classify": 10, "the": 11, "sentiment": 12, ":": 13}


def word_tokenizer(vocab: dict[str, int] = WORDS) -> PreTrainedTokenizerFast:
    """A real fast tokenizer over a handful of words (ids inside the tiny models' vocabulary by default)."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def right_padded(ids: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask


# -- the prompt inside forward -------------------------------------------------------------------


def test_trainable_parameters_are_exactly_the_virtual_tokens():
    model = prompted(tiny_llama(), n=7)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["prompt_encoder.embeddings.default"]
    assert trainable_parameters(model).trainable == 7 * HIDDEN
    assert prompt_of(model).shape == (7, HIDDEN) and prompt_of(model).dtype == torch.float32


def test_bert_classifier_is_the_base_model_on_prefixed_embeddings():
    """Mask and token types are extended; the pooler reads position 0, the first virtual token (as in peft)."""
    model = prompted(tiny_bert_classifier())
    ids, mask = right_padded(token_batch(), [12, 7])
    token_types = (torch.arange(12) >= 5).long().expand(2, 12)
    zeros = torch.zeros(2, N, dtype=torch.long)
    embeds = torch.cat([prompt_of(model).expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        with disable_adapters(model):
            expected = model(
                inputs_embeds=embeds,
                attention_mask=torch.cat([zeros + 1, mask], dim=1),
                token_type_ids=torch.cat([zeros, token_types], dim=1),
            ).logits
        without_mask = model(input_ids=ids).logits
        with disable_adapters(model):
            expected_without_mask = model(inputs_embeds=embeds).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(without_mask, expected_without_mask, atol=1e-6)
    assert not torch.allclose(got, without_mask)  # the mask did reach the model


def test_forward_without_a_cache_asks_no_deprecated_output_name(monkeypatch):
    """transformers 5 warns when ``past_key_values`` is read from an output; a BERT classifier's
    output has no cache, and looking for one must not trigger that warning for the user."""
    from transformers.utils import generic

    warned = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda message, *a, **k: warned.append(message))
    model = prompted(tiny_bert_classifier())
    with torch.no_grad():
        model(input_ids=token_batch())
    assert warned == []


def test_loss_is_the_base_model_on_prefixed_embeddings():
    """Labels are padded over the virtual tokens and the first user token stays unscored."""
    model = prompted(tiny_llama())
    ids = token_batch()
    base = model.model
    embeds = torch.cat([prompt_of(model).expand(2, -1, -1), base.embed_tokens(ids)], dim=1)
    labels = torch.cat([torch.full((2, N + 1), -100), ids[:, 1:]], dim=1)
    with torch.no_grad(), disable_adapters(model):
        expected = model(inputs_embeds=embeds, labels=labels)
    with torch.no_grad():
        got = model(input_ids=ids, labels=ids)
        positional = model(ids)
        with_positions = model(input_ids=ids, position_ids=torch.arange(12).expand(2, 12))
    assert torch.allclose(got.loss, expected.loss, atol=1e-6)
    assert torch.allclose(got.logits, expected.logits, atol=1e-6)
    assert torch.equal(positional.logits, got.logits)
    assert torch.equal(with_positions.logits, got.logits)


def test_token_classifier_labels_are_padded_over_the_prompt():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
        num_labels=5,
    )
    model = prompted(BertForTokenClassification(config).eval())
    ids = token_batch()
    labels = ids % 5
    embeds = torch.cat([prompt_of(model).expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        got = model(input_ids=ids, labels=labels)
        with disable_adapters(model):
            expected = model(inputs_embeds=embeds, labels=torch.cat([torch.full((2, N), -100), labels], dim=1))
    assert got.logits.shape == (2, N + 12, 5)
    assert torch.allclose(got.loss, expected.loss, atol=1e-6)


def test_causal_lm_classifier_pools_the_last_real_token():
    model = prompted(tiny_llama_classifier())
    ids, mask = right_padded(token_batch(), [12, 6])
    with torch.no_grad():
        pooled = model(input_ids=ids, attention_mask=mask).logits
        embeds = torch.cat([prompt_of(model).expand(2, -1, -1), model.model.embed_tokens(ids)], dim=1)
        with disable_adapters(model):
            hidden = model.model(
                inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, N, dtype=torch.long), mask], 1)
            )
        scores = model.score(hidden.last_hidden_state)
    assert torch.equal(pooled[0], scores[0, N + 11])
    assert torch.equal(pooled[1], scores[1, N + 5])


def test_inputs_embeds_are_prefixed_too():
    model = prompted(tiny_llama())
    ids = token_batch()
    with torch.no_grad():
        from_ids = model(input_ids=ids).logits
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids)).logits
    assert torch.equal(from_ids, from_embeds)


def test_init_text_repeats_the_tokenised_text():
    tokenizer = word_tokenizer()
    model = prompted(tiny_llama(), n=6, init="text", init_text="classify the sentiment:", tokenizer=tokenizer)
    rows = model.get_input_embeddings().weight[torch.tensor([10, 11, 12, 13, 10, 11])]
    assert torch.equal(prompt_of(model), rows)
    with pytest.raises(ConfigError, match="beyond the model's vocabulary of 128"):
        prompted(tiny_llama(), init="text", init_text="big", tokenizer=word_tokenizer({"[UNK]": 3, "big": 500}))


def test_init_vocab_and_random():
    model = prompted(tiny_llama(), n=5, init="vocab")
    table = model.get_input_embeddings().weight
    for row in prompt_of(model):
        assert (table == row).all(dim=1).any()
    random = prompt_of(prompted(tiny_llama(), n=100, init="random"))
    assert abs(random.std().item() - table.std().item()) < 0.1 * table.std().item()


def test_disabled_prompt_is_the_base_model_exactly():
    model = prompted(tiny_llama())
    ids = token_batch()
    with torch.no_grad(), disable_adapters(model):
        disabled = model(input_ids=ids).logits
        generated = model.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False)
    base = tiny_llama()
    with torch.no_grad():
        assert torch.equal(disabled, base(input_ids=ids).logits)
    assert torch.equal(generated, base.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False))


# -- generation ----------------------------------------------------------------------------------


def greedy_without_cache(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Reference: re-encode [prompt; tokens so far] from scratch for every new token."""
    prompt = prompt_of(model)
    tokens = ids
    with torch.no_grad(), disable_adapters(model):
        for _ in range(steps):
            embeds = torch.cat([prompt[None], model.get_input_embeddings()(tokens)], dim=1)
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_generate_is_greedy_over_the_prompt_and_returns_user_tokens(make):
    model = prompted(make(), init="random")
    ids = token_batch(batch=1, length=9, seed=3)
    first = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    second = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
    assert first.shape == (1, 19)
    assert torch.equal(first[:, :9], ids)
    assert torch.equal(first, second)
    assert torch.equal(first, greedy_without_cache(model, ids, 10))


def test_generate_uses_the_kv_cache():
    model = prompted(tiny_llama())
    lengths = []

    def record(module, args, kwargs):
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        lengths.append(inputs.shape[1])

    model.model.register_forward_pre_hook(record, with_kwargs=True)
    model.generate(input_ids=token_batch(batch=1, length=9), max_new_tokens=6, do_sample=False)
    assert lengths == [N + 9] + [1] * 5


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_left_padded_batch_gives_the_unbatched_tokens(make):
    model = prompted(make(), init="random")
    long, short = token_batch(batch=1, length=10, seed=1), token_batch(batch=1, length=6, seed=2)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)])
    mask = torch.cat([torch.ones(1, 10), torch.cat([torch.zeros(1, 4), torch.ones(1, 6)], dim=1)]).long()
    batched = model.generate(
        input_ids=batch, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )
    alone = [
        model.generate(input_ids=x, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        for x in (long, short)
    ]
    assert torch.equal(batched[0, 10:], alone[0][0, 10:])
    assert torch.equal(batched[1, 10:], alone[1][0, 6:])


def test_a_cache_cannot_be_continued_under_another_prompt():
    model = prompted(tiny_llama())
    ids = token_batch()
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).cache
        assert cache.get_seq_length() == N + 12
        continued = model(
            input_ids=ids[:, :1], cache=copy.deepcopy(cache), attention_mask=torch.ones(2, 13, dtype=torch.long)
        )
        with disable_adapters(model), pytest.raises(ConfigError, match="cache"):
            model(input_ids=ids[:, :1], cache=cache)
    assert continued.logits.shape == (2, 1, VOCAB)
    with pytest.raises(ConfigError, match="default dynamic cache"):  # sized and masked without the prompt
        model.generate(input_ids=ids[:1], max_new_tokens=3, cache_implementation="static")
    first = model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    with pytest.raises(ConfigError, match="cannot resume from a cache"):  # it would slice the input wrongly
        model.generate(input_ids=first.sequences, cache=first.cache, max_new_tokens=3, do_sample=False)


# -- quantized backbone ----------------------------------------------------------------------------


def test_prompt_on_a_4bit_backbone_trains_and_disables_to_the_quantized_base():
    reference = copy.deepcopy(tiny_llama())
    quantize_model(reference, QuantizationConfig(bits=4), torch.float32)
    model = prompted(tiny_llama(), bits=4)
    ids = token_batch()
    with torch.no_grad(), disable_adapters(model):
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses  # four vectors steering a frozen random model
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False).shape == (1, 15)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, -3, True, 2.5])
def test_num_virtual_tokens_must_be_positive(n):
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=n)


def test_text_init_needs_a_tokenizer_and_text():
    with pytest.raises(ConfigError, match="tokenizer"):
        PromptTuningConfig(init="text", init_text="Classify the sentiment:")
    for empty in (None, "", "   "):
        with pytest.raises(ConfigError, match="non-empty init_text"):
            PromptTuningConfig(init="text", init_text=empty, tokenizer=word_tokenizer())


def test_prompt_that_fills_every_position_is_rejected_before_changing_the_model():
    base = tiny_llama()
    with pytest.raises(ConfigError, match="max_position_embeddings=128"):
        prepare_model(base, bits=4, prompt=PromptTuningConfig(num_virtual_tokens=128))
    assert not hasattr(base, "prompt_encoder")
    assert type(base.model.layers[0].mlp.up_proj) is nn.Linear  # not quantized either


def test_prompt_plus_input_beyond_max_positions_raises():
    model = prompted(tiny_llama(), n=8)
    with torch.no_grad():
        assert model(input_ids=token_batch(length=120)).logits.shape[1] == 128
        with pytest.raises(ConfigError, match="at most 120 tokens"):
            model(input_ids=token_batch(length=121))
        with pytest.raises(ConfigError, match="max_position_embeddings=128"):
            model.generate(input_ids=token_batch(batch=1, length=110), max_new_tokens=20, do_sample=False)
    gpt2 = prompted(tiny_gpt2(), n=8)
    with torch.no_grad(), pytest.raises(ConfigError, match="gpt2"):
        gpt2(input_ids=token_batch(length=121))


def test_unsupported_task_is_rejected():
    torch.manual_seed(0)
    qa = BertForQuestionAnswering(
        BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128
        )
    )
    with pytest.raises(ConfigError, match="QUESTION_ANS"):
        prepare_model(qa, bits=None, prompt=PromptTuningConfig(num_virtual_tokens=4))
    assert not hasattr(qa, "prompt_encoder")
