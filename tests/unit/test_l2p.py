"""L2P on hand vectors: the query, the top-k choice by cosine similarity, the pull term
and its direction, the pool's concatenation order, the strategy's loss term and options."""
from __future__ import annotations

import math
import types

import pytest
import torch

from cl_runner.strategies.l2p import L2PConfig, LearningToPrompt
from cl_runner.strategies.parts.prompt_sources import PromptPool, mean_query, pull_loss, select_top_k

pytestmark = pytest.mark.usefixtures("one_thread")

KEYS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])


def test_top_k_by_cosine_most_similar_first():
    query = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    chosen, similarity = select_top_k(query, KEYS, 2)
    s = 1 / math.sqrt(2)
    assert torch.allclose(similarity, torch.tensor([[1.0, 0.0, s, -1.0], [0.0, -1.0, -s, 0.0]]))
    assert chosen[0].tolist() == [0, 2]  # cos 1, then 0.707; the norm of q does not matter
    assert sorted(chosen[1].tolist()) == [0, 3]  # cos 0 twice beats -0.707 and -1


def test_pull_term_is_the_mean_over_the_batch_of_summed_one_minus_cos():
    query = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    chosen = torch.tensor([[0, 2], [1, 3]])
    # row 1: (1 - 1) + (1 - 0.7071); row 2: (1 - 1) + (1 - 0) -> mean 0.6464
    expected = ((1 - 1 / math.sqrt(2)) + 1.0) / 2
    assert pull_loss(query, KEYS, chosen).item() == pytest.approx(expected, abs=1e-6)


def test_pull_term_pulls_the_chosen_keys_toward_the_query_and_leaves_the_others():
    keys = KEYS.clone().requires_grad_(True)
    query = torch.tensor([[1.0, 1.0]])
    loss = pull_loss(query, keys, torch.tensor([[0, 1]]))
    loss.backward()
    assert keys.grad[2:].abs().sum() == 0  # not chosen: no pull
    with torch.no_grad():
        stepped = keys - 0.1 * keys.grad
    assert pull_loss(query, stepped, torch.tensor([[0, 1]])) < loss  # one step brings them closer


def test_query_is_the_mean_over_the_masked_positions_or_every_position():
    embeds = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])
    assert mean_query(embeds, torch.tensor([[True, True, False]])).tolist() == [[2.0, 1.0]]
    assert torch.allclose(mean_query(embeds, None), torch.tensor([[104 / 3, 34.0]]))  # TRACE's: the pad counts


def test_pool_gives_each_input_its_chosen_prompts_concatenated_in_order():
    prompts = torch.arange(4 * 2 * 2, dtype=torch.float32).reshape(4, 2, 2)  # M=4 prompts of L=2 vectors
    pool = PromptPool(prompts, top_k=2, key="learned")
    with torch.no_grad():
        pool.keys.copy_(KEYS)
    embeds = torch.tensor([[[2.0, 0.0], [2.0, 0.1]], [[0.0, 5.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    out = pool(embeds, mask)
    assert out.shape == (2, 4, 2)
    assert torch.equal(out[0], torch.cat([prompts[0], prompts[2]]))  # query ~(2, .05): keys 0 then 2
    assert torch.equal(out[1], torch.cat([prompts[1], prompts[2]]))  # query (0, 5): keys 1 then 2
    assert pool.last_chosen.tolist() == [[0, 2], [1, 2]]
    assert pool.last_pull.requires_grad


def test_prompt_mean_keys_follow_the_prompts():
    prompts = torch.tensor([[[1.0, 0.0], [3.0, 0.0]], [[0.0, 2.0], [0.0, 4.0]]])
    pool = PromptPool(prompts, top_k=1, key="prompt_mean")
    assert pool.keys is None and pool.key_vectors().tolist() == [[2.0, 0.0], [0.0, 3.0]]
    learned = PromptPool(prompts, top_k=1)
    assert learned.keys.tolist() == [[2.0, 0.0], [0.0, 3.0]]  # learned keys start at the same values


def test_strategy_adds_the_weighted_pull_term_and_counts_usage():
    strategy = LearningToPrompt(L2PConfig(pool_size=4, top_k=2, pull_coefficient=0.5))
    pool = PromptPool(torch.zeros(4, 1, 2), top_k=2)
    with torch.no_grad():
        pool.keys.copy_(KEYS)
    strategy.source = pool
    strategy.ctx = types.SimpleNamespace(annealing=False)
    pool(torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]]), torch.ones(2, 1, dtype=torch.bool))
    assert strategy.penalty(None, {}).item() == pytest.approx(0.5 * pool.last_pull.item())
    assert strategy.usage[0] == [1, 1, 2, 0]
    state = strategy.state_dict()
    again = LearningToPrompt(L2PConfig(pool_size=4, top_k=2))
    again.load_state_dict(state)
    assert again.usage == strategy.usage


@pytest.mark.parametrize("options,key", [({"top_k": 11}, "strategy.top_k"), ({"pool_size": 0}, "strategy.pool_size"),
                                         ({"pull_coefficient": -1.0}, "strategy.pull_coefficient"),
                                         ({"key": "cls"}, "strategy.key"), ({"query": "max"}, "strategy.query")])
def test_bad_options_name_their_key(options, key):
    with pytest.raises(ValueError, match=key):
        LearningToPrompt(L2PConfig(**options))


def test_needs_model_prompt_on():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": {"prompt": {"length": 0}}})
    with pytest.raises(ValueError, match="model.prompt.length=5"):
        LearningToPrompt(L2PConfig()).check_run_config(cfg)
