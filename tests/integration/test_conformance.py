"""Conformance tests generated from the strategy registry: every registered base strategy,
and every add-on on seq_ft, gets each check below without any list to edit. A new module
in cl_runner/strategies/ that calls @register is tested here the moment it exists
(`test_a_new_strategy_module_joins_the_suite` proves it with a throw-away strategy).

Per case, on tiny_llama (2 tasks x 6 steps, global batch 16, a checkpoint every 2 steps):
- end to end: R filled, the run's label and members as the registry says;
- a run stopped mid-task and resumed gives bit-identical R and final weights;
- the memory plan names its state, and counts some where the run kept some;
- 2 processes (DDP) give the 1-process run: the same R, weights equal up to float
  reduction order (or the registration's one-line `multiprocess` reason);
- 2 FSDP2-sharded processes likewise, or the registration's one-line `sharding` refusal;
- model.adapter=lora runs end to end, or the registration's one-line `adapters` refusal;
- an unknown option exits 2 with one line naming the key.
The multi-process runs of every case share one torchrun launch per mode
(tests/helpers/batch_runs.py); the 1-process run of a case is shared by every check.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cl_runner.strategies import registry
from tests.helpers import REPO, compose, run_cl, run_until_crash

TINY = ["model=tiny_llama", "trainer.steps_per_task=6", "task_stream.train_size=64", "task_stream.test_size=10",
        "task_stream.order=[increment,decrement]", "save_final_model=true", "trainer.lr=0.003",
        "trainer.checkpoint_every_steps=2"]
GLOBAL_BATCH = 16


def registered_cases() -> dict[str, tuple[registry.Registration, list[str]]]:
    """case id -> (registration, overrides): each base strategy, each add-on on seq_ft."""
    cases = {name: (reg, list(reg.overrides)) for name, reg in sorted(registry.registrations(registry.BASE).items())}
    for name, reg in registry.registrations(registry.ADDON).items():
        cases[f"seq_ft+{name}"] = (reg, ["strategy=seq_ft", *reg.overrides])
    return cases


CASES = registered_cases()
# Settings the registry's examples do not reach, run in the same multi-process launches.
EXTRA_MULTIPROCESS = {
    "ewc_sampled_fisher": (["strategy=ewc", "strategy.fisher=sampled"], ("ddp",)),
    "svd_frozen+replay": (["strategy=svd_orthogonal", "strategy.freeze_untargeted=true", "replay.enabled=true"],
                          ("ddp",)),
    # The anneal takes the global batch in lock-step like training; annealed weights are kept.
    "hft+infinite_annealed": (["strategy=hft", "lr_schedule.enabled=true", "lr_schedule.curve=infinite",
                               "lr_schedule.anneal_steps=2", "lr_schedule.resume_from=annealed"], ("ddp", "fsdp")),
    # svd_method=auto under DDP: rank 0's timings decide for every rank (tolerance 0 makes the
    # choice exact everywhere, so the 1-process run, timed on its own, chooses the same).
    "svd_auto": (["strategy=svd_orthogonal", "strategy.svd_method=auto", "strategy.svd_oversample=2",
                  "strategy.svd_auto_tolerance=0"], ("ddp",)),
    # LoRA dropout off, like the model's: one process draws other masks than two would.
    "seq_ft_lora": (["model.adapter=lora", "model.lora.dropout=0"], ("ddp",)),
    "classp_quantile": (["strategy=classp", "strategy.threshold_mode=quantile", "strategy.update_fraction=0.2",
                         "strategy.sum_includes_current=true", "strategy.alpha=0.01"], ("fsdp",)),
    "replay+infinite": (["replay.enabled=true", "replay.ratio=0.25", "lr_schedule.enabled=true",
                         "lr_schedule.curve=infinite", "lr_schedule.anneal_steps=2"], ("fsdp",)),
}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final_model" / "model.safetensors"))


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 5e-3) -> None:
    assert a.keys() == b.keys()
    for name, weight in b.items():
        # Adam's first steps are ~lr * sign(g): float reduction order moves near-zero
        # gradients, so the weights agree to ~1e-4 relative, not bit for bit.
        gap = (a[name].float() - weight.float()).norm() / (weight.float().norm() + 1e-12)
        assert gap < tol, (name, float(gap))


# ----------------------------------------------------------------- shared runs
_ONE_PROCESS: dict[str, tuple[dict, Path]] = {}


def one_process_run(case: str, overrides: list[str], tmp_path_factory) -> tuple[dict, Path]:
    """The case's 1-process run at the global batch, made once and shared by every check."""
    if case not in _ONE_PROCESS:
        work = tmp_path_factory.mktemp(f"one_{case}")
        _ONE_PROCESS[case] = run_cl(TINY + overrides + [f"trainer.batch_size={GLOBAL_BATCH}",
                                                        f"output_dir={work / 'run'}"], work)
    return _ONE_PROCESS[case]


