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
