"""Soft-prompt runs end to end: the prompts themselves (final_model/soft_prompts.safetensors,
which the conformance suite's weight check does not read) are bit-identical after a
mid-task crash and resume; the backbone never changes; prompt tuning runs under seq_ft;
and each model kind (causal, seq2seq) trains its prompts."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import run_cl, run_until_crash

TINY = ["trainer.steps_per_task=4", "task_stream.train_size=32", "task_stream.test_size=4",
        "task_stream.order=[increment,decrement]", "save_final_model=true", "trainer.lr=0.01",
        "trainer.checkpoint_every_steps=2", "trainer.batch_size=8", "model.prompt.length=2"]


def prompts_of(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final_model" / "soft_prompts.safetensors"))


@pytest.mark.parametrize("strategy", ["l2p", "prog_prompt"])
def test_prompts_resume_bit_identically(strategy, tmp_path, monkeypatch):
    overrides = ["model=tiny_llama", f"strategy={strategy}", *TINY]
    full, full_dir = run_cl(overrides + [f"output_dir={tmp_path / 'full'}"], tmp_path)
    run_until_crash(overrides + [f"output_dir={tmp_path / 'stopped'}"], tmp_path, 5, monkeypatch)  # task 2, step 1
    resumed, resumed_dir = run_cl([f"resume={tmp_path / 'stopped'}"], tmp_path)
    assert resumed["R"] == full["R"]
    a, b = prompts_of(full_dir), prompts_of(resumed_dir)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("model,strategy", [("tiny_t5", "prog_prompt"), ("tiny_llama", "seq_ft")])
def test_prompts_train_and_the_backbone_stays(model, strategy, tmp_path):
    from cl_runner.config.validate import validate
    from cl_runner.models.build import build_model
    from tests.helpers import compose

    overrides = [f"model={model}", f"strategy={strategy}", *TINY]
    metrics, run_dir = run_cl(overrides + [f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert all(v is not None for row in metrics["R"] for v in row)
    from safetensors.torch import load_file

    backbone = load_file(str(run_dir / "final_model" / "model.safetensors"))
    cfg = validate(compose(overrides))
    torch.manual_seed(cfg.seed)  # the run builds its model right after set_seed(seed)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    from cl_runner.strategies import build_strategy

    strategy = build_strategy(cfg)
    start = build_model(cfg.model, None, None, seed=cfg.seed,
                        prompt_source=lambda maker: strategy.prompt_source(maker, 2)).model
    initial = {k[len("backbone."):]: v for k, v in start.state_dict().items() if k.startswith("backbone.")}
    shared = [k for k in backbone if k in initial]
    assert shared and all(torch.equal(backbone[k], initial[k]) for k in shared)  # frozen: unchanged
    prompts = prompts_of(run_dir)
    moved = [k for k, v in prompts.items() if not torch.equal(v, start.state_dict()[k])]
    assert moved, "the prompts did not train"
