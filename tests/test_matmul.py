"""Frozen GEMMs in the CPU's bf16 mode (hf_peft_plugin.matmul): used only where the probe passes,
scoped to the frozen weights' GEMMs, close to strict float32, and never touching LoRA's own math."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hf_peft_plugin import LoraConfig, prepare_model
from hf_peft_plugin import matmul
from hf_peft_plugin.errors import ConfigError
from hf_peft_plugin.lora import LoraLinear
from hf_peft_plugin.loss import chunked_cross_entropy
from hf_peft_plugin.state import adapter_state, require_state
from tiny_models import tiny_llama, token_batch

CPU = torch.device("cpu")
#: On this machine: bf16 units and a probe GEMM the mode changes, within the tolerance.
AVAILABLE = matmul.fast_frozen_matmul_status() is None


@pytest.fixture
def user_setting():
    """The user's own torch setting, restored after the test whatever it does."""
    settings = torch.backends.mkldnn.matmul
    before = settings.fp32_precision
    settings.fp32_precision = "ieee"
    yield settings
    settings.fp32_precision = before


def test_status_agrees_with_the_cpu_and_the_probe():
    flags = matmul._cpu_has_bf16_units()
    error = matmul.probe_error() if flags and torch.backends.mkldnn.is_available() else None
    assert AVAILABLE == (error is not None and 0.0 < error <= matmul.PROBE_TOLERANCE)


def test_an_old_torch_without_the_setting_is_refused(monkeypatch):
    monkeypatch.setattr(type(torch.backends.mkldnn), "matmul", None)
    assert "torch >= 2.9" in matmul.fast_frozen_matmul_status.__wrapped__()


@pytest.mark.parametrize(
    "flags, error, reason",
    [
        (False, 1e-6, "avx512_bf16"),
        (True, 0.0, "does not take the bf16 mode"),
        (True, 4e-3, "off by 4.0e-03"),
        (True, float("nan"), "off by nan"),
    ],
)
def test_the_probe_refuses_what_it_cannot_vouch_for(monkeypatch, flags, error, reason):
    monkeypatch.setattr(matmul, "_cpu_has_bf16_units", lambda: flags)
    monkeypatch.setattr(matmul, "probe_error", lambda: error)
    assert reason in matmul.fast_frozen_matmul_status.__wrapped__()


def test_without_onednn_it_is_not_used(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert "oneDNN" in matmul.fast_frozen_matmul_status.__wrapped__()


def test_requests_are_validated_and_a_required_mode_fails_before_the_model_changes(monkeypatch):
    with pytest.raises(ConfigError, match="True, False or None"):
        prepare_model(tiny_llama(), bits=4, fast_frozen_matmul="yes")
    monkeypatch.setattr(matmul, "fast_frozen_matmul_status", lambda: "this CPU has none of avx512_bf16, amx_bf16")
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"fast_frozen_matmul=True, but this CPU .* fast_frozen_matmul=None"):
        prepare_model(model, bits=4, fast_frozen_matmul=True)
    assert adapter_state(model) is None
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear  # not quantized, not wrapped
    assert require_state(prepare_model(model, bits=4)).fast_frozen_matmul is False  # None: strict, quietly


def test_the_default_follows_the_machine_and_false_is_strict():
    assert require_state(prepare_model(tiny_llama(), bits=4)).fast_frozen_matmul is AVAILABLE
    assert require_state(prepare_model(tiny_llama(), bits=4, fast_frozen_matmul=False)).fast_frozen_matmul is False


def test_the_mode_is_scoped_and_the_users_setting_comes_back(user_setting):
    with matmul.frozen_matmul(True, CPU):
        assert user_setting.fp32_precision == "bf16"
        with pytest.raises(RuntimeError, match="inside"):
            with matmul.frozen_matmul(True, CPU):
                raise RuntimeError("inside")
        assert user_setting.fp32_precision == "bf16"
    assert user_setting.fp32_precision == "ieee"
    for enabled, device in ((False, CPU), (True, torch.device("meta"))):
        with matmul.frozen_matmul(enabled, device):
            assert user_setting.fp32_precision == "ieee"


def test_interleaved_uses_restore_the_setting_found_first(user_setting):
    """Two threads' uses may end in either order; the last to end restores the user's value."""
    first, second = matmul.frozen_matmul(True, CPU), matmul.frozen_matmul(True, CPU)
    if not AVAILABLE:  # the contexts are no-ops here: drive the mode's own context instead
        first, second = matmul._precision("bf16"), matmul._precision("bf16")
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert user_setting.fp32_precision == "bf16"  # the second use is still running
    second.__exit__(None, None, None)
    assert user_setting.fp32_precision == "ieee"


