"""Config -> TaskStream: picks the loader for the stream's on-disk format."""
from __future__ import annotations

from typing import Any, Optional

from cl_runner.streams.task import TaskStream


def named_order_error(order: str) -> str:
    return (f"task_stream.order: {order!r} names a benchmark order, which only trace and olora streams have; "
            "list the task names instead, e.g. task_stream.order=[a,b]")


def planned_task_names(cfg: Any) -> Optional[list[str]]:
    """The names of the stream's tasks, in order, as far as the config tells without
    reading any data (None where only the loader can tell). Custom entries are checked
    here (names given and unique, one source each); ValueError names the problem."""
    if isinstance(cfg.order, str):  # a named order of the benchmark
        if cfg.kind == "olora":
            from cl_runner.streams.olora import resolve_olora_order

            return resolve_olora_order(cfg.order)
        if cfg.kind == "trace":
            from cl_runner.streams.trace import _resolve_order

            return _resolve_order(cfg.order)
        raise ValueError(named_order_error(cfg.order))
    order = [str(name) for name in cfg.order]
    if order:
        check_registry_names(order, cfg.kind)
    if cfg.kind == "synthetic":
        from cl_runner.streams.synthetic import DEFAULT_ORDER

        return order or list(DEFAULT_ORDER)
    if cfg.kind == "trace":
        from cl_runner.streams.trace import TRACE_ORDERS

        return order or list(TRACE_ORDERS["default"])
    if cfg.kind == "olora":
        return order or None
    if cfg.kind == "custom":
        from cl_runner.streams.custom import check_entries

        return [entry["name"] for entry in check_entries(list(cfg.tasks))]
    return None


def check_registry_names(names: list[str], kind: str) -> None:
    """Task names against the registry of the stream's format (synthetic rules, TRACE
    tasks, O-LoRA datasets), before any data is read; ValueError names the first unknown
    one without saying which key listed it (the caller's prefix does)."""
    if kind == "synthetic":
        from cl_runner.streams.synthetic import check_synthetic_names

        check_synthetic_names(names)
    elif kind == "trace":
        from cl_runner.streams.trace import _resolve_order

        _resolve_order(names)
    elif kind == "olora":
        from cl_runner.streams.olora import resolve_olora_order

        resolve_olora_order(names)


def build_stream(cfg: Any, model_kind: str, seed: int) -> TaskStream:
    caps = dict(max_train=cfg.max_train_per_task, max_test=cfg.max_test_per_task, seed=seed)
    # A list of task names, or (trace, olora) the name of one of the benchmark's orders.
    order = cfg.order if isinstance(cfg.order, str) else list(cfg.order)
    if isinstance(order, str) and cfg.kind not in ("trace", "olora"):
        raise ValueError(named_order_error(order))
    if cfg.kind == "synthetic":
        from cl_runner.streams.synthetic import load_synthetic

        tasks = load_synthetic(order, cfg.num_digits, cfg.train_size, cfg.test_size, seed)
        if cfg.max_train_per_task or cfg.max_test_per_task:
            for task in tasks:
                task.train = task.train[: cfg.max_train_per_task or None]
                task.test = task.test[: cfg.max_test_per_task or None]
    elif cfg.kind == "trace":
        from cl_runner.streams.trace import load_trace

        tasks = load_trace(cfg.data_dir, order or "default", test_split=cfg.test_split, **caps)
    elif cfg.kind == "olora":
        from cl_runner.streams.olora import load_olora

        if not order:
            raise ValueError("task_stream.order: empty; name one of the benchmark's orders (order1..order6) "
                             "or list the datasets, e.g. task_stream.order=[mnli,cb,rte]")
        template = cfg.template if cfg.template is not None else model_kind != "classifier"
        tasks = load_olora(cfg.data_dir, order, template=template, unknown_labels=cfg.unknown_labels, **caps)
    elif cfg.kind == "custom":
        from cl_runner.streams.custom import load_custom

        tasks = load_custom(list(cfg.tasks), allow_download=cfg.allow_download, **caps)
    else:
        raise ValueError(f"task_stream.kind: unknown kind {cfg.kind!r}")
    if not tasks:
        raise ValueError("task_stream: the stream has no tasks; set task_stream.order")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task_stream.order: task names repeat ({names}); each task may appear once")
    return TaskStream(name=cfg.name, tasks=tasks)


