"""The memory planner: estimates against measured footprints, the planner's search, bad input, CLI."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

from hf_peft_plugin import (
    BottleneckConfig,
    ConfigError,
    LoraConfig,
    MemoryBudgetError,
    PromptTuningConfig,
    TargetModulesError,
    prepare_model,
)
from hf_peft_plugin.assets import minilm_path
from hf_peft_plugin.cli import main
from hf_peft_plugin.memory import (
    CUDA_CONTEXT_BYTES,
    MIN_PLANNED_SEQ_LEN,
    estimate_memory,
    format_bytes,
    load_model_config,
    parse_budget,
    plan_for_memory,
)
from hf_peft_plugin.quantization import footprint

from tiny_models import tiny_bert_classifier, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = dict(
    model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
)  # fmt: skip
CPU = dict(device="cpu", dtype=torch.float32)


@functools.cache
def validation_script():
    """benchmarks/memory_validation.py, which holds the measuring code the tests share."""
    spec = importlib.util.spec_from_file_location("memory_validation", ROOT / "benchmarks" / "memory_validation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_adamw_step_state_bytes(model: torch.nn.Module, optimizer: str) -> int:
    script = validation_script()
    return script.optimizer_state_bytes(script.one_step_optimizer(model, optimizer))


# -- weights, adapters, optimizer states vs the real prepared model ------------------------------


@pytest.mark.parametrize(
    "bits, double_quant, optimizer",
    [(4, True, "adamw_torch"), (4, False, "adamw_8bit"), (8, True, "adamw_torch"), (None, True, "adamw_torch")],
)
def test_tiny_llama_weights_and_optimizer_match_measured(bits, double_quant, optimizer):
    lora = LoraConfig(r=8, alpha=16)
    est = estimate_memory(
        tiny_llama().config, bits=bits, double_quant=double_quant, lora=lora, optimizer=optimizer, seq_len=16, **CPU
    )
    model = prepare_model(tiny_llama(), bits=bits, double_quant=double_quant, lora=lora)
    fp = footprint(model)
    assert est.quantized_weights_bytes == pytest.approx(fp.quantized_bytes, rel=0.05)
    assert est.unquantized_weights_bytes + est.trainable_bytes == pytest.approx(fp.full_precision_bytes, rel=0.05)
    assert est.trainable_bytes == fp.trainable_bytes
    assert est.optimizer_bytes == pytest.approx(one_adamw_step_state_bytes(model, optimizer), rel=0.05)
    assert est.quantized_params == fp.quantized_weights


def test_bert_classifier_counts_the_trained_head_copy():
    est = estimate_memory(tiny_bert_classifier().config, task_type="SEQ_CLS", lora=LoraConfig(r=4), seq_len=32, **CPU)
    fp = footprint(prepare_model(tiny_bert_classifier(), bits=4, lora=LoraConfig(r=4)))
    assert est.trainable_bytes == fp.trainable_bytes
    assert est.quantized_weights_bytes + est.unquantized_weights_bytes + est.trainable_bytes == pytest.approx(
        fp.total_bytes, rel=0.05
    )
    assert est.logits_bytes == 0  # two labels, no vocabulary-wide loss


def test_soft_prompt_and_bottleneck_are_counted_like_the_real_layers():
    prompt, bottleneck = PromptTuningConfig(num_virtual_tokens=10), BottleneckConfig(reduction_factor=8)
    est = estimate_memory(tiny_llama().config, prompt=prompt, bottleneck=bottleneck, seq_len=32, **CPU)
    model = prepare_model(tiny_llama(), bits=4, prompt=prompt, bottleneck=bottleneck)
    assert est.trainable_bytes == footprint(model).trainable_bytes
    # The virtual tokens lengthen every sequence the model sees.
    shorter = estimate_memory(tiny_llama().config, prompt=prompt, bottleneck=bottleneck, seq_len=22, **CPU)
    plain = estimate_memory(tiny_llama().config, bottleneck=bottleneck, seq_len=32, **CPU)
    assert est.activation_bytes > plain.activation_bytes
    assert shorter.logits_bytes == 12 * 32 * tiny_llama().config.vocab_size


def test_minilm_weights_match_the_loaded_model():
    path = minilm_path()
    lora = LoraConfig(r=8)
    est = estimate_memory(path, task_type="FEATURE_EXTRACTION", lora=lora, seq_len=128, **CPU)
    model = prepare_model(path, bits=4, lora=lora, task_type="FEATURE_EXTRACTION")
    fp = footprint(model)
    assert est.quantized_weights_bytes == pytest.approx(fp.quantized_bytes, rel=0.05)
    assert est.quantized_weights_bytes + est.unquantized_weights_bytes + est.trainable_bytes == pytest.approx(
        fp.total_bytes, rel=0.05
    )
    assert est.optimizer_bytes == pytest.approx(one_adamw_step_state_bytes(model, "adamw_torch"), rel=0.05)


# -- activations vs a measured training step -----------------------------------------------------

SMALL_LLAMA = dict(
    model_type="llama", vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)  # fmt: skip


SMALL_GPT2 = dict(
    model_type="gpt2", vocab_size=1024, n_embd=128, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2
)


def test_activations_match_peak_rss_of_a_training_step():
    """Peak RSS of one forward+backward above the RSS before it, in a fresh subprocess (see the
    validation script for how); activations dominate at this size, so 25% is a real bound."""
    script = validation_script()
    cases = [
        dict(name="plain", config=SMALL_LLAMA, batch_size=4, seq_len=256, bits=4, r=8, gradient_checkpointing=False),
        dict(name="ckpt", config=SMALL_LLAMA, batch_size=4, seq_len=256, bits=4, r=8, gradient_checkpointing=True),
        # bf16 under autocast, as Trainer(bf16=True) runs it: the half-precision path of the formula.
        dict(
            name="bf16",
            config=SMALL_LLAMA,
            batch_size=4,
            seq_len=256,
            bits=4,
            r=8,
            bf16=True,
            gradient_checkpointing=False,
        ),
        # GPT-2: dropout everywhere, and an activation function that keeps four tensors.
        dict(name="gpt2", config=SMALL_GPT2, batch_size=4, seq_len=256, bits=4, r=8, gradient_checkpointing=False),
    ]
    # LoRA dropout: each layer keeps its own dropped input and LoraDropout's bool mask.
    cases.append(dict(cases[0], name="lora dropout", lora_dropout=0.1))
    # The loss: chunked (the default) against transformers' full logits, and a packed row.
    big_vocab = dict(SMALL_LLAMA, vocab_size=8192)
    loss = dict(config=big_vocab, batch_size=2, seq_len=256, bits=4, r=8, gradient_checkpointing=True)
    cases += [
        dict(name="chunked", loss_chunk_size=128, **loss),
        dict(name="full logits", chunked_loss=False, **loss),
        dict(name="packed", loss_chunk_size=128, packed=True, **loss),
    ]
    measured = script.measure_step_peaks(cases)
    for case, peak in zip(cases, measured):
        activations, workspace = script.estimated_activations(case)
        assert activations + workspace == pytest.approx(peak, rel=0.25), case["name"]
    peaks = {case["name"]: peak for case, peak in zip(cases, measured)}
    assert peaks["ckpt"] < peaks["plain"]
    assert peaks["chunked"] < 0.6 * peaks["full logits"]  # the chunked loss's peak is well under the full logits'
    assert peaks["lora dropout"] > peaks["plain"]  # each layer's own dropped input


def test_logits_term_and_checkpointing():
    base = dict(lora=LoraConfig(r=16), batch_size=2, seq_len=1024)
    est = estimate_memory(LLAMA_8B, **base)
    assert est.logits_bytes == 12 * 64 * 128256  # one chunk of the default 64 tokens (chunked loss)
    full = estimate_memory(LLAMA_8B, chunked_loss=False, **base)
    assert full.logits_bytes == 12 * 2 * 1024 * 128256  # log-probs + their gradient + the logits' gradient, fp32
    assert full.activation_bytes - est.activation_bytes > 4 * 2 * 1024 * 128256
    assert estimate_memory(LLAMA_8B, loss_chunk_size=256, **base).logits_bytes == 12 * 256 * 128256
    no_ckpt = estimate_memory(LLAMA_8B, gradient_checkpointing=False, **base)
    assert no_ckpt.activation_bytes > 5 * est.activation_bytes
    double = estimate_memory(LLAMA_8B, **{**base, "batch_size": 4})
    assert double.activation_bytes == pytest.approx(2 * est.activation_bytes, rel=0.01)


# -- counting on the meta device -----------------------------------------------------------------


def test_llama_8b_counts_every_block_linear_and_nothing_else():
    est = estimate_memory(LLAMA_8B, lora=LoraConfig(r=16))
    per_block = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336
    assert est.quantized_params == 32 * per_block
    assert est.bits_per_quantized_weight == pytest.approx(4.127, abs=0.002)
    lora_params = 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096))
    assert est.trainable_params == lora_params
    assert est.trainable_bytes == est.gradient_bytes == 4 * lora_params  # LoRA weights are float32
    assert est.optimizer_bytes == 2 * est.trainable_bytes
    # Embeddings and head in bf16, the 65 norms upcast to fp32 next to the quantized blocks.
    assert (
        est.unquantized_weights_bytes == 2 * 2 * 128256 * 4096 + 4 * 65 * 4096 + 2 * 4 * 64
    )  # + rotary inv_freq (and its original)
    assert est.overhead_bytes == CUDA_CONTEXT_BYTES + 2 * 4096 * 14336


def test_tied_embeddings_count_once():
    untied = estimate_memory({**LLAMA_8B, "num_hidden_layers": 2}, seq_len=128)
    tied = estimate_memory({**LLAMA_8B, "num_hidden_layers": 2, "tie_word_embeddings": True}, seq_len=128)
    assert untied.unquantized_weights_bytes - tied.unquantized_weights_bytes == 2 * 128256 * 4096


def test_eight_bit_paged_optimizer_states():
    est = estimate_memory(LLAMA_8B, optimizer="paged_adamw_8bit", lora=LoraConfig(r=16))
    adam = estimate_memory(LLAMA_8B, optimizer="adamw_torch", lora=LoraConfig(r=16))
    assert est.optimizer_bytes == pytest.approx(adam.optimizer_bytes / 4, rel=0.02)


# -- the planner ---------------------------------------------------------------------------------

REQUEST = dict(bits=8, lora=LoraConfig(r=8, alpha=16), batch_size=8, seq_len=128, gradient_checkpointing=False, **CPU)


def test_plan_keeps_settings_that_fit():
    plan = plan_for_memory(tiny_llama().config, "1GiB", **REQUEST)
    assert plan.changes == ()
    assert plan.settings.batch_size == 8 and plan.settings.bits == 8
    assert plan.estimate.total_bytes <= plan.budget_bytes


def test_plan_takes_the_first_step_that_fits():
    config = tiny_llama().config
    four_bit = dict(REQUEST, gradient_checkpointing=True, optimizer="paged_adamw_8bit", bits=4)
    plan = plan_for_memory(config, estimate_memory(config, **four_bit).total_bytes, **REQUEST)
    assert (plan.settings.gradient_checkpointing, plan.settings.optimizer, plan.settings.bits) == (
        True,
        "paged_adamw_8bit",
        4,
    )
    assert plan.settings.batch_size == 8
    assert plan.changes[0] == "gradient checkpointing on"


def test_plan_halves_the_batch_keeping_the_effective_batch():
    config = tiny_llama().config
    target = dict(REQUEST, gradient_checkpointing=True, optimizer="paged_adamw_8bit", bits=4, batch_size=2)
    plan = plan_for_memory(config, estimate_memory(config, **target).total_bytes, **REQUEST)
    assert (plan.settings.batch_size, plan.settings.gradient_accumulation_steps) == (2, 4)
    assert plan.training_arguments_kwargs() == dict(
        per_device_train_batch_size=2, gradient_accumulation_steps=4, optim="paged_adamw_8bit"
    )
    assert plan.prepare_model_kwargs()["bits"] == 4


def test_plan_respects_fixed_settings():
    config = tiny_llama().config
    config.max_position_embeddings = 512
    request = dict(REQUEST, seq_len=512)
    shorter = dict(request, gradient_checkpointing=True, optimizer="paged_adamw_8bit", bits=4, seq_len=256)
    plan = plan_for_memory(config, estimate_memory(config, **shorter).total_bytes, fixed=["batch_size"], **request)
    assert (plan.settings.batch_size, plan.settings.seq_len) == (8, 256)  # the sequence gave way instead
    assert "seq_len 512 -> 256" in plan.changes


def test_plan_lowers_the_rank_last_keeping_the_scaling():
    config = tiny_llama().config
    request = dict(REQUEST, lora=LoraConfig(r=32, alpha=64), batch_size=1, seq_len=MIN_PLANNED_SEQ_LEN)
    floor = dict(
        request, gradient_checkpointing=True, optimizer="paged_adamw_8bit", bits=4, lora=LoraConfig(r=4, alpha=8)
    )
    plan = plan_for_memory(config, estimate_memory(config, **floor).total_bytes, **request)
    assert plan.settings.lora.r == 4
    assert plan.settings.lora.alpha / plan.settings.lora.r == 2
    assert "LoRA rank 32 -> 4 (alpha 64 -> 8)" in plan.changes


def test_plan_turns_the_chunked_loss_back_on_before_anything_costlier():
    config = tiny_llama().config
    config.vocab_size, config.max_position_embeddings = 32000, 512  # 4,096 tokens: the logits matter
    request = dict(REQUEST, chunked_loss=False, gradient_checkpointing=True, seq_len=512)
    target = dict(request, chunked_loss=True)
    budget = estimate_memory(config, **target).total_bytes
    assert estimate_memory(config, **request).total_bytes > budget  # the full logits do not fit
    plan = plan_for_memory(config, budget, **request)
    assert plan.settings.chunked_loss and plan.settings.bits == 8 and plan.settings.optimizer == "adamw_torch"
    assert plan.changes == ("chunked loss on",)
    assert plan.prepare_model_kwargs()["chunked_loss"] is True


def test_plan_offloads_activations_on_cuda_before_shrinking_the_batch():
    config = tiny_llama().config
    request = dict(REQUEST, bits=4, optimizer="paged_adamw_8bit", gradient_checkpointing=True, batch_size=64,
                   device="cuda", dtype=torch.bfloat16)  # fmt: skip
    target = dict(request, offload_activations=True)
    budget = estimate_memory(config, **target).total_bytes
    assert estimate_memory(config, **request).total_bytes > budget
    plan = plan_for_memory(config, budget, **request)
    assert plan.settings.offload_activations and plan.settings.batch_size == 64
    assert plan.changes == ("activation offload on",)
    assert plan.prepare_model_kwargs()["offload_activations"] is True
    # On a CPU offloading saves nothing, so the planner never offers it there: it halves the batch.
    cpu_request = dict(request, **CPU)
    cpu_budget = estimate_memory(config, **dict(cpu_request, batch_size=32)).total_bytes
    cpu_plan = plan_for_memory(config, cpu_budget, **cpu_request)
    assert not cpu_plan.settings.offload_activations and cpu_plan.settings.batch_size == 32


def test_impossible_budget_names_the_smallest_that_works():
    config = tiny_llama().config
    with pytest.raises(MemoryBudgetError, match="smallest budget") as info:
        plan_for_memory(config, 4096, **REQUEST)
    smallest = info.value.smallest_budget
    assert f"({smallest} bytes)" in str(info.value)
    assert plan_for_memory(config, smallest, **REQUEST).estimate.total_bytes == smallest
    with pytest.raises(MemoryBudgetError):
        plan_for_memory(config, smallest - 1, **REQUEST)


def test_plan_rejects_unknown_fixed_names():
    with pytest.raises(ConfigError, match="fixed"):
        plan_for_memory(tiny_llama().config, "1GiB", fixed=["learning_rate"])


# -- budgets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GiB", 8 * 2**30),
        ("8 GB", 8 * 10**9),
        ("512MiB", 512 * 2**20),
        ("24G", 24 * 2**30),
        ("1.5 gib", 3 * 2**29),
        (1000, 1000),
        ("4096", 4096),
    ],
)
def test_budget_strings(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["eight gigs", "8 XB", "", "GiB", "-1GiB", 0, -5, True, 3.5, None])
def test_unreadable_budgets(bad):
    with pytest.raises(MemoryBudgetError, match="budget"):
        parse_budget(bad)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(1000 * 2**20) == "1000 MiB"
    assert format_bytes(3 * 2**30) == "3.00 GiB"


# -- reading config.json, bad input --------------------------------------------------------------


def test_local_directory_and_config_file(tmp_path):
    tiny_llama().config.save_pretrained(tmp_path)
    from_dir = estimate_memory(tmp_path, seq_len=64, **CPU)
    from_file = estimate_memory(tmp_path / "config.json", seq_len=64, **CPU)
    assert (
        from_dir.total_bytes
        == from_file.total_bytes
        == estimate_memory(tiny_llama().config, seq_len=64, **CPU).total_bytes
    )
    assert str(tmp_path) in str(from_dir)


def test_hub_id_downloads_only_config_json(local_hub, hub_api):
    hub_api.create_repo("alice/tiny-llama")
    hub_api.upload_file(
        path_or_fileobj=tiny_llama().config.to_json_string().encode(),
        path_in_repo="config.json",
        repo_id="alice/tiny-llama",
    )
    hub_api.upload_file(path_or_fileobj=b"\0" * 4096, path_in_repo="model.safetensors", repo_id="alice/tiny-llama")
    local_hub.clear_requests()
    est = estimate_memory("alice/tiny-llama", seq_len=64, **CPU)
    assert est.quantized_params == footprint(prepare_model(tiny_llama(), bits=4)).quantized_weights
    assert local_hub.requests_matching("config.json")
    assert not local_hub.requests_matching("safetensors")
    with pytest.raises(ConfigError, match="alice/missing"):
        estimate_memory("alice/missing", **CPU)


def test_missing_and_broken_configs(tmp_path):
    with pytest.raises(ConfigError, match="without a config.json"):
        estimate_memory(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        estimate_memory(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        estimate_memory(tmp_path)
    with pytest.raises(ConfigError, match="model_type"):
        estimate_memory({"hidden_size": 64})


def test_unknown_model_type_is_named():
    with pytest.raises(ConfigError, match="'llama-9000'"):
        estimate_memory({"model_type": "llama-9000", "hidden_size": 64})


def test_model_that_is_not_a_causal_lm_asks_for_task_type():
    with pytest.raises(ConfigError, match="task_type"):
        estimate_memory({"model_type": "vit"})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(optimizer="sgd"), "optimizer"),
        (dict(batch_size=0), "batch_size"),
        (dict(seq_len=1.5), "seq_len"),
        (dict(bits=3), "bits"),
        (dict(device="tpu"), "device"),
        (dict(task_type="CLASSIFY"), "task_type"),
        (dict(dtype=torch.int8), "dtype"),
        (dict(seq_len=4096), "positions"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        estimate_memory(tiny_llama().config, **{"device": "cpu", **kwargs})


def test_lora_targets_are_checked_like_prepare_model_does():
    with pytest.raises(TargetModulesError, match="nope"):
        estimate_memory(tiny_llama().config, lora=LoraConfig(target_modules=["nope"]), **CPU)


def test_config_argument_of_the_wrong_type():
    with pytest.raises(TypeError, match="PretrainedConfig"):
        estimate_memory(42)


def test_estimate_does_not_change_the_callers_config():
    config = tiny_llama().config
    before = config.to_dict()
    estimate_memory(config, seq_len=64, **CPU)
    assert config.to_dict() == before and load_model_config(config) is config


def test_table_lists_every_part_and_the_total():
    est = estimate_memory(LLAMA_8B, seq_len=512)
    text = str(est)
    for label in (
        "quantized weights",
        "unquantized weights",
        "trainable parameters",
        "gradients",
        "optimizer states",
        "activations",
        "logits",
        "CUDA context",
        "total",
    ):
        assert label in text
    parts = [v for label, v in est.rows() if label not in ("total", "  of which logits and loss")]
    assert sum(parts) == est.total_bytes
    assert format_bytes(est.total_bytes) in text.splitlines()[-1]


# -- command line --------------------------------------------------------------------------------


def test_cli_estimate_prints_the_table(tmp_path, capsys):
    tiny_llama().config.save_pretrained(tmp_path)
    assert main(["estimate", str(tmp_path), "--bits", "8", "--rank", "4", "--seq-len", "64", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "8-bit" in out and "LoRA r=4" in out and "batch 1 x 64 tokens" in out
    assert main(["estimate", str(tmp_path), "--seq-len", "64", "--device", "cpu", "--budget", "1KiB"]) == 1
    assert "Does not fit" in capsys.readouterr().out
    assert main(["estimate", str(tmp_path), "--seq-len", "64", "--device", "cpu", "--target-modules", "q_proj"]) == 0
    few = capsys.readouterr().out
    assert (
        main(["estimate", str(tmp_path), "--seq-len", "64", "--device", "cpu", "--target-modules", "all-linear"]) == 0
    )
    assert few != capsys.readouterr().out  # q_proj alone trains fewer parameters than every linear layer


def test_cli_plan_and_errors(tmp_path, capsys):
    tiny_llama().config.save_pretrained(tmp_path)
    args = [
        "plan",
        str(tmp_path),
        "--seq-len",
        "128",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--no-gradient-checkpointing",
    ]
    assert main([*args, "--budget", "1GiB"]) == 0
    assert "as requested" in capsys.readouterr().out
    assert main([*args, "--budget", "1KiB"]) == 1
    assert "smallest budget" in capsys.readouterr().err
    assert main([*args, "--budget", "lots"]) == 2
    assert "Cannot read the memory budget" in capsys.readouterr().err
    assert main(["estimate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- chunked loss, packing, offload ----------------------------------------------------------------


def test_packed_tokens_replace_batch_times_length():
    padded = estimate_memory(LLAMA_8B, batch_size=4, seq_len=512)
    packed = estimate_memory(LLAMA_8B, batch_size=4, seq_len=512, packed_tokens=4 * 512)
    assert packed.activation_bytes == pytest.approx(padded.activation_bytes, rel=0.01)
    shorter = estimate_memory(LLAMA_8B, batch_size=4, seq_len=512, packed_tokens=1200)  # real lengths, no pads
    assert shorter.activation_bytes < 0.7 * padded.activation_bytes
    assert "packed rows of 1200 tokens" in str(shorter)


def test_offload_moves_the_block_inputs_to_the_host_on_cuda_only():
    base = dict(batch_size=1, seq_len=8192)
    kept = estimate_memory(LLAMA_8B, **base)
    offloaded = estimate_memory(LLAMA_8B, offload_activations=True, **base)
    inputs = 32 * 2 * 8192 * 4096  # 32 blocks x bf16 hidden states
    assert offloaded.offloaded_bytes == inputs and kept.offloaded_bytes == 0
    assert kept.activation_bytes - offloaded.activation_bytes == inputs - 2 * 8192 * 4096  # one comes back
    assert "offloaded to host memory" in str(offloaded) and "+ offload" in str(offloaded)
    on_cpu = estimate_memory(LLAMA_8B, offload_activations=True, device="cpu", **base)
    assert on_cpu.offloaded_bytes == 0
    assert on_cpu.activation_bytes == estimate_memory(LLAMA_8B, device="cpu", **base).activation_bytes
    with pytest.raises(ConfigError, match="gradient_checkpointing=True"):
        estimate_memory(LLAMA_8B, offload_activations=True, gradient_checkpointing=False)
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        estimate_memory(LLAMA_8B, loss_chunk_size=0)
    with pytest.raises(ConfigError, match="packed_tokens"):
        estimate_memory(LLAMA_8B, packed_tokens=-1)


def test_longest_context_in_a_budget(tmp_path, capsys):
    from hf_peft_plugin.memory import longest_context

    config = dict(LLAMA_8B, max_position_embeddings=1 << 17)
    best = longest_context(config, "16GiB", lora=LoraConfig(r=16))
    assert best.total_bytes <= 16 * 2**30
    over = estimate_memory(config, lora=LoraConfig(r=16), seq_len=best.settings.seq_len + 1)
    assert over.total_bytes > 16 * 2**30  # the longest: one more token does not fit
    full = longest_context(config, "16GiB", lora=LoraConfig(r=16), chunked_loss=False)
    assert best.settings.seq_len > 2 * full.settings.seq_len
    assert longest_context(config, "1GiB") is None  # the weights alone do not fit
    tiny_llama().config.save_pretrained(tmp_path)  # 128 positions: the limit is the model's
    assert main(["estimate", str(tmp_path), "--seq-len", "64", "--device", "cpu", "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "Longest context that fits in 1.00 GiB: 128 tokens per row" in out and "max_position_embeddings" in out
    assert main(["estimate", str(tmp_path), "--seq-len", "64", "--device", "cpu", "--no-chunked-loss"]) == 0
    assert "full-logits loss" in capsys.readouterr().out
