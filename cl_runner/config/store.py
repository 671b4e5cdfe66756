"""Each option's default is written once, in its dataclass schema (`config.py` for the
trainer, each strategy's module for its options). Hydra sees those defaults through its
ConfigStore as plain nodes (types are checked later by `config.validate`, which gives the
one-line errors), so a YAML option file lists only what differs from its schema:

    # configs/strategy/classp_paper.yaml
    defaults:
      - /schema/strategy@_here_: classp
      - _self_
    threshold_mode: absolute

Registered by cl-run's search-path plugin before Hydra composes anything (the CLI, tests,
the compose API alike)."""
from __future__ import annotations

from dataclasses import asdict

from omegaconf import DictConfig, OmegaConf


def schema_node(schema: type) -> DictConfig:
    """The schema's defaults as an untyped node (so a bad value reaches validate())."""
    return OmegaConf.create(asdict(schema()))


def register_schemas() -> None:
    from hydra.core.config_store import ConfigStore

    from cl_runner.config.schema import LoggerConfig, ModelConfig, TaskStreamConfig, TrainerConfig
    from cl_runner.strategies import registry

    store = ConfigStore.instance()
    store.store(group="schema", name="trainer", node=schema_node(TrainerConfig))
    store.store(group="schema", name="task_stream", node=schema_node(TaskStreamConfig))
    store.store(group="schema", name="model", node=schema_node(ModelConfig))
    store.store(group="schema", name="logger", node=schema_node(LoggerConfig))
    for name, reg in registry.registrations(registry.BASE).items():
        store.store(group="schema/strategy", name=name, node=schema_node(reg.config))
    for name, reg in registry.registrations(registry.ADDON).items():
        store.store(group="schema/addons", name=name, node=schema_node(reg.config))
    if not OmegaConf.has_resolver("cl_strategies"):  # cl-run --help lists them (configs/hydra/help)
        OmegaConf.register_new_resolver("cl_strategies", strategies_help)


def strategies_help() -> str:
    """One line per registered strategy and add-on, from their registrations."""
    from cl_runner.strategies import registry

    regs = registry.registrations()
    width = max(len(r.switch_on) for r in regs.values())
    lines = [f"  {r.switch_on.ljust(width)}  {r.summary}" for r in registry.registrations(registry.BASE).values()]
    lines += [f"  {r.switch_on.ljust(width)}  {r.summary}" for r in registry.addons()]
    return "\n".join(lines)
