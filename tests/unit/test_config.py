"""Every config composes and validates; bad input fails early, naming key and fix."""
from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from cl_runner.errors import ConfigError
from cl_runner.config.validate import validate
from tests.helpers import REPO, compose

GROUPS = ["model", "task_stream", "strategy", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_validates(group):
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group == "task_stream" and option not in ("synthetic", "custom"):
            overrides.append("task_stream.data_dir=/data")
        if group == "task_stream" and option == "custom":
            overrides.append("task_stream.tasks=[{name: a, path: /data/a}]")
        cfg = validate(compose(overrides))
        # The option's own scalar settings survive composition and validation.
        path = REPO / "configs" / group / f"{option}.yaml"
        text = path.read_text()
        if "@package" in text.split("\n", 1)[0]:
            continue  # a preset of package _global_ (rewarm_replay) sets other groups' keys
        own = {k: v for k, v in (yaml.safe_load(text) or {}).items()
               if k not in ("defaults", "data_dir", "tasks") and not isinstance(v, (dict, list))}
        assert {k: cfg[group][k] for k in own} == own, (group, option)


def test_experiment_presets_validate():
    for option in options("experiment"):
        cfg = validate(compose([f"experiment={option}", "task_stream.data_dir=/data"]))
        assert cfg.trainer.lr > 0
        # A preset's own top-level keys win over config.yaml's (defaults order: _self_ first).
        assert cfg.experiment_name == option


def test_preset_sets_evaluation_and_the_command_line_still_wins():
    cfg = validate(compose(["experiment=trace_scripts", "task_stream.data_dir=/data"]))
    assert cfg.evaluation.max_new_tokens == 512
    cfg = validate(compose(["experiment=trace_scripts", "task_stream.data_dir=/data",
                            "experiment_name=mine", "evaluation.max_new_tokens=7"]))
    assert (cfg.experiment_name, cfg.evaluation.max_new_tokens) == ("mine", 7)


def test_default_is_tiny_gpt2_on_synthetic_with_seq_ft():
    cfg = validate(compose([]))
    assert (cfg.model.name, cfg.task_stream.name, cfg.strategy.name) == ("tiny_gpt2", "synthetic", "seq_ft")


def test_unknown_key_names_key_and_suggests():
    cfg = compose(["+trainer.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"trainer\.lrr.*did you mean 'trainer\.lr'"):
        validate(cfg)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match="unknown top-level config key 'sed'.*seed"):
        validate(compose(["+sed=3"]))


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"trainer\.batch_size"):
        validate(compose(["trainer.batch_size=abc"]))


@pytest.mark.parametrize("value", ["abc", "1.5", "-1", "true"])
def test_seed_must_be_a_non_negative_integer_named_as_typed(value):
    with pytest.raises(ConfigError, match=r"bad value for 'seed'"):
        validate(compose([f"seed={value}"]))


@pytest.mark.parametrize("value", ["0", "-2", "abc", "1.5", "true"])
def test_cpu_threads_is_a_positive_integer_or_null(value):
    with pytest.raises(ConfigError, match=r"bad value for 'trainer\.cpu_threads'"):
        validate(compose([f"trainer.cpu_threads={value}"]))
    assert validate(compose(["trainer.cpu_threads=2"])).trainer.cpu_threads == 2
    assert validate(compose(["trainer=finetune"])).trainer.cpu_threads is None


@pytest.mark.parametrize("override,key", [
    ("trainer.lr=-1", "trainer.lr"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.precision=fp8", "trainer.precision"),
    ("trainer.schedule=step", "trainer.schedule"),
    ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio"),
    ("model.kind=decoder", "model.kind"),
    ("evaluation.decoding=beam", "evaluation.decoding"),
    ("task_stream.max_train_per_task=0", "task_stream.max_train_per_task"),
])
def test_out_of_range_values(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose([override]))


def test_trace_without_data_dir_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("TRACE_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"task_stream\.data_dir.*set task_stream\.data_dir="):
        validate(compose(["task_stream=trace"]))


def test_unknown_strategy_name_lists_known():
    cfg = compose([])
    cfg = OmegaConf.to_container(cfg)
    cfg["strategy"] = {"name": "sgd_magic"}
    with pytest.raises(ConfigError, match="unknown strategy 'sgd_magic'.*seq_ft"):
        validate(OmegaConf.create(cfg))


def test_unknown_strategy_option_is_a_hydra_error():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="strategy"):
        compose(["strategy=sgd_magic"])


def test_local_configs_folder_shadows_package(tmp_path, monkeypatch):
    """A configs/ in the working directory wins over the package's, file by file."""
    import subprocess
    import sys

    (tmp_path / "configs" / "model").mkdir(parents=True)
    src = (REPO / "configs" / "model" / "tiny_gpt2.yaml").read_text()
    (tmp_path / "configs" / "model" / "my_model.yaml").write_text(src.replace("name: tiny_gpt2", "name: my_model"))
    out = subprocess.run([sys.executable, "-m", "cl_runner.cli", "model=my_model", "dry_run=true", "logger=none"],
                         cwd=tmp_path, capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "name: my_model" in out.stdout


@pytest.mark.slow  # two cl-run processes; the search-path plugin is also covered by test_local_configs_folder_shadows_package
def test_local_default_config_is_read_and_the_command_line_wins(tmp_path):
    """configs/local/default.yaml in the working directory (git-ignored, top-level keys) is
    merged into every run; an override on the command line still wins over it."""
    import os
    import subprocess
    import sys

    (tmp_path / "configs" / "local").mkdir(parents=True)
    (tmp_path / "configs" / "local" / "default.yaml").write_text(
        "experiment_name: from_local\ntrainer:\n  lr: 0.0123\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "cl_runner.cli", "dry_run=true", "logger=none"]
    out = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "experiment_name: from_local" in out.stdout and "lr: 0.0123" in out.stdout
    out = subprocess.run([*base, "trainer.lr=0.5"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "lr: 0.5" in out.stdout and "lr: 0.0123" not in out.stdout


def test_without_local_config_nothing_changes():
    assert compose([]).experiment_name == "default"


def test_misspelt_command_line_key_gets_did_you_mean_not_hydras_append_hint():
    from hydra.core.global_hydra import GlobalHydra

    from cl_runner.config.override_check import misspelt_key_message

    GlobalHydra.instance().clear()
    configs = REPO / "configs"
    msg = misspelt_key_message(configs, ["strategy=ewc", "strategy.ewc_lamda=3"])
    assert msg.startswith("unknown config key 'strategy.ewc_lamda': did you mean 'strategy.ewc_lambda'?"), msg
    assert "+strategy.ewc_lamda=" in msg
    assert "did you mean 'seed'" in misspelt_key_message(configs, ["seeed=1"])
    # Good command lines, flags and other failures are left to Hydra.
    assert misspelt_key_message(configs, ["trainer.lr=0.1", "strategy=hft"]) is None
    assert misspelt_key_message(configs, ["--cfg", "job", "trainer.lr=0.1"]) is None
    assert misspelt_key_message(configs, ["strategy=no_such_strategy"]) is None
