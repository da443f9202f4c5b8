"""DPO with TRL on a 4-bit SmolLM2, against a reference that is the same model with its adapter off.

Preference pairs come from the shipped WordNet extract (``examples/data/wordnet_glosses.jsonl``):
the question "What does the word X mean?", X's own definition as the chosen answer and the
definition of another word as the rejected one. The policy is SmolLM2-135M-Instruct quantized to
NF4 with LoRA on every linear layer; :func:`hf_peft_plugin.reference_model` gives TRL's
``DPOTrainer`` a reference that shares every weight with it (no second copy of the base), and
:class:`hf_peft_plugin.AdapterCallback` keeps the LoRA weights in float32 (TRL would cast them to
bf16). Prints the DPO loss and reward margin on held-out pairs before and after, saves the adapter.

    python examples/dpo_wordnet.py                  # 8 steps of 4 pairs (see examples/README.md for timings)
    python examples/dpo_wordnet.py --max-steps 200 --model HuggingFaceTB/SmolLM2-360M-Instruct
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from hf_peft_plugin import AdapterCallback, LoraConfig, prepare_model, reference_model, save_adapter, trainable_parameters

DATA = Path(__file__).resolve().parent / "data" / "wordnet_glosses.jsonl"
QUESTION = "What does the word '{word}' mean? Answer with a short definition."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="Hub id or local path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=str(DATA), help="JSONL with word, pos, gloss, split")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--train-pairs", type=int, default=256)
    p.add_argument("--eval-pairs", type=int, default=16)
    p.add_argument("--output-dir", default="outputs/wordnet-dpo")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def preference_pairs(rows: list[dict], n: int, rng: random.Random) -> Dataset:
    """Chosen: the word's own gloss. Rejected: the gloss of another word (of another lemma)."""
    pairs = []
    for row in rows[:n]:
        other = rng.choice(rows)
        while other["word"] == row["word"]:
            other = rng.choice(rows)
        pairs.append(
            {
                "prompt": [{"role": "user", "content": QUESTION.format(word=row["word"])}],
                "chosen": [{"role": "assistant", "content": row["gloss"]}],
                "rejected": [{"role": "assistant", "content": other["gloss"]}],
            }
        )
    return Dataset.from_list(pairs)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    if args.model is None:
        from hf_peft_plugin.assets import smollm2_path

        model_path = str(smollm2_path())
    else:
        model_path = args.model
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    with open(args.data, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if r["split"] == "train"]
    test_rows = [r for r in rows if r["split"] == "test"]
    rng.shuffle(train_rows)
    train, held_out = preference_pairs(train_rows, args.train_pairs, rng), preference_pairs(test_rows, args.eval_pairs, rng)

    model = prepare_model(model_path, bits=4, lora=LoraConfig(r=args.rank, alpha=args.alpha, target_modules="all-linear"))
    print(trainable_parameters(model))
    config = DPOConfig(
        output_dir=args.output_dir,
        beta=args.beta,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        logging_steps=max(1, args.max_steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=reference_model(model),  # the same 4-bit model with the adapter disabled
        args=config,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=[AdapterCallback()],
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    first = next(h for h in trainer.state.log_history if "loss" in h)

    print(f"\nfirst training step: loss {first['loss']:.4f} (ln 2 = {math.log(2):.4f}: policy = reference)")
    print("held-out pairs   | before | after")
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/accuracies"):
        print(f"{key:<16} | {before[key]:6.3f} | {after[key]:6.3f}")
    save_adapter(model, args.output_dir)
    print(f"\nadapter saved to {args.output_dir}")
    return {"first_loss": first["loss"], "before": before, "after": after}


if __name__ == "__main__":
    main()