def _monitor_entries(entries: Any) -> tuple[list[str], list[dict]]:
    """evaluation.monitor split into names (tasks of the stream's own format) and task
    entries (custom-stream entries: a file or folder, or a Hugging Face dataset)."""
    names, custom = [], []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            if not entry.strip():
                raise ValueError(f"evaluation.monitor[{i}] is empty; name a task or give a task entry")
            names.append(entry)
        elif hasattr(entry, "keys"):
            custom.append(dict(entry))
        else:
            raise ValueError(f"evaluation.monitor[{i}] is {entry!r}: give a task name (a task of the stream's format, "
                             "e.g. sst-2 for an O-LoRA stream) or a task entry like task_stream.tasks of a custom stream")
    return names, custom


def planned_monitor_names(entries: Any, stream_cfg: Any) -> list[str]:
    """The monitor tasks' names as the config tells (O-LoRA names in lower case, as the
    loader names them); ValueError names the problem (repeats, a task also trained)."""
    from cl_runner.streams.custom import check_entries

    names, custom = _monitor_entries(entries)
    if names and stream_cfg.kind == "custom":
        raise ValueError(f"evaluation.monitor names {names}, but a custom stream has no task registry to take them "
                         "from; give each monitor task as an entry (name, path, ...) like task_stream.tasks")
    if names:
        check_registry_names(names, stream_cfg.kind)
    if stream_cfg.kind == "olora":
        names = [n.lower() for n in names]
    all_names = names + [e["name"] for e in check_entries(custom)] if custom else names
    repeated = sorted({n for n in all_names if all_names.count(n) > 1})
    if repeated:
        raise ValueError(f"evaluation.monitor lists {', '.join(repeated)} twice; each monitor task may appear once")
    trained = planned_task_names(stream_cfg) or []
    if stream_cfg.kind == "olora":  # the loader names O-LoRA tasks in lower case
        trained = [n.lower() for n in trained]
    both = [n for n in all_names if n in trained]
    if both:
        raise ValueError(f"evaluation.monitor: {', '.join(both)} is also a task of the stream (task_stream.order); "
                         "a monitor task is scored but never trained: drop it from evaluation.monitor or from the stream")
    return all_names


def build_monitor(entries: Any, stream_cfg: Any, model_kind: str, seed: int, trained: list[str]) -> list:
    """The monitor tasks (evaluation.monitor): scored after every row of R, never
    trained. Names are loaded like the stream's own tasks (same data_dir, template,
    caps); entries like a custom stream's tasks."""
    from omegaconf import OmegaConf

    names, custom = _monitor_entries(entries)
    tasks = []
    if names:
        node = OmegaConf.merge(OmegaConf.create(OmegaConf.to_container(stream_cfg, resolve=True)), {"order": names})
        try:
            tasks += build_stream(node, model_kind, seed).tasks
        except ValueError as err:  # the loader names task_stream.order, but these came from evaluation.monitor
            message = str(err).removeprefix("task_stream.order: ")
            raise ValueError(message if message.startswith("evaluation.monitor") else
                             f"evaluation.monitor: {message}") from None
    if custom:
        from cl_runner.streams.custom import load_custom

        tasks += load_custom(custom, allow_download=stream_cfg.allow_download, max_train=1,
                             max_test=stream_cfg.max_test_per_task, seed=seed)
    both = [t.name for t in tasks if t.name in trained]
    if both:
        raise ValueError(f"evaluation.monitor: {', '.join(both)} is also a task of the stream; a monitor task is "
                         "scored but never trained: drop it from evaluation.monitor or from the stream")
    return tasks
