"""prepare_model: quantization + LoRA on tiny random models, trained by the stock Trainer."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import BitsAndBytesConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

from hf_peft_plugin import (
    AlreadyPreparedError,
    ConfigError,
    LoraConfig,
    QuantizationUnavailableError,
    TargetModulesError,
    prepare_model,
    trainable_parameters,
)
from hf_peft_plugin.config import QuantizationConfig
from hf_peft_plugin.lora import LoraLinear
from hf_peft_plugin.quantization import quantize_model

from tiny_models import CAUSAL_LMS, tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch, train_copy_task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ALL_MODELS = {**CAUSAL_LMS, "bert": tiny_bert_classifier}


def quantized_reference(model: nn.Module, bits: int | None) -> nn.Module:
    """The base model quantized exactly as prepare_model does, without adapters."""
    ref = copy.deepcopy(model)
    if bits is not None:
        quantize_model(ref, QuantizationConfig(bits=bits), torch.float32)
    return ref.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("bits", [4, 8, None])
@pytest.mark.parametrize("arch", sorted(ALL_MODELS))
def test_adapted_model_equals_quantized_base_at_init(arch, bits):
    base = ALL_MODELS[arch]()
    ref = quantized_reference(base, bits)
    model = prepare_model(base, bits=bits, lora=LoraConfig(r=4, alpha=8, dropout=0.1)).eval()
    ids = token_batch()
    assert torch.equal(logits(model, ids), logits(ref, ids))


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_layers_become_bitsandbytes_layers(bits):
    model = prepare_model(tiny_llama(), bits=bits, lora=LoraConfig(r=4))
    expected = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    wrapped = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 2 * 7  # q k v o gate up down in each of 2 blocks
    assert all(isinstance(m.base_layer, expected) for m in wrapped)
    # Output head and embeddings stay in full precision.
    assert type(model.lm_head) is nn.Linear
    assert type(model.model.embed_tokens) is nn.Embedding


def test_gpt2_conv1d_is_quantized_and_wrapped():
    model = prepare_model(tiny_gpt2(), bits=4, lora=LoraConfig(r=4))
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, LoraLinear) and isinstance(c_attn.base_layer, bnb.nn.Linear4bit)
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    plain = prepare_model(tiny_gpt2(), bits=None, lora=LoraConfig(r=4))
    assert isinstance(plain.transformer.h[0].attn.c_attn.base_layer, Conv1D)
    assert plain.transformer.h[0].attn.c_attn.fan_in_fan_out


@pytest.mark.parametrize("arch", sorted(ALL_MODELS))
def test_only_lora_parameters_are_trainable_and_counts_match(arch):
    r = 4
    model = prepare_model(ALL_MODELS[arch](), bits=4, lora=LoraConfig(r=r))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    expected = sum(r * (m.in_features + m.out_features) for m in lora_layers)
    head = 0
    if arch == "bert":  # the fresh classification head is trained in full (peft's modules_to_save)
        head = sum(p.numel() for p in model.classifier.modules_to_save["default"].parameters())
        assert all(".lora_" in n or "classifier.modules_to_save.default" in n for n in trainable)
    else:
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    report = trainable_parameters(model)
    assert report.trainable == expected + head
    assert 0 < report.percent < 100


def test_trainable_parameters_counts_zero3_partitioned_parameters():
    # DeepSpeed ZeRO-3 replaces a partitioned parameter's data with an empty tensor and keeps
    # its size in ``ds_numel`` (seen with deepspeed 0.19.8 on 2 CPU processes).
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4))
    before = trainable_parameters(model)
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0, dtype=p.dtype)
    after = trainable_parameters(model)
    assert (after.trainable, after.total) == (before.trainable, before.total)
    assert after.trainable > 0


def test_dora_magnitude_is_trainable_and_counted():
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4, use_dora=True))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    expected = sum(4 * (m.in_features + m.out_features) + m.out_features for m in layers)
    assert trainable_parameters(model).trainable == expected
    assert all(m.lora_magnitude_vector["default"].requires_grad for m in layers)


def test_dora_equals_base_at_init():
    base = tiny_llama()
    ref = quantized_reference(base, 4)
    model = prepare_model(base, bits=4, lora=LoraConfig(r=4, use_dora=True)).eval()
    ids = token_batch()
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("bits", "dtype"), [(4, torch.float32), (None, torch.float32), (None, torch.bfloat16)])
def test_lora_forward_and_gradients_follow_the_formula(bits, dtype):
    """y = base(x) + s * B(A(x)) with a trained B and a scaling that is not a power of two (the
    fused GEMM reorders the rounding), for values and for the gradients of A, B and x; with a
    bf16 base the LoRA term is added in float32 and the sum rounded once."""
    torch.manual_seed(0)
    base = nn.Linear(48, 40, bias=True).to(dtype)
    if bits is not None:
        holder = nn.Sequential(base)
        quantize_model(holder, QuantizationConfig(bits=bits), torch.float32)
        base = holder[0]
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, scaling=0.37)
    layer.set_active_adapters(["default"])
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 5, 48, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == dtype
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    lora_ref = 0.37 * (x_ref.float() @ a_ref.t() @ b_ref.t())
    y_ref = (layer.base_layer(x_ref).float() + lora_ref).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(y, y_ref, **tol)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    grad_tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want in ((a.grad, a_ref.grad), (b.grad, b_ref.grad), (x.grad, x_ref.grad)):
        torch.testing.assert_close(got, want, **grad_tol)


def test_rank_and_alpha_patterns_and_rslora():
    config = LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 32})
    model = prepare_model(tiny_llama(), bits=None, lora=config)
    q = model.model.layers[0].self_attn.q_proj
    assert q.r["default"] == 2 and q.scaling["default"] == 8 / 2
    assert model.model.layers[1].mlp.down_proj.scaling["default"] == 32 / 4
    assert model.model.layers[0].mlp.down_proj.scaling["default"] == 8 / 4
    rs = prepare_model(tiny_llama(), bits=None, lora=LoraConfig(r=16, alpha=8, use_rslora=True))
    assert rs.model.layers[0].self_attn.v_proj.scaling["default"] == pytest.approx(8 / 4.0)


def test_target_modules_list_regex_and_exclude():
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(target_modules=["q_proj", "v_proj"]))
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLinear))
    assert wrapped == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    regex = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(target_modules=r".*layers\.1\.mlp\..*"))
    assert sorted(n for n, m in regex.named_modules() if isinstance(m, LoraLinear)) == [
        f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")
    ]
    excluded = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(exclude_modules=["o_proj", "down_proj"]))
    names = {n.rpartition(".")[2] for n, m in excluded.named_modules() if isinstance(m, LoraLinear)}
    assert names == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}


def test_gaussian_and_pissa_inits():
    base = tiny_llama()
    ref = quantized_reference(base, None)
    gaussian = prepare_model(copy.deepcopy(base), bits=None, lora=LoraConfig(r=4, init="gaussian")).eval()
    ids = token_batch()
    assert torch.equal(logits(gaussian, ids), logits(ref, ids))
    pissa = prepare_model(copy.deepcopy(base), bits=None, lora=LoraConfig(r=4, init="pissa")).eval()
    layer = pissa.model.layers[0].self_attn.q_proj
    assert layer.lora_B["default"].weight.abs().sum() > 0  # principal components moved into B A
    torch.testing.assert_close(logits(pissa, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="pissa"):
        prepare_model(tiny_llama(), bits=4, lora=LoraConfig(init="pissa"))


# -- training -------------------------------------------------------------------------------------





@pytest.mark.parametrize("bits", [4, 8, None])
def test_stock_trainer_lowers_the_loss(bits, tmp_path):
    model = prepare_model(tiny_llama(), bits=bits, lora=LoraConfig(r=8, alpha=16))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train_copy_task(model, tmp_path / "out")
    assert losses[-1] < losses[0] - 0.3, losses
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen parameter {n} changed"


def test_gradients_reach_lora_a_and_b_in_every_layer():
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4)).train()
    ids = token_batch()
    # An evaluation pass first: on AVX512-BF16 CPUs bitsandbytes would otherwise switch the
    # 4-bit layers to a kernel without autograd and cut the gradient (see unpack_cpu_4bit).
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            # B starts at zero, so A's first gradient is zero; B's must not be.
            assert module.lora_B["default"].weight.grad.abs().sum() > 0, name
    model.zero_grad()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLinear):
                module.lora_B["default"].weight.normal_(std=0.01)
    model(input_ids=ids, labels=ids).loss.backward()
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            assert module.lora_A["default"].weight.grad.abs().sum() > 0, name


def test_gradient_checkpointing_trains(tmp_path):
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=8, alpha=16), gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    losses = train_copy_task(model, tmp_path / "out", activation_checkpointing=True)
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("fused", [False, True])
def test_checkpoint_recompute_skips_the_last_frozen_gemm_of_each_block(fused, monkeypatch):
    """Non-reentrant checkpointing recomputes a block only up to the last tensor autograd saved.
    LoRA terms are computed before the frozen base, so a block's last layer (down_proj) runs its
    base once per step, not twice; the layers before it are recomputed as usual. The fused path
    (one autograd node for base + LoRA) saves nothing through autograd and keeps this: counted
    there as dequantizations of the 4-bit weight, one per forward and one in the backward."""
    from hf_peft_plugin import lora as lora_module

    monkeypatch.setattr(lora_module, "FUSED", fused)
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4), gradient_checkpointing=True).train()
    calls = {"down_proj": 0, "up_proj": 0}
    bases = {id(model.model.layers[0].mlp.get_submodule(n).base_layer): n for n in calls}
    if fused:
        original = lora_module.frozen_dense_weight

        def counting(layer, x):
            weight = original(layer, x)
            name = bases.get(id(layer))
            if weight is None or name is None:
                return weight
            return lambda: (calls.__setitem__(name, calls[name] + 1), weight())[1]

        monkeypatch.setattr(lora_module, "frozen_dense_weight", counting)
    else:
        for name in calls:
            base = model.model.layers[0].mlp.get_submodule(name).base_layer
            base.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    ids = token_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == ({"down_proj": 2, "up_proj": 3} if fused else {"down_proj": 1, "up_proj": 2})
    assert model.model.layers[0].mlp.down_proj.lora_B["default"].weight.grad.abs().sum() > 0


def test_bert_classifier_trains_with_head(tmp_path):
    model = prepare_model(tiny_bert_classifier(), bits=4, lora=LoraConfig(r=8, alpha=16))

    class Parity(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.full((8,), 5 + (i % 2) * 50)
            return {"input_ids": ids, "attention_mask": torch.ones(8, dtype=torch.long), "labels": torch.tensor(i % 2)}

    args = TrainingArguments(
        output_dir=str(tmp_path / "o"), per_device_train_batch_size=16, max_steps=20, learning_rate=1e-2,
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Parity())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses


def test_model_loaded_in_4bit_by_transformers_is_accepted_by_trainer(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    )
    assert base.is_quantized
    with pytest.raises(ValueError, match="purely quantized"):
        Trainer(model=base, args=TrainingArguments(output_dir=str(tmp_path / "x"), report_to=[], use_cpu=True))
    model = prepare_model(base, lora=LoraConfig(r=8, alpha=16))
    losses = train_copy_task(model, tmp_path / "out")
    assert losses[-1] < losses[0] - 0.3, losses


def test_prepare_from_path_quantizes_while_loading(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    model = prepare_model(str(tmp_path / "base"), bits=4, lora=LoraConfig(r=4))
    assert isinstance(model, LlamaForCausalLM)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    ref = quantized_reference(tiny_llama(), 4)
    ids = token_batch()
    assert torch.equal(logits(model.eval(), ids), logits(ref, ids))


def test_prepared_model_is_still_a_transformers_model():
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4))
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.model_type == "llama"
    model = model.to("cpu").eval()
    ids = token_batch(batch=1, length=5)
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9) and torch.equal(out[:, :5], ids)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)


# -- footprint ------------------------------------------------------------------------------------


def test_nf4_double_quant_footprint_is_near_theory():
    torch.manual_seed(0)
    model = tiny_llama(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=8)
    model = prepare_model(model, bits=4, lora=LoraConfig(r=4))
    fp = trainable_parameters(model).footprint
    theory = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + uint8 absmax per 64 + fp32 per 256 absmax
    assert fp.bits_per_quantized_weight == pytest.approx(theory, rel=0.03)
    assert fp.quantized_weights == 2 * (4 * 512 * 512 + 3 * 512 * 1536)


def test_8bit_footprint_is_one_byte_per_weight_plus_row_scales():
    model = prepare_model(tiny_llama(hidden_size=256, intermediate_size=512), bits=8, lora=LoraConfig(r=4))
    fp = trainable_parameters(model).footprint
    assert 8.0 < fp.bits_per_quantized_weight < 8.2


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 16, "4", True])
def test_bits_must_be_4_8_or_none(bits):
    with pytest.raises(ConfigError, match="bits must be 4"):
        prepare_model(tiny_llama(), bits=bits)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": -2}, "r must be a positive integer"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"alpha": 0}, "alpha must be a positive"),
    ({"init": "xavier"}, "init must be"),
    ({"target_modules": "(unclosed"}, "not a valid regular expression"),
])
def test_lora_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_target_modules_matching_nothing_lists_the_linear_names():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TargetModulesError) as err:
        prepare_model(model, bits=None, lora=LoraConfig(target_modules=["query", "value"]))
    message = str(err.value)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_preparing_twice_is_a_clear_error():
    model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4))
    with pytest.raises(AlreadyPreparedError, match="add_adapter"):
        prepare_model(model, bits=4, lora=LoraConfig(r=4))
    assert not any(isinstance(m.base_layer, LoraLinear) for m in model.modules() if isinstance(m, LoraLinear))


def test_missing_bitsandbytes_says_what_to_install(monkeypatch):
    import hf_peft_plugin.quantization as quantization

    def broken(name):
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(quantization.importlib, "import_module", broken)
    with pytest.raises(QuantizationUnavailableError, match="pip install 'bitsandbytes"):
        prepare_model(tiny_llama(), bits=4)
    assert isinstance(QuantizationUnavailableError("x"), ImportError)


def test_unknown_device_type_is_refused():
    from hf_peft_plugin.quantization import check_bitsandbytes_for

    with pytest.raises(QuantizationUnavailableError, match="no backend"):
        check_bitsandbytes_for("meta")


def test_wrong_argument_types():
    with pytest.raises(TypeError, match="transformers model, a local path or a Hub id"):
        prepare_model(42)
    with pytest.raises(TypeError, match="Unexpected arguments"):
        prepare_model(tiny_llama(), num_labels=3)


# -- no peft --------------------------------------------------------------------------------------


def test_importing_the_package_and_its_cli_loads_no_trainer_modules_and_no_peft():
    """With peft installed (as here), transformers' Trainer modules import it; the callback needs
    them, so it is loaded on first use only and the CLI and non-Trainer code stay light."""
    code = textwrap.dedent(
        """
        import sys
        import hf_peft_plugin, hf_peft_plugin.cli
        assert "peft" not in sys.modules and "transformers.trainer_utils" not in sys.modules, "loaded eagerly"
        from hf_peft_plugin import AdapterCallback
        from transformers import TrainerCallback
        assert issubclass(AdapterCallback, TrainerCallback) and "AdapterCallback" in hf_peft_plugin.__all__
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    import hf_peft_plugin

    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        hf_peft_plugin.NoSuchThing  # noqa: B018


