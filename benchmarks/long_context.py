"""Long-context rows of the training benchmark: peak memory of one step, and the longest context
that trains in a memory budget, hf_peft_plugin (chunked loss, the default) against peft + bitsandbytes.

    python benchmarks/bench_train.py --long-context            # everything below
    python benchmarks/long_context.py --models llama --no-max  # a subset

Rows (4-bit NF4 + double quant, LoRA r=16 alpha=32 on every linear layer of the blocks, gradient
checkpointing, float32 compute, batch 1, every token labelled -- the chunked loss's worst case):

* a random-init Llama with Llama-3's 128,256-token vocabulary, hidden 512, 4 layers (MLP 1536,
  8 heads / 4 KV heads, untied embeddings), at 2,048 and 4,096 tokens;
* SmolLM2-135M (the installed asset), at 1,024 and 2,048 tokens;
* the longest context whose step peaks within ``--budget`` (4 GiB): found by bisection on the
  measured peak, starting from a straight line through the two rows above; probes stop at
  ``--max-probe`` tokens (a CPU step at 64k tokens takes too long here), so a variant that still
  fits there is reported as ``>= N``. SmolLM2 has 8,192 positions, so its search runs on a copy
  of its config with linear RoPE scaling x4 (32,768 positions, the weights shared by a link), as a
  context-extension fine-tune would; RoPE has no table, so the memory is the same.

Each (model, length, variant) step runs in a fresh process (``--worker``) with glibc's mmap
threshold pinned (``MALLOC_MMAP_THRESHOLD_=65536``, as FACTS.md and memory_validation.py: freed
tensors go back to the kernel, so RSS follows the live tensors) and one torch thread (with that
threshold, cross-thread unmapping makes a step ten times slower). Memory is the process's peak
RSS (``VmHWM``, reset after loading) over one forward/backward/AdamW step: the loaded model plus
what the step adds; and that peak minus the RSS after loading. Step times are wall-clock on a machine shared with other jobs: contended, indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULT_PREFIX = "LONG_CONTEXT_RESULT "
VARIANTS = ("hf_peft_plugin", "peft")
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
LLAMA_128K = dict(
    vocab_size=128256,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)
MODELS = {
    "llama": dict(label="random Llama, vocab 128,256, hidden 512, 4 layers", lengths=(2048, 4096)),
    "smollm2": dict(label="SmolLM2-135M", lengths=(1024, 2048)),
}


def model_path(name: str, cache: Path) -> str:
    if name == "smollm2":
        from hf_peft_plugin.assets import smollm2_path

        return str(smollm2_path())
    path = cache / "llama-v128k-h512-l4"
    if not (path / "config.json").exists():  # built once, saved as safetensors; both variants load it
        import tempfile

        from transformers import LlamaConfig, LlamaForCausalLM

        cache.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        # Positions well past the probes; RoPE needs no table, so memory does not depend on it.
        config = LlamaConfig(max_position_embeddings=131072, tie_word_embeddings=False, **LLAMA_128K)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=cache))
        LlamaForCausalLM(config).save_pretrained(tmp)
        os.replace(tmp, path)
    return str(path)


def extended_positions(path: str, factor: int, cache: Path) -> str:
    """``path`` with linear RoPE scaling by ``factor``: the same weights (linked), ``factor`` times the positions."""
    source = Path(path)
    target = cache / f"{source.name}-rope-linear-x{factor}"
    if not (target / "config.json").exists():
        import tempfile

        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=cache))
        for item in source.iterdir():
            if item.name != "config.json" and not item.name.startswith("."):
                (tmp / item.name).symlink_to(item.resolve())
        config = json.loads((source / "config.json").read_text())
        rope = dict(config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)})
        config["rope_parameters"] = dict(rope, rope_type="linear", factor=float(factor))
        config["max_position_embeddings"] = config["max_position_embeddings"] * factor
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        os.replace(tmp, target)
    return str(target)


# -- one step in a fresh process -----------------------------------------------------------------


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(variant: str, path: str, tokens: int) -> dict[str, Any]:
    from bench_train import load_hf_peft_plugin, load_peft

    torch.manual_seed(0)
    load = load_hf_peft_plugin if variant == "hf_peft_plugin" else load_peft
    model = load(path, 4, True, torch.float32)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    loaded = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on is the step's (loading peaks apart)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    value = loss.item()
    loss.backward()
    del loss
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    return dict(variant=variant, tokens=tokens, loaded=loaded, peak=peak, step=peak - loaded, seconds=seconds, loss=value)


def run_worker(variant: str, path: str, tokens: int, timeout: float) -> dict[str, Any]:
    """One fresh process; on failure (e.g. out of memory) a result with ``error``."""
    env = dict(os.environ, **ENV, PYTHONPATH=str(ROOT))
    command = [sys.executable, __file__, "--worker", json.dumps([variant, path, tokens])]
    try:
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return dict(variant=variant, tokens=tokens, error=f"timed out after {timeout:.0f} s")
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if out.returncode != 0 or not lines:
        return dict(variant=variant, tokens=tokens, error=f"exit {out.returncode}: {out.stderr.strip()[-400:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


# -- the longest context in a budget -------------------------------------------------------------


def longest_context(
    variant: str, path: str, known: dict[int, int], budget: int, limit: int, step: int, probes: int, timeout: float
) -> tuple[int, bool, list[dict[str, Any]]]:
    """``(longest measured length that fits, whether a longer one was shown not to fit, probes)``.

    Bisection on the measured peak between the longest known fit and the shortest known miss; the
    first probe is where a straight line through the two longest known points meets the budget."""
    fits = {t for t, peak in known.items() if peak <= budget}
    misses = {t for t, peak in known.items() if peak > budget}
    runs = []
    for _ in range(probes):
        low = max(fits, default=0)
        high = min(misses, default=limit + step)
        if high - low <= max(step, low // 20):  # 5 % or one step: close enough
            break
        if not misses:
            points = sorted(known.items())[-2:]
            (t0, p0), (t1, p1) = points if len(points) == 2 else ((0, 0), points[0])
            slope = max((p1 - p0) / max(t1 - t0, 1), 1.0)
            guess = t1 + (budget - p1) / slope
        else:
            guess = (low + high) / 2
        guess = int(min(limit, max(low + step, min(high - step, guess))) // step * step)
        if guess <= low or guess in known:
            break
        result = run_worker(variant, path, guess, timeout)
        runs.append(result)
        peak = result.get("peak")
        known[guess] = peak if peak is not None else budget + 1  # a failed step does not fit
        (fits if known[guess] <= budget else misses).add(guess)
        if guess >= limit and known[guess] <= budget:
            break
    return max(fits, default=0), bool(misses), runs


# -- the table -----------------------------------------------------------------------------------


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f}"


def cpu_flags() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "lscpu unavailable"
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    wanted = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    return f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs; flags: {' '.join(wanted)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--budget-gib", type=float, default=4.0)
    parser.add_argument("--no-max", action="store_true", help="skip the longest-context search")
    parser.add_argument("--lengths", type=int, nargs="+", help="measure these lengths instead of the rows'")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--max-probe", type=int, default=16384, help="longest context the search tries")
    parser.add_argument("--probes", type=int, default=3, help="bisection probes per variant")
    parser.add_argument("--timeout", type=float, default=1500)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hf_peft_plugin_bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        print(RESULT_PREFIX + json.dumps(worker(*json.loads(args.worker))), flush=True)
        return

    print(f"machine: {cpu_flags()}; torch {torch.__version__}; env {ENV}")
    budget = int(args.budget_gib * 2**30)
    for name in args.models:
        spec = MODELS[name]
        path = model_path(name, args.cache)
        rows: dict[int, dict[str, dict[str, Any]]] = {}
        for tokens in args.lengths or spec["lengths"]:
            rows[tokens] = {}
            for variant in args.variants:  # one after the other: a load change hits both alike
                rows[tokens][variant] = run_worker(variant, path, tokens, args.timeout)
                print(f"  {name} {tokens} {variant}: {rows[tokens][variant]}", file=sys.stderr, flush=True)
        print(f"\n{spec['label']}, 4-bit, r=16 all-linear, gradient checkpointing, batch 1:\n")
        print("| tokens | peak RSS ours (MiB) | peak RSS peft | ratio | step peak over loaded: ours | peft | ratio "
              "| step s ours | peft (contended) | loss ours | peft |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for tokens, by_variant in rows.items():
            if len(by_variant) < 2:  # one variant only (--variants): its numbers
                print(f"| {tokens:,} | {by_variant} |")
                continue
            ours, peft = by_variant["hf_peft_plugin"], by_variant["peft"]
            if "error" in ours or "error" in peft:
                print(f"| {tokens:,} | {ours.get('error', _mib(ours.get('peak')))} | {peft.get('error', _mib(peft.get('peak')))} |")
                continue
            print(
                f"| {tokens:,} | {_mib(ours['peak'])} | {_mib(peft['peak'])} | {ours['peak'] / peft['peak']:.2f}x "
                f"| {_mib(ours['step'])} | {_mib(peft['step'])} | {ours['step'] / peft['step']:.2f}x "
                f"| {ours['seconds']:.1f} | {peft['seconds']:.1f} | {ours['loss']:.4f} | {peft['loss']:.4f} |"
            )
        if args.no_max:
            continue
        limit = args.max_probe
        from transformers import AutoConfig

        if AutoConfig.from_pretrained(path).max_position_embeddings < limit:  # SmolLM2: 8,192
            path = extended_positions(path, 4, args.cache)
        limit = min(limit, AutoConfig.from_pretrained(path).max_position_embeddings)
        found = {}
        for variant in VARIANTS:
            known = {t: r[variant]["peak"] for t, r in rows.items() if "peak" in r[variant]}
            found[variant] = longest_context(
                variant, path, known, budget, limit, 256, args.probes, args.timeout
            )
            print(f"  {name} max {variant}: {found[variant]}", file=sys.stderr, flush=True)
        print(f"\nLongest context whose step peaks within {args.budget_gib:g} GiB (measured, bisection):\n")
        print("| model | ours | peft | ratio | probes (tokens: peak MiB) |")
        print("|---|---:|---:|---:|---|")
        (ours, ours_bounded, ours_runs), (peft, peft_bounded, peft_runs) = found["hf_peft_plugin"], found["peft"]
        ours_text = f"{ours:,}" if ours_bounded else f">= {ours:,} (probe cap {limit:,})"
        peft_text = f"{peft:,}" if peft_bounded else f">= {peft:,} (probe cap {limit:,})"
        ratio = f"{ours / peft:.1f}x" + ("" if ours_bounded else " (lower bound)") if peft else "—"
        probes = "; ".join(
            f"{r['variant']} {r['tokens']:,}: {_mib(r.get('peak')) if 'peak' in r else r['error'][:60]}"
            for r in ours_runs + peft_runs
        )
        print(f"| {spec['label']} | {ours_text} | {peft_text} | {ratio} | {probes} |")


if __name__ == "__main__":
    main()
