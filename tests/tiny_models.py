"""Tiny random models built from configs in code (hidden 64, 2 layers): milliseconds per step."""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from transformers import (
    TrainerCallback,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def _llama_like(config_cls, model_cls, **overrides):
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return model_cls(config_cls(**{**settings, **overrides}))


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return _llama_like(LlamaConfig, LlamaForCausalLM, **overrides).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return _llama_like(Qwen2Config, Qwen2ForCausalLM).eval()


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return _llama_like(MistralConfig, MistralForCausalLM, sliding_window=None).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


CAUSAL_LMS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


def token_batch(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


class CopyTaskDataset(torch.utils.data.Dataset):
    """A learnable language-modelling task: ascending token runs (next token = previous + 1)."""

    def __init__(self, n: int = 64, length: int = 16) -> None:
        self.rows = [torch.arange(i, i + length) % (VOCAB - 3) + 3 for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def perturb_trainable(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every trainable tensor a random offset, so an adapter is far from its (identity) init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def train_copy_task(model: torch.nn.Module, output_dir, steps: int = 30, **overrides) -> list[float]:
    """A short stock-Trainer run on :class:`CopyTaskDataset`; returns the logged losses."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=1e-2,
        logging_steps=steps // 3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        **overrides,
    )
    trainer = Trainer(model=model, args=args, train_dataset=CopyTaskDataset())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


class FirstPushStarts(TrainerCallback):
    """Holds step 3 until the push queued at step 2's save has started uploading.

    A push still queued when the next one comes is dropped by design, so on a loaded machine whose
    upload thread had not picked up step 2's push before step 4's, a test expecting step 2 first
    would see another valid order. Wrap the upload function with :meth:`watch`."""

    def __init__(self) -> None:
        self.started = threading.Event()

    def watch(self, upload: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            self.started.set()
            return upload(*args, **kwargs)

        return watched

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2 and state.is_world_process_zero:
            assert self.started.wait(timeout=120), "the step-2 push never started"
