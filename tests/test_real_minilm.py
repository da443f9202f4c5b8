"""A real pretrained encoder: all-MiniLM-L6-v2 in 4-bit + LoRA learns tweet sentiment."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from hf_peft_plugin import LoraConfig, prepare_model, trainable_parameters
from hf_peft_plugin.assets import minilm_path

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "tweets_sentiment.csv"
LABELS = {"negative": 0, "positive": 1}


def load_tweets() -> tuple[list[dict], list[dict]]:
    with open(DATA, encoding="utf-8") as f:
        rows = [{"text": r["text"], "label": LABELS[r["label"]]} for r in csv.DictReader(f)]
    random.Random(0).shuffle(rows)
    return rows[:480], rows[480:]


class Encoded(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict], tokenizer) -> None:
        enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True, max_length=40, return_tensors="pt")
        self.items = [
            {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": torch.tensor(r["label"])}
            for i, r in enumerate(rows)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def accuracy(model, dataset: Encoded) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), 64):
            batch = [dataset[i] for i in range(start, min(start + 64, len(dataset)))]
            ids = torch.stack([b["input_ids"] for b in batch])
            mask = torch.stack([b["attention_mask"] for b in batch])
            labels = torch.stack([b["labels"] for b in batch])
            correct += (model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == labels).sum().item()
    return correct / len(dataset)


def test_minilm_4bit_lora_learns_sentiment(tmp_path):
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_rows, test_rows = load_tweets()
    assert {r["label"] for r in test_rows} == {0, 1}
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = prepare_model(base, bits=4, lora=LoraConfig(r=8, alpha=16, dropout=0.05))
    report = trainable_parameters(model)
    assert report.percent < 2.0
    test_set = Encoded(test_rows, tokenizer)
    before = accuracy(model, test_set)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, num_train_epochs=2,
        learning_rate=3e-3, warmup_steps=6, logging_steps=30, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=Encoded(train_rows, tokenizer)).train()
    after = accuracy(model, test_set)
    print(f"MiniLM 4-bit LoRA accuracy on {len(test_set)} held-out tweets: {before:.3f} -> {after:.3f}")
    assert after >= 0.75, (before, after)
    assert after > before + 0.1
