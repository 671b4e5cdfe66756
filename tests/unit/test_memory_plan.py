"""`cl-run dry_run=true`'s memory plan ("will it fit"): numbers checked by hand on a tiny
LLaMA, the strategy state against what the strategy code really allocates, the shipped
7B config's size, and the plan printed by a dry run."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from cl_runner.strategies.svd_orthogonal.groups import ProjectionGroups
from cl_runner.errors import ConfigError
from cl_runner.config.validate import validate
from cl_runner.memory_plan import activation_bytes, build_plan, format_plan, model_facts
from cl_runner.strategies.memory import ModelFacts
from cl_runner.strategies.svd_orthogonal.memory import svd_sharded_bytes, svd_target_bytes
from tests.helpers import compose

# tiny_llama (configs/model/tiny_llama.yaml) with the byte tokenizer (259 ids): hidden 64,
# MLP 172, 2 blocks, untied head.
VOCAB, H, I, BLOCKS = 259, 64, 172, 2
BLOCK = 4 * H * H + 3 * H * I + 2 * H  # q, k, v, o; gate, up, down; two RMSNorms
TINY_LLAMA_PARAMS = VOCAB * H + BLOCKS * BLOCK + H + VOCAB * H  # embedding, blocks, final norm, head


def cfg_for(*overrides: str):
    return validate(compose(["logger=none", *overrides]))


@pytest.fixture(autouse=True)
def _no_launcher_world(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


@pytest.fixture(scope="module")
def tiny_facts() -> ModelFacts:
    return model_facts(cfg_for("model=tiny_llama").model)


def test_tiny_llama_parameters_gradients_and_adamw_by_hand(tiny_facts):
    assert TINY_LLAMA_PARAMS == 132_288
    assert tiny_facts.params == TINY_LLAMA_PARAMS
    assert (tiny_facts.hidden, tiny_facts.blocks, tiny_facts.vocab) == (H, BLOCKS, VOCAB)
    plan = build_plan(cfg_for("model=tiny_llama"), world_size=1, sharding="none", facts=tiny_facts)
    assert plan.row("parameters").per_rank_bytes == TINY_LLAMA_PARAMS * 4
    assert plan.row("gradients").per_rank_bytes == TINY_LLAMA_PARAMS * 4
    assert plan.row("optimizer state").per_rank_bytes == TINY_LLAMA_PARAMS * 8  # two fp32 moments
    assert plan.row("strategy state").per_rank_bytes == 0  # seq_ft
    # tiny_llama: h 64, kv 64, gated MLP of 172: 8 x 64 + 2 x 64 + 4 x 172 values per token and block
    assert plan.row("activations").per_rank_bytes == activation_bytes(64, 64, H, BLOCKS, VOCAB, 4, False,
                                                                       values_per_token=8 * 64 + 2 * 64 + 4 * 172)
    assert plan.per_rank_total == sum(r.per_rank_bytes for r in plan.rows)
    assert "DDP gradient buckets" not in [r.name for r in plan.rows]  # one process: no DDP


def test_fsdp_divides_the_state_by_world_size_and_none_does_not(tiny_facts):
    cfg = cfg_for("model=tiny_llama", "strategy=ewc")
    fsdp = build_plan(cfg, world_size=4, sharding="fsdp", facts=tiny_facts)
    ddp = build_plan(cfg, world_size=4, sharding="none", facts=tiny_facts)
    P = TINY_LLAMA_PARAMS
    for name, full in (("parameters", 4 * P), ("gradients", 4 * P), ("optimizer state", 8 * P),
                       ("strategy state", 2 * 4 * P)):  # EWC online: Fisher + anchor in fp32
        assert fsdp.row(name).unsharded_bytes == ddp.row(name).unsharded_bytes == full
        assert fsdp.row(name).per_rank_bytes == math.ceil(full / 4), name
        assert ddp.row(name).per_rank_bytes == full, name
    assert ddp.row("DDP gradient buckets").per_rank_bytes == 4 * P
    assert fsdp.row("activations").per_rank_bytes == ddp.row("activations").per_rank_bytes  # per rank either way
    assert fsdp.row("FSDP gathered units").per_rank_bytes > 0


def test_ewc_separate_keeps_one_pair_per_past_task(tiny_facts):
    cfg = cfg_for("model=tiny_llama", "strategy=ewc", "strategy.mode=separate")  # the synthetic stream: 3 tasks
    plan = build_plan(cfg, world_size=1, sharding="none", facts=tiny_facts)
    assert plan.row("strategy state").per_rank_bytes == 2 * (2 * 4 * TINY_LLAMA_PARAMS)


def test_svd_bases_and_anchors_by_hand():
    # k=16 of 64: U (64x16) and V (64x16) stored as they are; anchors Uᵀ W (16x64) and W V (64x16), fp32.
    assert svd_target_bytes(64, 64, 16) == ((64 * 16 + 64 * 16) * 4, (16 * 64 + 64 * 16) * 4)
    # k=48 > 64/2: each side through its 16-column complement, and a dense anchor in the weights' dtype.
    assert svd_target_bytes(64, 64, 48, param_bytes=2) == ((64 * 16 + 64 * 16) * 4, 64 * 64 * 2)
    # high_block keeps the k x k core; bf16 bases halve the bases.
    assert svd_target_bytes(64, 172, 16, "high_block", basis_bytes=2) == ((64 * 16 + 172 * 16) * 2, 16 * 16 * 4)


@pytest.mark.parametrize("m, n, k, mode", [(64, 64, 16, "two_sided"), (64, 64, 48, "two_sided"),
                                           (172, 64, 20, "two_sided"), (172, 64, 40, "two_sided"),
                                           (64, 172, 40, "high_block"), (64, 64, 0, "two_sided")])
def test_svd_target_bytes_match_projection_groups(m, n, k, mode):
    from cl_runner import ops

    w = torch.randn(m, n)
    groups = ProjectionGroups([("w", w)], mode=mode, basis_dtype=torch.float32)
    (u, v), = ops.top_k_bases([w], [k], out_dtype=torch.float32)
    groups.set_bases({"w": (u, v)})
    groups.snapshot_weights()
    assert groups.nbytes() == sum(svd_target_bytes(m, n, k, mode))


@pytest.mark.parametrize("unfreeze", [0.75, 0.25])
def test_svd_orthogonal_state_matches_the_strategy(tiny_facts, unfreeze):
    """The plan's svd_orthogonal state equals what the strategy holds after its first
    task start on the real tiny LLaMA (ratio mode: k = floor(64 (1 - unfreeze)))."""
    from accelerate import Accelerator

    from cl_runner.models.build import build_model
    from cl_runner.strategies.base import StrategyContext
    from cl_runner.strategies.svd_orthogonal import SVDOrthogonal

    # first_task=constrained: the bases exist at the first task start (with the default,
    # full, they appear from the second task on; the plan counts that peak either way).
    cfg = cfg_for("model=tiny_llama", "strategy=svd_orthogonal", "strategy.rank.mode=ratio",
                  f"strategy.rank.unfreeze_ratio={unfreeze}", "strategy.first_task=constrained")
    plan = build_plan(cfg, world_size=1, sharding="none", facts=tiny_facts)
    k = math.floor(64 * (1 - unfreeze))
    per_block = 4 * sum(svd_target_bytes(H, H, k)) + sum(svd_target_bytes(I, H, k)) * 2 \
        + sum(svd_target_bytes(H, I, k))
    assert plan.row("strategy state").per_rank_bytes == BLOCKS * per_block
    if unfreeze == 0.75:  # k = 16: every side a basis, factored anchors
        assert BLOCKS * per_block == 312_320

    model = build_model(cfg.model).model
    strategy = SVDOrthogonal(cfg.strategy)
    strategy.setup(StrategyContext(accelerator=Accelerator(cpu=True), model=model, stream=None, model_kind="causal",
                                   model_family="llama", seed=0, trainer=cfg.trainer, loss_fn=None, collate=None))
    strategy.before_task(0, SimpleNamespace(name="t0"))
    assert strategy.extra_state_bytes() == plan.row("strategy state").per_rank_bytes


@pytest.mark.parametrize("unfreeze, projection", [(0.25, "two_sided"), (0.75, "two_sided"), (0.25, "high_block")])
def test_svd_sharded_state_matches_sharded_subspaces(tiny_facts, unfreeze, projection):
    """Under trainer.sharding=fsdp the plan counts strategies/svd_orthogonal/sharded.ShardedSubspaces
    (bases only, no anchors): its bytes on a real FSDP2-sharded tiny LLaMA in a one-process
    gloo group, after set_bases_from_weights with the ratio-mode ranks."""
    import torch.distributed as dist

    from cl_runner.models.build import build_model
    from cl_runner.distributed.sharding import shard_model
    from cl_runner.strategies.base import plain_config
    from cl_runner.strategies.svd_orthogonal.rank import ratio_ranks
    from cl_runner.strategies.svd_orthogonal.sharded import ShardedSubspaces
    from cl_runner.strategies.svd_orthogonal.targets import find_targets

    cfg = cfg_for("model=tiny_llama", "strategy=svd_orthogonal", "strategy.rank.mode=ratio",
                  f"strategy.rank.unfreeze_ratio={unfreeze}", f"strategy.projection={projection}",
                  "trainer.sharding=fsdp")
    plan = build_plan(cfg, world_size=1, facts=tiny_facts)
    state = plan.row("strategy state")
    assert plan.sharding == "fsdp" and "ShardedSubspaces" in state.note
    unsharded = build_plan(cfg, world_size=1, sharding="none", facts=tiny_facts).row("strategy state")
    assert "ProjectionGroups" in unsharded.note and state.per_rank_bytes < unsharded.per_rank_bytes  # no anchors

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = shard_model(build_model(cfg.model).model, cfg.trainer)
        targets = find_targets(model, "llama", plain_config(cfg.strategy.targets) or {})
        assert len(targets) == 7 * BLOCKS
        sharded = ShardedSubspaces([(t.name, t.param) for t in targets], projection, torch.float32,
                                   cfg.strategy.sharded_bucket_mb)

        def decompose(w, k, i):
            u, _, vh = torch.linalg.svd(w, full_matrices=False)
            return u[:, :k], vh[:k].T

        ks = ratio_ranks([t.rank_dim for t in targets], 1 - unfreeze)
        assert sharded.set_bases_from_weights(ks, decompose) == [(k, k) for k in ks]
        assert sharded.nbytes() == state.per_rank_bytes == state.unsharded_bytes
        shapes = [t.shape for t in targets]
        assert len(sharded._buckets()) == svd_sharded_bytes(shapes, ks, 1, projection)[3] == 1
        sharded.bucket_bytes = int(0.01 * 2 ** 20)  # the plan packs buckets as ShardedSubspaces does
        assert [len(b) for b in sharded._buckets()] == [1] * len(targets)
        assert svd_sharded_bytes(shapes, ks, 1, projection, bucket_mb=0.01)[3] == len(targets)
    finally:
        dist.destroy_process_group()


def test_svd_sharded_plan_at_world_8_by_hand(tiny_facts):
    """Row chunks of ceil(dim / 8): 64 rows -> 8, 172 rows -> 22 (rank 0's share). k = 48 of
    64: the 64-row sides through their 16-column complement, the 172-row sides as the
    48-column basis (2 x 48 <= 172)."""
    cfg = cfg_for("model=tiny_llama", "strategy=svd_orthogonal", "strategy.rank.mode=ratio",
                  "strategy.rank.unfreeze_ratio=0.25")
    plan = build_plan(cfg, world_size=8, sharding="fsdp", facts=tiny_facts)
    c64, c172 = math.ceil(64 / 8), math.ceil(172 / 8)
    assert (c64, c172) == (8, 22)
    attn = c64 * 16 + c64 * 16  # q, k, v, o (64 x 64): left and right complements
    up = c172 * 48 + c64 * 16  # gate, up (172 x 64): left basis, right complement
    down = c64 * 16 + c172 * 48  # down (64 x 172): left complement, right basis
    bases = BLOCKS * (4 * attn + 2 * up + down) * 4
    assert bases == 36_608
    state = plan.row("strategy state")
    assert state.per_rank_bytes == bases
    assert state.unsharded_bytes == BLOCKS * (4 * 2 * 64 * 16 + 3 * (172 * 48 + 64 * 16)) * 4  # world 1
    # Working set: the whole model is one 256 MiB bucket: gathered right sides (n x width),
    # products (left width x n), fp32 work rows (ceil(m/8) x n); plus W_before (fp32 weights here).
    bucket = BLOCKS * (4 * (64 * 16 + 16 * 64 + c64 * 64) + 2 * (64 * 16 + 48 * 64 + c172 * 64)
                       + (172 * 48 + 16 * 172 + c64 * 172)) * 4
    before = BLOCKS * (4 * c64 * 64 + 2 * c172 * 64 + c64 * 172) * 4
    assert plan.row("strategy working set").per_rank_bytes == bucket + before == 318_976
    # One target per bucket (each costs > half of 0.01 MiB): the largest is a down projection's.
    small = build_plan(cfg_for("model=tiny_llama", "strategy=svd_orthogonal", "strategy.rank.mode=ratio",
                               "strategy.rank.unfreeze_ratio=0.25", "strategy.sharded_bucket_mb=0.01"),
                       world_size=8, sharding="fsdp", facts=tiny_facts)
    assert small.row("strategy working set").per_rank_bytes == (172 * 48 + 16 * 172 + c64 * 172) * 4 + before
    assert "of 14 projection buckets" in small.row("strategy working set").note
    # LiNeS beside it: its fp32 reference split evenly on top of the sharded bases.
    lines = build_plan(cfg_for("model=tiny_llama", "strategy=svd_orthogonal", "strategy.rank.mode=ratio",
                               "strategy.rank.unfreeze_ratio=0.25", "lines.enabled=true"),
                       world_size=8, sharding="fsdp", facts=tiny_facts)
    assert lines.row("strategy state").per_rank_bytes == bases + math.ceil(4 * TINY_LLAMA_PARAMS / 8)
    # trainer.sharding=none: the unsharded implementation, unchanged (bases + anchors on every rank).
    ddp = build_plan(cfg, world_size=8, sharding="none", facts=tiny_facts)
    assert ddp.row("strategy state").per_rank_bytes == build_plan(cfg, world_size=1, sharding="none",
                                                                  facts=tiny_facts).row("strategy state").per_rank_bytes


def test_freezing_strategies_shrink_gradients_and_optimizer(tiny_facts):
    plan = build_plan(cfg_for("model=tiny_llama", "strategy=svd_orthogonal", "strategy.freeze_untargeted=true"),
                      world_size=1, sharding="none", facts=tiny_facts)
    targets = BLOCKS * (4 * H * H + 3 * H * I)
    assert plan.trainable_params == targets
    assert plan.row("optimizer state").per_rank_bytes == 8 * targets
    hft = build_plan(cfg_for("model=tiny_llama", "strategy=hft"), world_size=1, sharding="none", facts=tiny_facts)
    assert TINY_LLAMA_PARAMS - BLOCKS * BLOCK < hft.trainable_params < TINY_LLAMA_PARAMS


def test_classp_and_lines(tiny_facts):
    plan = build_plan(cfg_for("model=tiny_llama", "strategy=classp", "lines.enabled=true"), world_size=1,
                      sharding="none", facts=tiny_facts)
    assert plan.row("optimizer state").per_rank_bytes == 4 * TINY_LLAMA_PARAMS  # one fp32 accumulator
    assert plan.row("strategy state").per_rank_bytes == 4 * TINY_LLAMA_PARAMS  # LiNeS' fp32 reference


def test_verdict_and_world_size_from_the_environment(tiny_facts, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    plan = build_plan(cfg_for("model=tiny_llama", "plan_gpu_memory_gb=1"), facts=tiny_facts)
    assert plan.world_size == 3 and plan.fits
    assert plan.verdict().startswith("fits on 3 x 1 GB")
    small = build_plan(cfg_for("model=tiny_llama", "plan_world_size=2", "plan_gpu_memory_gb=0.001"), facts=tiny_facts)
    assert small.world_size == 2 and not small.fits
    assert small.verdict().startswith("does not fit on 2 x 0.001 GB")
    with pytest.raises(ConfigError, match="plan_world_size"):
        build_plan(cfg_for("model=tiny_llama", "plan_world_size=0"), facts=tiny_facts)


def test_llama2_7b_from_the_shipped_config_offline():
    facts = model_facts(cfg_for("model=llama2_7b_chat").model)
    assert facts.source == "model.architecture_config"
    assert abs(facts.params - 6.74e9) / 6.74e9 < 0.01
    assert next(facts.model.parameters()).device.type == "meta"


def test_pretrained_model_still_loads_from_its_path_only(tmp_path):
    """architecture_config on a pretrained model is for the plan: loading ignores it."""
    from cl_runner.models.build import ModelLoadError, build_model

    cfg = cfg_for("model=llama2_7b_chat", f"model.path={tmp_path / 'missing'}")
    with pytest.raises(ModelLoadError, match="missing"):
        build_model(cfg.model)


def test_dry_run_prints_the_plan(capsys, tmp_path, monkeypatch):
    from cl_runner.cli import execute
    from cl_runner.config.schema import TrainerConfig

    # trainer.sharding comes with FSDP support; without it the plan is the unsharded one.
    fsdp = "sharding" in TrainerConfig.__dataclass_fields__
    monkeypatch.chdir(tmp_path)
    out = execute(compose(["logger=none", "dry_run=true", "model=llama2_7b_chat", "trainer.precision=bf16",
                           *(["trainer.sharding=fsdp"] if fsdp else []), "plan_world_size=8",
                           "plan_gpu_memory_gb=80", "strategy=svd_orthogonal"]))
    printed = capsys.readouterr().out
    assert "name: svd_orthogonal" in printed  # the config first
    assert "Memory plan" in printed and "per rank" in printed and "verdict:" in printed
    plan = out["memory_plan"]
    assert plan["world_size"] == 8 and plan["sharding"] == ("fsdp" if fsdp else "none")
    params = next(r for r in plan["rows"] if r["name"] == "parameters")
    assert params["per_rank_bytes"] == math.ceil(plan["params"] * 2 / (8 if fsdp else 1))  # bfloat16
    assert not (tmp_path / "results").exists()


def test_dry_run_without_model_sizes_says_why_and_still_succeeds(capsys, tmp_path, monkeypatch):
    from cl_runner.cli import execute

    monkeypatch.chdir(tmp_path)
    execute(compose(["logger=none", "dry_run=true", "model=llama2_7b_chat", "model.architecture=null",
                     "model.path=no-org/no-such-model"]))
    assert "Memory plan: not available" in capsys.readouterr().out


def test_format_plan_has_a_total(tiny_facts):
    text = format_plan(build_plan(cfg_for("model=tiny_llama"), facts=tiny_facts))
    assert "total per rank" in text and "activations (rough est.)" in text


def test_infinite_schedule_counts_the_anneal_copies():
    """The anneal steps a copy of the optimizer state next to a spare copy of the weights."""
    from cl_runner.config.validate import validate
    from cl_runner.memory_plan import build_plan
    from tests.helpers import compose

    base = ["model=tiny_llama", "lr_schedule.enabled=true"]
    plain = build_plan(validate(compose(base)))
    infinite = build_plan(validate(compose(base + ["lr_schedule.curve=infinite"])))
    rows = {r.name: r for r in infinite.rows}
    optimizer = rows["optimizer state"].per_rank_bytes
    parameters = rows["parameters"].per_rank_bytes
    assert rows["anneal copies (infinite schedule)"].per_rank_bytes == optimizer + parameters
    assert infinite.per_rank_total - plain.per_rank_total == optimizer + parameters
    on_cpu = build_plan(validate(compose(base + ["lr_schedule.curve=infinite", "lr_schedule.backup_on_cpu=true"])))
    assert {r.name: r for r in on_cpu.rows}["anneal copies (infinite schedule)"].per_rank_bytes == optimizer


def test_activation_values_per_token_by_hand():
    from types import SimpleNamespace

    from cl_runner.memory_plan import activation_values_per_token

    # A GPT block (MLP 4h, GeLU, no gate, kv = h): 6h norms + 2h attention + 2h k/v + 2 x 4h MLP = 18h.
    gpt = SimpleNamespace(hidden=100, kv_dim=0, intermediate=0, gated_mlp=False)
    assert activation_values_per_token(gpt) == 18 * 100
    # A LLaMA block with grouped k/v (kv 32) and a gated MLP of 270: 8h + 2 x 32 + 4 x 270.
    llama = SimpleNamespace(hidden=100, kv_dim=32, intermediate=270, gated_mlp=True)
    assert activation_values_per_token(llama) == 800 + 64 + 1080