def test_package_imports_and_trains_with_peft_absent():
    """peft is installed here (interop tests use it); make it look uninstalled, and make any
    attempt to import it fail loudly, then import and train."""
    code = textwrap.dedent(
        """
        import sys, importlib.abc, importlib.metadata, importlib.util
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "peft" or name.startswith("peft."):
                    raise ImportError("peft is blocked in this test")
        sys.meta_path.insert(0, Block())
        real_find_spec, real_distribution = importlib.util.find_spec, importlib.metadata.distribution
        def find_spec(name, *args, **kwargs):
            return None if name == "peft" or name.startswith("peft.") else real_find_spec(name, *args, **kwargs)
        def distribution(name):
            if name == "peft":
                raise importlib.metadata.PackageNotFoundError(name)
            return real_distribution(name)
        importlib.util.find_spec, importlib.metadata.distribution = find_spec, distribution
        importlib.metadata.version = lambda name: distribution(name).version
        sys.path.insert(0, "tests")
        import hf_peft_plugin
        from hf_peft_plugin import prepare_model, LoraConfig, AdapterCallback, save_adapter
        from tiny_models import tiny_llama, token_batch
        m = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4))
        ids = token_batch()
        m(input_ids=ids, labels=ids).loss.backward()
        assert not any(k == "peft" or k.startswith("peft.") for k in sys.modules)
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("OK")


# -- memory while loading -------------------------------------------------------------------------

_PEAK_LOAD_SCRIPT = """
import sys, threading, time
sys.path.insert(0, "tests")
def anon_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024
peak, done = [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mib())
        time.sleep(0.001)
from hf_peft_plugin import prepare_model, LoraConfig, trainable_parameters
from tiny_models import tiny_llama
prepare_model(tiny_llama(), bits=4)  # imports and one-off allocations happen outside the window
before = anon_mib()
threading.Thread(target=sample, daemon=True).start()
model = prepare_model(sys.argv[1], bits=4, lora=LoraConfig(r=8))
done.set()
fp = trainable_parameters(model).footprint
print(peak[0] - before, fp.total_bytes / 2**20)
"""


def test_loading_from_a_path_peaks_near_the_quantized_footprint(tmp_path):
    """Anonymous (heap) memory, sampled every millisecond: safetensors pages are file-backed.

    glibc is told to serve every allocation over 64 KiB by mmap and to trim on free, so RSS
    follows the live tensors instead of what the allocator keeps cached (which varies run to run).
    """
    model = tiny_llama(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, tie_word_embeddings=True,
    )
    full_mib = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    model.save_pretrained(tmp_path / "base")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _PEAK_LOAD_SCRIPT, str(tmp_path / "base")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    peak_mib, footprint_mib = map(float, result.stdout.split()[-2:])
    assert footprint_mib < 0.2 * full_mib
    # Streaming quantization never holds the full-precision model: measured 1.5x the footprint.
    assert peak_mib < 2.0 * footprint_mib and peak_mib < 0.35 * full_mib, (peak_mib, footprint_mib, full_mib)


def test_half_precision_model_runs_without_autocast():
    """Norms are upcast to fp32 for stability, yet hand bf16 on to the bf16 layers around them."""
    model = tiny_llama().to(torch.bfloat16)
    model = prepare_model(model, bits=4, compute_dtype=torch.bfloat16, lora=LoraConfig(r=4))
    assert model.model.norm.weight.dtype == torch.float32
    ids = token_batch()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad is not None
