"""Models shipped as a GGUF file (llama.cpp's format), loaded through transformers.

transformers reads a GGUF file with `from_pretrained(folder, gguf_file=name)` (it needs
the `gguf` package) and dequantises every tensor to full precision; the tokenizer comes
from the same file. That conversion is slow (about 40 s for the 98 MB SmolLM2-135M Q4_1
file on a 2-core CPU), so the converted model and tokenizer are written once as an
ordinary Hugging Face folder (safetensors) into a cache and loaded from there next time
(about 5 s).

The cache folder is `model.cache_dir`, else `$CL_RUNNER_CACHE`, else
`$XDG_CACHE_HOME/cl-runner` (`~/.cache/cl-runner`); entries live under `gguf/` and are
keyed by the file's identity (resolved path, size and modification time), so a changed
or replaced file is converted again. An entry is written into a temporary folder and
renamed into place, so a run killed mid-write, or two runs converting at once, never
leave a half-written entry that a later run would load.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

CACHE_ENV = "CL_RUNNER_CACHE"
# Bump when the layout of a cache entry changes: old entries are then converted again.
CACHE_FORMAT = 1
MARKER = "cl_runner_gguf.txt"


class GGUFError(RuntimeError):
    """A GGUF model the run cannot load; the message names the key and the fix."""


def cache_root(cache_dir: Optional[str]) -> Path:
    """model.cache_dir, else $CL_RUNNER_CACHE, else the user cache folder."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cl-runner"


def file_key(gguf_path: Path, variant: str = "") -> str:
    """The identity of a GGUF file: resolved path, size and mtime (ns), hashed. Cheap (no
    read of the file) and changes when the file is replaced or rewritten. `variant`: the
    model class it is converted to (a causal and a seq2seq copy never share an entry)."""
    path = gguf_path.resolve()
    st = path.stat()
    ident = f"{CACHE_FORMAT}|{path}|{st.st_size}|{st.st_mtime_ns}|{variant}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def cache_entry(gguf_path: Path, cache_dir: Optional[str], variant: str = "AutoModelForCausalLM") -> Path:
    """The folder the converted model of `gguf_path` lives in (whether or not it exists)."""
    stem = gguf_path.name[: -len(".gguf")] if gguf_path.name.endswith(".gguf") else gguf_path.name
    return cache_root(cache_dir) / "gguf" / f"{stem}-{file_key(gguf_path, variant)}"


def is_complete(entry: Path) -> bool:
    return (entry / MARKER).is_file()


def require_gguf_package(gguf_path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(
            f"model.gguf_file={str(gguf_path)!r} needs the 'gguf' package to be converted (no converted copy is in "
            "the cache yet): pip install gguf (it comes with the dev/test install: pip install -e '.[dev]')")


def dense_kwargs() -> dict[str, Any]:
    """Ask for plain full-precision weights. Newer transformers can keep GGUF blocks packed
    (GgufConfig; not trainable, and it does so when its matmul kernels are installed);
    older ones always dequantise and have no such option."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def save_dense(model: Any, folder: Path) -> None:
    """config.json, generation_config.json and model.safetensors of a dequantised model.
    `save_pretrained` refuses a model loaded through the GGUF quantizer even when every
    weight is dense, so the parts are written directly (tied weights stored once)."""
    from safetensors.torch import save_model

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the copy is an ordinary dense checkpoint
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def convert(gguf_path: Path, entry: Path, auto_class: Any, load_kwargs: dict[str, Any]) -> None:
    """Dequantise `gguf_path` with transformers and write model + tokenizer to `entry`
    atomically (temporary sibling folder, then rename)."""
    from transformers import AutoTokenizer

    require_gguf_package(gguf_path)
    entry.parent.mkdir(parents=True, exist_ok=True)
    print(f"[cl-run] converting {gguf_path.name} (GGUF, dequantised by transformers) into the cache {entry}; "
          "later runs load the converted copy", file=sys.stderr, flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = auto_class.from_pretrained(folder, gguf_file=name, **dense_kwargs(), **load_kwargs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        save_dense(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(f"converted from {gguf_path.resolve()}\n")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not is_complete(entry):  # not another run's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def converted_folder(gguf_path: Path, cache_dir: Optional[str], auto_class: Any,
                     load_kwargs: dict[str, Any]) -> Path:
    """The cache folder holding `gguf_path` as a Hugging Face model, converting it first
    when it is not there yet."""
    if not gguf_path.is_file():
        raise GGUFError(f"model.gguf_file: {str(gguf_path)!r} does not exist or is not a file; point it at a .gguf "
                        "file (a path, a file name inside model.path, or pkg://<package>/<file>.gguf)")
    entry = cache_entry(gguf_path, cache_dir, auto_class.__name__)
    if not is_complete(entry):
        if entry.exists():  # an incomplete entry (not written by this code): replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            convert(gguf_path, entry, auto_class, load_kwargs)
        except PermissionError as err:
            raise GGUFError(f"the GGUF cache {entry.parent} is not writable ({err.strerror}); set model.cache_dir "
                            f"or ${CACHE_ENV} to a writable folder") from None
    return entry
