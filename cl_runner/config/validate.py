"""Validation of a composed run config, with clear errors.

Hydra composes YAML files; `validate` then merges each group into its dataclass
(`schema.py`; a strategy's own lives with its registration), so a misspelt key, a wrong
type or an out-of-range value fails before any model is built, naming the key and a fix.
"""
from __future__ import annotations

import difflib
import math
import os
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from cl_runner.config.schema import SCHEMAS, RunSettings
from cl_runner.errors import ConfigError, require, require_choice
from cl_runner.models.positions import position_limit
from cl_runner.strategies import registry

# Keys Hydra or the launcher group may leave at the top level.
_IGNORED_TOP = {"hydra", "launcher", "experiment"}

CHOICES = {
    "model.kind": ("causal", "seq2seq", "classifier"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.head_sharing": ("label_string", "per_task"),
    "model.adapter": ("none", "lora"),
    "task_stream.kind": ("synthetic", "trace", "olora", "custom"),
    "task_stream.unknown_labels": ("error", "drop"),
    "trainer.schedule": ("constant", "linear", "cosine"),
    "trainer.precision": ("no", "bf16", "fp16"),
    "trainer.sharding": ("none", "fsdp"),
    "evaluation.decoding": ("greedy", "sample"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("offline", "online", "disabled"),
}


def _merge(schema: type, node: Any, key: str) -> DictConfig:
    """Merge a user node into its schema; turn OmegaConf errors into ConfigErrors."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, node if node is not None else {})
    except ConfigKeyError as err:
        bad = str(getattr(err, "key", "") or "")
        known = [f for f in base.keys()]
        close = difflib.get_close_matches(bad, known, n=1)
        hint = f"did you mean '{key}.{close[0]}'? " if close else ""
        raise ConfigError(f"unknown config key '{key}.{bad}': {hint}known keys of '{key}': {', '.join(known)}") from None
    except OmegaConfBaseException as err:
        full = f"{key}.{err.key}" if getattr(err, "key", None) else key
        if key == "run" and getattr(err, "key", None):  # top-level settings are named as typed: 'seed'
            full = str(err.key)
        msg = str(err).splitlines()[0]
        raise ConfigError(f"bad value for '{full}': {msg}") from None
    return merged


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    require(ok, key, value, fix, error=ConfigError)


def _check_gguf_file(m: Any) -> None:
    """A GGUF file given as pkg:// or a path must be there before anything is built (a
    file name inside a hub id is looked up when the model is built)."""
    from cl_runner.models.build import ModelLoadError, resolve_model_path

    name = str(m.gguf_file)
    if not (name.startswith("pkg://") or m.path is None or os.path.isabs(os.path.expanduser(name))):
        return
    try:
        path = resolve_model_path(name, "model.gguf_file")
    except ModelLoadError as err:
        raise ConfigError(str(err)) from None
    _check(os.path.isfile(path), "model.gguf_file", name,
           f"no such file ({path}); point it at a .gguf file (a path or pkg://<package>/<file>.gguf)")


def _check_ranges(cfg: DictConfig) -> None:
    for dotted, allowed in CHOICES.items():
        require_choice(OmegaConf.select(cfg, dotted), dotted, allowed, error=ConfigError)
    tr = cfg.trainer
    _check(tr.batch_size >= 1, "trainer.batch_size", tr.batch_size, "use a positive integer")
    _check(tr.grad_accum >= 1, "trainer.grad_accum", tr.grad_accum, "use a positive integer")
    _check(math.isfinite(tr.lr) and tr.lr > 0, "trainer.lr", tr.lr, "use a positive, finite learning rate")
    _check(math.isfinite(tr.weight_decay) and tr.weight_decay >= 0, "trainer.weight_decay", tr.weight_decay,
           "use a finite value >= 0")
    _check(math.isfinite(tr.adam_eps), "trainer.adam_eps", tr.adam_eps, "use a finite number")
    _check(0 <= tr.warmup_ratio < 1, "trainer.warmup_ratio", tr.warmup_ratio, "use a value in [0, 1)")
    _check(tr.steps_per_task is None or tr.steps_per_task >= 1, "trainer.steps_per_task", tr.steps_per_task, "use a positive integer or null")
    _check(tr.max_grad_norm is None or (math.isfinite(tr.max_grad_norm) and tr.max_grad_norm > 0),
           "trainer.max_grad_norm", tr.max_grad_norm, "use a positive, finite number or null to disable clipping")
    _check(tr.checkpoint_every_steps >= 0, "trainer.checkpoint_every_steps", tr.checkpoint_every_steps, "use 0 (task boundaries only) or a positive step count")
    _check(tr.keep_checkpoints >= 1, "trainer.keep_checkpoints", tr.keep_checkpoints, "keep at least 1")
    _check(tr.cpu_threads is None or tr.cpu_threads >= 1, "trainer.cpu_threads", tr.cpu_threads,
           "use a positive number of threads, or null for torch's default")
    _check(0 <= cfg.seed < 2**32, "seed", cfg.seed, "use an integer in [0, 2**32)")
    epochs = tr.epochs
    if OmegaConf.is_list(epochs):
        _check(all(float(e) > 0 for e in epochs), "trainer.epochs", list(epochs), "every entry must be > 0")
    else:
        _check(isinstance(epochs, (int, float)) and epochs > 0, "trainer.epochs", epochs, "use a number > 0 or a list with one number per task")
    ts = cfg.task_stream
    for k in ("max_train_per_task", "max_test_per_task"):
        v = ts[k]
        _check(v is None or v >= 1, f"task_stream.{k}", v, "use a positive integer or null for all")
    if ts.kind == "synthetic":
        _check(ts.test_size >= 1, "task_stream.test_size", ts.test_size,
               "each task is scored on its test split, so it needs at least 1 example; use a positive integer")
        _check(ts.train_size >= 0, "task_stream.train_size", ts.train_size, "use 0 or a positive integer")
    if ts.kind in ("trace", "olora") and not cfg.dry_run:  # a dry run plans memory; it reads no data
        _check(bool(ts.data_dir), "task_stream.data_dir", ts.data_dir,
               f"set task_stream.data_dir=/path/to/{'TRACE root (one folder per task)' if ts.kind == 'trace' else 'CL_Benchmark root (<TaskType>/<Dataset>/...)'}")
    if ts.kind == "custom":
        _check(len(ts.tasks) > 0, "task_stream.tasks", list(ts.tasks), "list at least one task entry (see docs/data.md, Custom streams)")
    ev = cfg.evaluation
    _check(ev.temperature > 0, "evaluation.temperature", ev.temperature, "use a positive temperature")
    _check(0 < ev.top_p <= 1, "evaluation.top_p", ev.top_p, "use a value in (0, 1]")
    _check(ev.batch_size >= 1, "evaluation.batch_size", ev.batch_size, "use a positive integer")
    m = cfg.model
    _check(m.path is not None or m.gguf_file is not None or m.architecture is not None, "model.path", m.path,
           "set model.path (hub id, folder, pkg://...), model.gguf_file, or model.architecture for a random init")
    if m.gguf_file is not None:
        _check(bool(str(m.gguf_file).strip()), "model.gguf_file", m.gguf_file,
               "name a .gguf file (a path, pkg://<package>/<file>.gguf, or a file name inside model.path), or null")
        _check(m.tokenizer is None, "model.tokenizer", m.tokenizer,
               "a GGUF model uses the tokenizer stored in its file; set model.tokenizer=null")
        _check_gguf_file(m)
    _check(m.max_length >= 8, "model.max_length", m.max_length, "use at least 8 tokens")
    _check_lora(m, tr)
    _check_prompt(m, tr)


def _check_prompt(m: DictConfig, tr: DictConfig) -> None:
    """model.prompt.* ranges, and soft prompts against sharding."""
    from cl_runner.models.prompts import SHARDING_REFUSAL, check_prompt_options

    check_prompt_options(m.prompt)
    if m.prompt.length > 0 and tr.sharding == "fsdp":
        raise ConfigError(f"model.prompt.length={m.prompt.length} cannot run with trainer.sharding=fsdp: "
                          f"{SHARDING_REFUSAL}; use trainer.sharding=none")


def _check_lora(m: DictConfig, tr: DictConfig) -> None:
    """model.lora.* ranges, and adapters against sharding (checked even with adapter=none
    for the ranges, so a typo'd value never waits for the day the adapter is switched on)."""
    lora = m.lora
    _check(lora.r >= 1, "model.lora.r", lora.r, "use a positive rank, e.g. model.lora.r=8")
    _check(math.isfinite(lora.alpha) and lora.alpha > 0, "model.lora.alpha", lora.alpha,
           "use a positive scale numerator (the update is scaled by alpha / r), e.g. 32")
    _check(0 <= lora.dropout < 1, "model.lora.dropout", lora.dropout, "use a value in [0, 1)")
    targets = lora.target_modules
    _check(targets is None or (len(targets) > 0 and all(str(t).strip() for t in targets)),
           "model.lora.target_modules", None if targets is None else list(targets),
           "list module names such as [q_proj,v_proj], or null for the model family's default")
    if m.adapter != "none" and tr.sharding == "fsdp":
        raise ConfigError(f"model.adapter={m.adapter} cannot be combined with trainer.sharding=fsdp: FSDP2 shards "
                          "the frozen base weights and the adapters together, which cl-runner does not support yet; "
                          "use trainer.sharding=none (each process holds the base model, DDP syncs only the adapters)")


def validate(cfg: DictConfig) -> DictConfig:
    """Return a validated, fully typed copy of a composed run config."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    out: dict[str, Any] = {}
    run_keys = set(RunSettings.__dataclass_fields__)
    addons = registry.registrations(registry.ADDON)
    known_top = set(SCHEMAS) | set(addons) | {"strategy"} | run_keys | _IGNORED_TOP
    for key in raw:
        if key not in known_top:
            close = difflib.get_close_matches(key, sorted(known_top - _IGNORED_TOP), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown top-level config key '{key}': {hint}known: {', '.join(sorted(known_top - _IGNORED_TOP))}")
    settings = _merge(RunSettings, {k: raw[k] for k in run_keys if k in raw}, "run")
    for k in run_keys:
        out[k] = settings[k]
    for key, schema in SCHEMAS.items():
        out[key] = _merge(schema, raw.get(key), key)

    strategy_node = raw.get("strategy") or {}
    name = strategy_node.get("name", registry.DEFAULT_BASE)
    try:
        reg = registry.get(name, registry.BASE)
    except KeyError as err:
        raise ConfigError(f"bad value for 'strategy.name': {err.args[0]}; pick with strategy=<name>") from None
    out["strategy"] = _merge(reg.config, strategy_node, "strategy")
    for addon, reg in addons.items():
        out[addon] = _merge(reg.config, raw.get(addon), addon)
    cfg_out = OmegaConf.create(out)
    _check_ranges(cfg_out)
    check_run_shape(cfg_out)
    return cfg_out


# ----------------------------------------------------- checks that span several groups
def check_lengths(cfg: Any, limit: Optional[tuple[int, str]], source: str) -> None:
    """model.max_length against the model's positions (`source`: where `limit` was read),
    and a fixed generation budget against model.max_length."""
    m, ev = cfg.model, cfg.evaluation
    if limit is not None:
        positions, key = limit
        _check(m.max_length <= positions, "model.max_length", m.max_length,
               f"the model has {positions} positions ({source}.{key}); use model.max_length<={positions}")
    if m.kind == "causal" and ev.max_new_tokens is not None:
        _check(ev.max_new_tokens < m.max_length, "evaluation.max_new_tokens", ev.max_new_tokens,
               f"the answer is generated after the prompt within model.max_length={m.max_length}; use at most "
               f"{m.max_length - 1}, or null for each task's own budget, or raise model.max_length")


def check_task_budget(cfg: Any, task_name: str, budget: int) -> None:
    """A task's own generation budget (evaluation.max_new_tokens=null) must leave room
    for the prompt within model.max_length."""
    m = cfg.model
    if m.kind == "causal" and budget >= m.max_length:
        raise ConfigError(f"task '{task_name}' generates up to {budget} new tokens (its max_new_tokens), which leaves "
                          f"no room for the prompt within model.max_length={m.max_length}; raise model.max_length "
                          f"or set evaluation.max_new_tokens below {m.max_length}")


def check_epochs(trainer: Any, task_names: list[str]) -> None:
    """A list of epochs needs one entry per task (unless steps_per_task replaces it)."""
    epochs = trainer.epochs
    if trainer.steps_per_task is not None or isinstance(epochs, (int, float)):
        return
    epochs = list(epochs)
    _check(len(epochs) == len(task_names), "trainer.epochs", epochs,
           f"the stream has {len(task_names)} task(s) ({', '.join(task_names)}): give one entry per task, "
           "or one number for every task")


def check_run_shape(cfg: DictConfig) -> None:
    """What one group's schema cannot see: the tasks the stream will have against
    trainer.epochs, the generation budget against model.max_length, and model.max_length
    against the model's positions where the architecture config names them. The same
    checks run again on the built stream and model before training (loop.py)."""
    from cl_runner.streams.build import planned_task_names

    ev, m = cfg.evaluation, cfg.model
    _check(ev.max_new_tokens is None or ev.max_new_tokens >= 1, "evaluation.max_new_tokens", ev.max_new_tokens,
           "use a positive number of new tokens, or null for each task's own budget")
    tr = cfg.trainer
    check_lengths(cfg, position_limit(m.architecture_config) if m.path is None and m.gguf_file is None else None,
                  "model.architecture_config")
    try:
        names = planned_task_names(cfg.task_stream)
    except ValueError as err:
        message = str(err)
        key = "task_stream.tasks" if cfg.task_stream.kind == "custom" else "task_stream.order"
        raise ConfigError(message if message.startswith("task_stream.") else f"{key}: {message}") from None
    check_monitor(cfg)
    if names is None:
        return
    repeated = sorted({n for n in names if names.count(n) > 1})
    _check(not repeated, "task_stream.order", names, f"{', '.join(repeated)} appear(s) twice; each task may appear once")
    check_epochs(tr, names)


def check_monitor(cfg: DictConfig) -> None:
    """evaluation.monitor: names or entries, none repeated, none also trained."""
    from cl_runner.streams.build import planned_monitor_names

    if not cfg.evaluation.monitor:
        return
    try:
        planned_monitor_names(list(cfg.evaluation.monitor), cfg.task_stream)
    except ValueError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith("evaluation.monitor") else f"evaluation.monitor: {msg}") from None