def launch_batch(mode: str, tmp_path_factory) -> Path:
    """Every case of `mode` (ddp | fsdp) in one 2-process torchrun; returns the folder
    holding each case's run and status."""
    cases = {}
    for case, (reg, overrides) in CASES.items():
        if reg.multiprocess or (mode == "fsdp" and reg.sharding):
            continue
        cases[case] = overrides
    for case, (overrides, modes) in EXTRA_MULTIPROCESS.items():
        if mode in modes:
            cases[case] = overrides
    extra = ["trainer.sharding=fsdp"] if mode == "fsdp" else []
    work = tmp_path_factory.mktemp(f"batch_{mode}")
    spec = work / "cases.json"
    spec.write_text(json.dumps({c: TINY + o + extra + [f"trainer.batch_size={GLOBAL_BATCH // 2}"]
                                for c, o in cases.items()}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.helpers.batch_runs", str(spec), str(work)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1200)
    (work / "launch.log").write_text(done.stdout[-20000:] + "\n--- stderr ---\n" + done.stderr[-20000:])
    return work


@pytest.fixture(scope="module")
def ddp_batch(tmp_path_factory):
    return launch_batch("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp_batch(tmp_path_factory):
    return launch_batch("fsdp", tmp_path_factory)


def batch_result(batch: Path, case: str) -> tuple[dict, Path]:
    status_file = batch / f"{case}.status.json"
    log = (batch / "launch.log").read_text()[-4000:] if (batch / "launch.log").exists() else ""
    assert status_file.exists(), f"the launch never finished case {case}:\n{log}"
    status = json.loads(status_file.read_text())
    assert status["ok"], status.get("traceback") or status
    return json.loads((batch / case / "metrics.json").read_text()), batch / case


def tensor_state(overrides: list[str]) -> bool:
    """Whether the plan puts the case's state on the device (not in host memory)."""
    from cl_runner.config.validate import validate
    from cl_runner.memory_plan import build_plan

    plan = build_plan(validate(compose(TINY + overrides)))
    return any(r.unsharded_bytes for r in plan.rows if r.name.startswith("strategy state"))


# ----------------------------------------------------------------- the checks
@pytest.mark.parametrize("case", list(CASES))
def test_runs_end_to_end_and_resumes_mid_task_bit_identically(case, tmp_path, tmp_path_factory, monkeypatch):
    reg, overrides = CASES[case]
    full, full_dir = one_process_run(case, overrides, tmp_path_factory)
    assert len(full["R"]) == 3 and all(v is not None for row in full["R"] for v in row)
    assert full["strategy_members"].split("+")[0] == overrides[0].split("=")[1]
    if reg.kind == registry.ADDON:
        assert reg.name in full["strategy_members"].split("+")

    stop_at = full["optimizer_steps"] // 2 + 1  # inside the second task, past a mid-task checkpoint
    stopped = TINY + overrides + [f"trainer.batch_size={GLOBAL_BATCH}", f"output_dir={tmp_path / 'stopped'}"]
    run_until_crash(stopped, tmp_path, stop_at, monkeypatch)
    resumed, resumed_dir = run_cl([f"resume={tmp_path / 'stopped'}"], tmp_path)
    assert resumed["R"] == full["R"]
    a, b = final_weights(full_dir), final_weights(resumed_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.parametrize("case", list(CASES))
def test_memory_plan_names_and_counts_its_state(case, tmp_path_factory):
    from cl_runner.config.validate import validate
    from cl_runner.memory_plan import build_plan

    reg, overrides = CASES[case]
    plan = build_plan(validate(compose(TINY + overrides)))
    state = next(r for r in plan.rows if r.name.startswith("strategy state"))
    assert reg.name in state.name and f"{reg.name}:" in state.note, state  # it names its own state
    planned = sum(r.unsharded_bytes for r in plan.rows if r.name.startswith(("strategy", "anneal")))
    host = [a for a in plan.assumptions if "in host memory" in a]
    full, _ = one_process_run(case, overrides, tmp_path_factory)
    if full["strategy_extra_bytes"] > 0:  # what the run measured it kept: the plan counts some, somewhere
        assert planned > 0 or host, (full["strategy_extra_bytes"], state, plan.assumptions)


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one(case, ddp_batch, tmp_path_factory):
    reg, overrides = CASES[case]
    if reg.multiprocess:
        pytest.skip(f"{reg.name}: {reg.multiprocess}")
    two, two_dir = batch_result(ddp_batch, case)
    one, one_dir = one_process_run(case, overrides, tmp_path_factory)
    assert two["distributed"] == {"world_size": 2, "sharding": "none"}
    assert two["R"] == one["R"]
    assert two["train_tokens"] == one["train_tokens"], "tokens are summed over ranks"
    for k in (1, 2):  # every rank's predictions gathered into rank 0's file
        assert len((two_dir / "predictions" / f"task_{k}_after_2.jsonl").read_text().splitlines()) == 10
    assert_close_weights(final_weights(two_dir), final_weights(one_dir))


@pytest.mark.parametrize("case", list(CASES))
def test_two_sharded_processes_match_one_or_refuse(case, fsdp_batch, tmp_path_factory):
    from cl_runner.strategies import build_strategy

    from cl_runner.config.validate import validate

    reg, overrides = CASES[case]
    if reg.sharding:  # refused in one line before anything is built: by the registration, or by the
        # run config's own rules first (adapters are refused under fsdp for every strategy)
        with pytest.raises(ValueError) as refused:
            build_strategy(validate(compose(TINY + overrides + ["trainer.sharding=fsdp"])))
        message = str(refused.value)
        assert "\n" not in message and "trainer.sharding=fsdp" in message and "trainer.sharding=none" in message
        assert reg.sharding in message or message.startswith("model.adapter="), message
        return
    if reg.multiprocess:
        pytest.skip(f"{reg.name}: {reg.multiprocess}")
    two, two_dir = batch_result(fsdp_batch, case)
    one, one_dir = one_process_run(case, overrides, tmp_path_factory)
    assert two["distributed"] == {"world_size": 2, "sharding": "fsdp"}
    assert two["R"] == one["R"]
    assert_close_weights(final_weights(two_dir), final_weights(one_dir))
    if one["strategy_extra_bytes"] and tensor_state(overrides):  # sharded like the parameters: about half per rank
        assert two["strategy_extra_bytes"] <= 0.55 * one["strategy_extra_bytes"], (
            two["strategy_extra_bytes"], one["strategy_extra_bytes"])


@pytest.mark.parametrize("case", [c for c, (_, modes) in EXTRA_MULTIPROCESS.items() if "ddp" in modes])
def test_more_settings_two_processes_match_one(case, ddp_batch, tmp_path_factory):
    two, two_dir = batch_result(ddp_batch, case)
    one, one_dir = one_process_run(case, EXTRA_MULTIPROCESS[case][0], tmp_path_factory)
    assert two["R"] == one["R"]
    assert_close_weights(final_weights(two_dir), final_weights(one_dir))


@pytest.mark.parametrize("case", [c for c, (_, modes) in EXTRA_MULTIPROCESS.items() if "fsdp" in modes])
def test_more_settings_two_sharded_processes_match_one(case, fsdp_batch, tmp_path_factory):
    two, two_dir = batch_result(fsdp_batch, case)
    one, one_dir = one_process_run(case, EXTRA_MULTIPROCESS[case][0], tmp_path_factory)
    assert two["R"] == one["R"]
    assert_close_weights(final_weights(two_dir), final_weights(one_dir))


@pytest.mark.parametrize("case", list(CASES))
def test_lora_adapters_run_or_are_refused_in_one_line(case, tmp_path, monkeypatch, capsys):
    from tests.integration.test_cli_bad_input import assert_one_line_error, cl_main, no_run_folder

    reg, overrides = CASES[case]
    lora = ["model=tiny_llama", "task_stream.train_size=32", "task_stream.test_size=4", "trainer.steps_per_task=2",
            "task_stream.order=[increment,decrement]", *overrides, "model.adapter=lora"]
    code, out, err = cl_main(lora + [f"output_dir={tmp_path / 'run'}"], tmp_path, monkeypatch, capsys)
    if reg.adapters:
        assert_one_line_error(code, err, f"cannot run with model.adapter=lora: {reg.adapters}",
                              prefix="cl-run: config error:")
        assert no_run_folder(tmp_path) and not (tmp_path / "run").exists()
        return
    assert code == 0, err[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["adapter"] and metrics["adapter"]["adapter_parameters"] > 0
    assert all(v is not None for row in metrics["R"] for v in row)


@pytest.mark.parametrize("case", list(CASES))
def test_an_unknown_option_exits_2_naming_the_key(case, tmp_path, monkeypatch, capsys):
    from tests.integration.test_cli_bad_input import assert_one_line_error, cl_main, no_run_folder

    reg, overrides = CASES[case]
    key = f"{'strategy' if reg.kind == registry.BASE else reg.name}.no_such_option"
    code, _, err = cl_main([*overrides, f"+{key}=1"], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, f"'{key}'", prefix="cl-run: config error:")
    assert no_run_folder(tmp_path)


def test_every_registration_says_what_it_does_and_is_labelled_in_order():
    regs = registry.registrations()
    assert regs, "no strategy registered"
    for reg in regs.values():
        assert reg.summary and "\n" not in reg.summary, reg.name
        key = "name" if reg.kind == registry.BASE else "enabled"  # an add-on's node switches it on
        assert key in reg.config.__dataclass_fields__, reg.name
        if reg.kind == registry.BASE:
            assert reg.config.__dataclass_fields__["name"].default == reg.name, reg.name
    orders = [r.order for r in registry.addons()]
    assert orders == sorted(orders) and len(set(orders)) == len(orders), "add-ons need distinct orders"


def test_a_new_strategy_module_joins_the_suite(tmp_path):
    """Drop a throw-away strategy module into cl_runner/strategies/: the conformance IDs
    name it, with no test edited."""
    probe = REPO / "cl_runner" / "strategies" / "zz_conformance_probe.py"
    probe.write_text(
        "from dataclasses import dataclass\n"
        "from cl_runner.strategies.registry import register\n"
        "from cl_runner.strategies.seq_ft import SequentialFineTuning\n\n\n"
        "@dataclass\nclass ProbeConfig:\n    name: str = 'zz_conformance_probe'\n\n\n"
        "@register('zz_conformance_probe', config=ProbeConfig, summary='a throw-away strategy')\n"
        "class Probe(SequentialFineTuning):\n    pass\n")
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        listed = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 str(Path(__file__))], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        probe.unlink()
    ids = [line for line in listed.stdout.splitlines() if "zz_conformance_probe" in line]
    for check in ("test_runs_end_to_end_and_resumes_mid_task_bit_identically", "test_two_processes_match_one",
                  "test_two_sharded_processes_match_one_or_refuse", "test_memory_plan_names_and_counts_its_state",
                  "test_lora_adapters_run_or_are_refused_in_one_line", "test_an_unknown_option_exits_2_naming_the_key"):
        assert any(f"{check}[zz_conformance_probe]" in i for i in ids), (check, listed.stdout[-2000:])
