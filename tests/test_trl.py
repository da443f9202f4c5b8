"""TRL's trainers (the real trl package) with prepared 4-bit models: SFT, DPO against a reference
that shares every weight, GRPO. Tiny random Llamas and a character-level tokenizer built in code."""

from __future__ import annotations

import ctypes
import gc
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from hf_peft_plugin import AdapterCallback, ConfigError, LoraConfig, disable_adapters, prepare_model, reference_model
from hf_peft_plugin.state import adapter_state

from tiny_models import tiny_llama

datasets = pytest.importorskip("datasets")  # noqa: F841  (in the test extra: a skip here is a CI failure)
trl = pytest.importorskip("trl")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer():
    """One token per printable ASCII character (ids 4..99; 0-3 pad, bos, eos, unk) with a chat
    template: it fits the tiny models' 128-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(32, 127)] + ["\n"]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama on disk: prepare_model(path) loads it through transformers' bitsandbytes path,
    which sets ``is_loaded_in_4bit``, the flag TRL's QLoRA cast keys on."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def wide_base_dir(tmp_path_factory):
    """Hidden size 384: the weights (12 MiB in fp32) outweigh a DPO step's activations, so a second
    copy of the base would show in the peak memory."""
    path = tmp_path_factory.mktemp("wide-llama")
    tiny_llama(hidden_size=384, intermediate_size=768).save_pretrained(path)
    return path


def prepared(path, **kwargs):
    model = prepare_model(path, bits=4, lora=LoraConfig(r=4, alpha=8), **kwargs)
    assert model.is_loaded_in_4bit  # the condition of TRL's cast
    return model


def chat_dataset():
    from datasets import Dataset

    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} plus one?"}, {"role": "assistant", "content": f"{i + 1}."}]}
        for i in range(16)
    ]
    return Dataset.from_list(rows)


def text_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"text": f"count: {i} {i + 1} {i + 2} {i + 3}"} for i in range(16)])


PAIRS = ["cat", "dog", "sun", "sea", "air", "ink", "oak", "elm"]


def preference_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"Is {w} nice?", "chosen": " yes, it is.", "rejected": " no way."} for w in PAIRS])


def lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


class DtypeSpy(TrainerCallback):
    """Records the dtypes of the trainable tensors at every optimizer step."""

    def __init__(self):
        self.seen: set[torch.dtype] = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen |= {p.dtype for p in model.parameters() if p.requires_grad}


def common_args(**overrides):
    settings = dict(
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return {**settings, **overrides}


# -- SFT ------------------------------------------------------------------------------------------


def test_trl_casts_a_4bit_models_adapter_to_bf16_unless_the_callback_restores_it(base_dir, tokenizer, tmp_path):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(str(tmp_path), **common_args())
    model = prepared(base_dir)
    SFTTrainer(model=model, args=args, train_dataset=text_dataset(), processing_class=tokenizer)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}  # TRL's QLoRA block

    kept = prepared(base_dir)
    callback = AdapterCallback(restore_adapter_dtype=False)
    SFTTrainer(model=kept, args=args, train_dataset=text_dataset(), processing_class=tokenizer, callbacks=[callback])
    assert {p.dtype for p in kept.parameters() if p.requires_grad} == {torch.bfloat16}  # asked for: TRL's cast stays


@pytest.mark.parametrize(
    "dataset, checkpointing",
    [(chat_dataset, False), (chat_dataset, True), (text_dataset, False), (text_dataset, True)],
    ids=["messages", "messages-checkpointing", "text", "text-checkpointing"],
)
def test_sft_trainer_trains_a_prepared_model_in_fp32_and_saves_the_adapter_only(
    base_dir, tokenizer, tmp_path, dataset, checkpointing
):
    from trl import SFTConfig, SFTTrainer

    model = prepared(base_dir)
    before = lora_b(model)
    spy = DtypeSpy()
    args = SFTConfig(str(tmp_path / "run"), gradient_checkpointing=checkpointing, **common_args())
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset(), processing_class=tokenizer, callbacks=[AdapterCallback(), spy]
    )
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    trainer.train()
    assert spy.seen == {torch.float32}  # at every optimizer step
    assert model.is_gradient_checkpointing == checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    after = lora_b(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every LoRA B moved off zero

    trainer.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not (tmp_path / "final" / "model.safetensors").exists()


# -- DPO ------------------------------------------------------------------------------------------


def test_reference_model_shares_every_weight_and_computes_the_quantized_base(base_dir):
    model = prepared(base_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # the adapter now changes the output
    ref = reference_model(model)
    assert isinstance(ref, type(model)) and ref is not model
    assert [id(p) for p in ref.parameters()] == [id(p) for p in model.parameters()]
    assert [id(b) for b in ref.buffers()] == [id(b) for b in model.buffers()]
    ids = torch.randint(4, 100, (2, 10))
    model.train()
    with torch.no_grad():
        with disable_adapters(model):
            base = model.eval()(ids).logits
        model.train()
        adapted = model(ids).logits
        assert torch.equal(ref(ids).logits, base)
        assert model.training and all(m.training for m in model.modules())  # the call left the policy as it was
        ref.eval()
        assert model.training  # ref.eval() does not reach the shared modules
        assert torch.equal(model(ids).logits, adapted)  # the adapters are on again
    assert not torch.equal(base, adapted)


def test_reference_model_refuses_a_model_without_adapters(base_dir):
    with pytest.raises(ConfigError, match="carries hf_peft_plugin adapters.*prepare_model"):
        reference_model(tiny_llama())
    from hf_peft_plugin import delete_adapter

    model = prepared(base_dir)
    delete_adapter(model, "default")
    with pytest.raises(ConfigError, match="adapters were all deleted"):
        reference_model(model)
    assert adapter_state(model).adapters == {}


_libc = ctypes.CDLL(None)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_growth(run) -> tuple[int, object]:
    """Peak resident memory above the starting point while ``run()`` runs (Linux: clear_refs resets
    the high-water mark; large blocks are mmapped so that what is freed leaves the process)."""
    gc.collect()
    _libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _status("VmRSS:")
    result = run()
    return _status("VmHWM:") - start, result


def _dpo_memory_facts(wide_base_dir: str, out_dir: str) -> dict:
    """The DPO runs of the test below, in a fresh process: a process that already ran the rest of
    the suite has arenas and caches of its own, whose growth swamped the few MiB compared here
    (CI saw 60 vs 50 MiB where a fresh process measures 27 vs 27)."""
    from pathlib import Path

    from trl import DPOConfig, DPOTrainer

    _libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: blocks above 64 KiB come from (and go back to) the OS
    torch.set_num_threads(1)  # per-thread arenas would make the peaks depend on the machine's cores
    tokenizer = char_tokenizer()

    def run(name, steps, *, shared_ref):
        model = prepared(wide_base_dir)
        args = DPOConfig(
            str(Path(out_dir) / name),
            precompute_ref_log_probs=not shared_ref,
            **common_args(max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant"),
        )
        trainer = DPOTrainer(
            model=model,
            ref_model=reference_model(model) if shared_ref else None,
            args=args,
            train_dataset=preference_dataset(),
            eval_dataset=preference_dataset(),
            processing_class=tokenizer,
            callbacks=[AdapterCallback()],
        )
        trainer.train()
        return trainer

    # First-call allocations (lazy imports, caches, malloc arenas sized by the model) out of the
    # measurement: with a tiny model as the warm-up the first wide run still grew 15 MiB more.
    run("warm-up", 1, shared_ref=False)
    precompute_peak, _ = peak_growth(lambda: run("precompute", 2, shared_ref=False))
    shared_peak, trainer = peak_growth(lambda: run("shared", 3, shared_ref=True))
    policy = {q.data_ptr() for q in trainer.model.parameters()}
    return {
        "shared_peak": shared_peak,
        "precompute_peak": precompute_peak,
        "reference_shares_every_weight": all(p.data_ptr() in policy for p in trainer.ref_model.parameters()),
        "first_log": next(h for h in trainer.state.log_history if "loss" in h),
        "trainable_dtypes": {p.dtype for p in trainer.model.parameters() if p.requires_grad},
        "eval_loss": trainer.evaluate()["eval_loss"],
    }


def test_dpo_against_the_shared_reference_starts_at_ln2_fits_in_precompute_memory_and_learns(
    wide_base_dir, tmp_path
):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # A killed child (out of memory) raises BrokenProcessPool here instead of hanging the suite.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        facts = pool.submit(_dpo_memory_facts, str(wide_base_dir), str(tmp_path)).result(timeout=600)
    shared_peak, precompute_peak = facts["shared_peak"], facts["precompute_peak"]
    print(f"peak growth: shared reference {shared_peak / 2**20:.1f} MiB, precompute {precompute_peak / 2**20:.1f} MiB")
    assert shared_peak <= 1.10 * precompute_peak, (shared_peak / 2**20, precompute_peak / 2**20)
    assert facts["reference_shares_every_weight"]

    first = facts["first_log"]
    assert abs(first["loss"] - math.log(2)) < 1e-4, first
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
    assert facts["trainable_dtypes"] == {torch.float32}
    assert facts["eval_loss"] < math.log(2) - 0.05  # training lowered the loss on the pairs


# -- GRPO -----------------------------------------------------------------------------------------


def test_grpo_trainer_trains_a_prepared_model_on_cpu(base_dir, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def lowercase_share(completions, **kwargs):  # a toy reward with spread among random completions
        return [sum(c.islower() for c in text) / max(len(text), 1) for text in completions]

    model = prepared(base_dir)
    before = lora_b(model)
    args = GRPOConfig(
        str(tmp_path),
        num_generations=4,
        max_completion_length=8,
        **common_args(max_steps=1, per_device_train_batch_size=8),
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lowercase_share,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": f"Say {w}:"} for w in PAIRS]),
        processing_class=tokenizer,
        callbacks=[AdapterCallback()],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 1 and all(h["reward_std"] > 0 and h["grad_norm"] > 0 for h in logs), logs
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    after = lora_b(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)


# -- the example ----------------------------------------------------------------------------------


def test_dpo_example_runs_and_starts_at_ln2(base_dir, tokenizer, tmp_path):
    """examples/dpo_wordnet.py, end to end on the shipped WordNet pairs, with a tiny Llama and the
    character tokenizer saved as a model folder (``--model``) so that it takes seconds, not minutes."""
    import importlib.util
    import shutil
    from pathlib import Path

    model_dir = tmp_path / "model"
    shutil.copytree(base_dir, model_dir)
    tokenizer.save_pretrained(model_dir)
    path = Path(__file__).resolve().parent.parent / "examples" / "dpo_wordnet.py"
    spec = importlib.util.spec_from_file_location("dpo_wordnet", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "adapter"
    result = example.main(
        ["--model", str(model_dir), "--max-steps", "2", "--batch-size", "2", "--train-pairs", "4",
         "--eval-pairs", "2", "--output-dir", str(out)]
    )
    assert abs(result["first_loss"] - math.log(2)) < 1e-4
    assert math.isfinite(result["after"]["eval_loss"])
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}


def test_load_pretrained_result_runs_in_a_text_generation_pipeline(base_dir, tokenizer, tmp_path):
    from transformers import pipeline

    from hf_peft_plugin import load_pretrained, save_adapter

    trained = prepared(base_dir)
    save_adapter(trained, tmp_path / "adapter")
    model = load_pretrained(base_dir, tmp_path / "adapter")
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    [out] = generate("Is oak nice?", max_new_tokens=3, do_sample=False)
    assert out["generated_text"].startswith("Is oak nice?") and len(out["generated_text"]) > len("Is oak nice?")