class RecordGemms(TorchDispatchMode):
    """Each mm/addmm with its operands' shapes and the bf16 setting it ran under."""

    GEMMS = (torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple, tuple, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.GEMMS:
            a, b = args[:2] if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out) else args[1:3]
            self.calls.append((tuple(a.shape), tuple(b.shape), torch.backends.mkldnn.matmul.fp32_precision))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bits", [4, 8, None])
def test_in_a_training_step_only_frozen_weights_gemms_take_the_mode(monkeypatch, user_setting, bits):
    """On any CPU (the mode forced on): every GEMM of LoRA's rank (3) stays strict; every frozen
    one, the layers' and the head's, forward and backward, runs in the mode in its fixed row
    blocks (256 or 64 rows; a full loss chunk of 64), and only the rows left over run strict."""
    monkeypatch.setattr(matmul, "fast_frozen_matmul_status", lambda: None)
    model = prepare_model(tiny_llama(), bits=bits, lora=LoraConfig(r=3), loss_chunk_size=64, fast_frozen_matmul=True)
    ids = token_batch(4, 70)  # 280 tokens: a block of 256 rows, 24 over; 276 labelled: 4 chunks, 20 over
    with RecordGemms() as record:
        model.train()(input_ids=ids, labels=ids).loss.backward()
    calls = [c for c in record.calls if 0 not in c[0] + c[1]]  # not the head's call on no rows (loss.py)
    lora = [c for c in calls if 3 in c[0] + c[1]]
    frozen = [c for c in calls if 3 not in c[0] + c[1]]
    heads = [c for c in frozen if tiny_llama().config.vocab_size in c[0] + c[1]]
    assert lora and frozen and heads  # all three kinds were seen
    assert {c[2] for c in lora} == {"ieee"}, lora
    for a, b, mode in frozen:
        assert mode == ("bf16" if a[0] in matmul.FAST_ROW_BLOCKS else "ieee"), (a, b, mode)
    assert {c[0][0] for c in frozen if c[2] == "bf16"} == {256, 64}
    assert {c[0][0] for c in frozen if c[2] == "ieee"} == {24, 20}  # too few rows for a padded block
    assert {c[2] for c in heads} == {"bf16", "ieee"}  # full chunks fast, the last one strict
    assert user_setting.fp32_precision == "ieee"


def test_the_modes_gemm_shapes_do_not_follow_the_token_count(monkeypatch, user_setting):
    """oneDNN caches a compiled kernel per GEMM shape (~1 MiB each): however many different token
    counts come, a frozen weight meets the mode in two shapes only, and the result is the same."""
    monkeypatch.setattr(matmul, "fast_frozen_matmul_status", lambda: None)
    w, bias = torch.randn(48, 32), torch.ones(48)
    inputs = [torch.randn(rows, 32) for rows in range(1, 700, 7)]
    with RecordGemms() as record:
        outs = [matmul.frozen_mm(x, w.t(), True, bias) for x in inputs]
    for x, out in zip(inputs, outs):
        torch.testing.assert_close(out, torch.addmm(bias, x, w.t()), rtol=1e-5, atol=1e-5)
    assert {c[0] for c in record.calls if c[2] == "bf16"} == {(256, 32), (64, 32)}
    assert {c[0][0] for c in record.calls if c[2] != "bf16"} == set(range(1, 32))  # 32-63 over: a padded block


def test_a_padded_last_chunk_gives_the_same_loss_and_gradients(monkeypatch):
    """The last loss chunk, at least half full, is padded to a full one (its GEMM shape is then the
    full chunks' one); run with strict GEMMs, the padding changes nothing."""
    from hf_peft_plugin import loss as loss_module

    monkeypatch.setattr(matmul, "fast_frozen_matmul_status", lambda: None)
    monkeypatch.setattr(loss_module, "frozen_matmul", lambda enabled, device: contextlib.nullcontext())
    torch.manual_seed(0)
    head = nn.Linear(32, 50, bias=True).requires_grad_(False)
    hidden = torch.randn(2, 53, 32)
    labels = torch.randint(0, 50, (2, 53))
    labels[0, :4] = -100
    results, rows = [], []
    for fast in (False, True):  # 101 labelled tokens: one chunk of 64, then 37 (padded when fast)
        h = hidden.clone().requires_grad_()
        with RecordGemms() as record:
            loss = chunked_cross_entropy(h, head, labels, chunk_size=64, fast_frozen_matmul=fast)
            loss.backward()
        results.append((loss.detach(), h.grad))
        rows.append({c[0][0] for c in record.calls})
    assert rows == [{64, 37}, {64}]
    (loss_s, grad_s), (loss_f, grad_f) = results
    torch.testing.assert_close(loss_f, loss_s, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_f, grad_s, rtol=1e-6, atol=1e-7)
    assert loss_s.isfinite() and grad_s.abs().sum() > 0


def _layer(bits: int | None) -> LoraLinear:
    """Big enough for oneDNN to take the GEMMs (tiny ones go elsewhere, unchanged)."""
    torch.manual_seed(0)
    base = nn.Linear(512, 384, bias=True).requires_grad_(False)
    if bits is not None:
        from hf_peft_plugin.config import QuantizationConfig
        from hf_peft_plugin.quantization import quantized_layer

        base = quantized_layer(base, QuantizationConfig(bits=bits), torch.float32)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=8, scaling=0.5)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    layer.set_active_adapters(["default"])
    return layer.train()


def _step(layer: LoraLinear, fast: bool, x: torch.Tensor, grad: torch.Tensor):
    layer._adapter_state.fast_frozen_matmul = fast
    layer.zero_grad()
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad, layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()


@pytest.mark.parametrize("bits", [4, 8, None])
def test_only_the_frozen_gemms_change_and_only_slightly(bits, user_setting):
    layer = _layer(bits)
    x, grad = torch.randn(256, 512), torch.randn(256, 384)
    strict, fast = _step(layer, False, x, grad), _step(layer, True, x, grad)
    out_s, gx_s, ga_s, gb_s = strict
    out_f, gx_f, ga_f, gb_f = fast
    # LoRA's own GEMMs stay strict: its gradients depend on x, grad and B only, never on the base.
    assert torch.equal(ga_f, ga_s) and torch.equal(gb_f, gb_s)
    for got, want in ((out_f, out_s), (gx_f, gx_s)):
        assert ((got - want).abs().max() / want.abs().max()).item() <= matmul.PROBE_TOLERANCE
    assert torch.equal(out_f, out_s) is not AVAILABLE  # the mode is really taken where it is available
    assert user_setting.fp32_precision == "ieee"


def test_the_chunked_loss_uses_it_for_a_frozen_head_only(user_setting):
    torch.manual_seed(0)
    head = nn.Linear(512, 1024, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 300, 512, requires_grad=True)
    labels = torch.randint(0, 1024, (1, 300))

    def run(fast: bool, trainable: bool):
        head.weight.requires_grad_(trainable)
        head.weight.grad = None
        h = hidden.detach().clone().requires_grad_()
        loss = chunked_cross_entropy(h, head, labels, params=list(head.parameters()), chunk_size=128, fast_frozen_matmul=fast)
        loss.backward()
        return loss.detach(), h.grad, head.weight.grad

    (ls, gs, _), (lf, gf, _) = run(False, False), run(True, False)
    assert abs(lf - ls).item() <= 1e-5 * abs(ls).item()
    assert ((gf - gs).abs().max() / gs.abs().max()).item() <= matmul.PROBE_TOLERANCE
    assert torch.equal(gf, gs) is not AVAILABLE
    # A head with trainable weights keeps strict float32 (its weight gradient is trained on).
    strict, fast = run(False, True), run(True, True)
    for a, b in zip(strict, fast):
        assert torch.equal(a, b)
    assert user_setting.fp32_precision == "ieee"


def test_a_prepared_model_trains_the_same_within_float32_noise(user_setting):
    ids = token_batch()
    results = []
    for fast in (False, None):
        model = prepare_model(tiny_llama(), bits=4, lora=LoraConfig(r=4), fast_frozen_matmul=fast).train()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_s, grads_s), (loss_f, grads_f) = results
    torch.testing.assert_close(loss_f, loss_s, rtol=1e-5, atol=0)
    assert grads_s.keys() == grads_f.keys() and grads_s
    for name in grads_s:
        torch.testing.assert_close(grads_f[name], grads_s[name], rtol=1e-4, atol=1e-6)
    assert user_setting.fp32_precision == "ieee"
