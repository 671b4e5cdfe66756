"""Prompt sources of the prompt strategies: modules that give each input its soft prompts
(`forward(inputs_embeds, query_mask) -> (B, P, d)`, see cl_runner/models/prompts.py).

- `PromptPool` (L2P, Wang et al. 2022, CVPR, arXiv 2112.08654): M prompts with keys; an
  input's query picks its top-k keys by cosine similarity and gets those k prompts.
- `ProgressivePrompts` (Razdaibiedina et al. 2023, ICLR, arXiv 2301.12314): one prompt per
  task, [P_t; P_{t-1}; ...; P_1] in front of the input, the earlier ones frozen; the
  current one optionally through a residual MLP, folded into the prompt after its task.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

QUERIES = ("input", "trace")
KEYS = ("learned", "prompt_mean")
REPARAMETERIZATIONS = ("none", "mlp1", "mlp2")


# ---------------------------------------------------------------------------- L2P math
def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, sqrt(eps)) along `dim` (L2P's l2_normalize)."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=dim, keepdim=True), min=eps))


def mean_query(inputs_embeds: torch.Tensor, query_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, d): the mean input embedding over the positions of `query_mask` (None: every
    position, pads included, as TRACE's torch.mean(inputs_embeds, dim=1))."""
    if query_mask is None:
        return inputs_embeds.float().mean(dim=1)
    weights = query_mask.to(torch.float32).unsqueeze(-1)
    return (inputs_embeds.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def select_top_k(query: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices (B, k) of the k keys most cosine-similar to each query, most similar first;
    the similarities (B, M))."""
    similarity = l2_normalize(query) @ l2_normalize(keys).T
    return similarity.topk(k, dim=1).indices, similarity


def pull_loss(query: torch.Tensor, keys: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """L2P's surrogate term: mean over the batch of sum over the chosen keys of
    (1 - cos(q, k_i)). Its gradient pulls the chosen keys toward their queries; TRACE's
    `- sum cos / B` has the same gradient (it differs by the constant k)."""
    cos = (l2_normalize(query).unsqueeze(1) * l2_normalize(keys)[chosen]).sum(-1)  # (B, k)
    return (1.0 - cos).sum(dim=1).mean()


class PromptPool(nn.Module):
    """M prompts of L vectors, M keys; each input gets its top-k prompts, k*L vectors, the
    most similar key's prompt first. The last forward's pull term and choices stay on the
    module (`last_pull`, `last_chosen`) for the strategy's loss and counts."""

    def __init__(self, prompts: torch.Tensor, top_k: int, key: str = "learned", query: str = "input") -> None:
        super().__init__()
        self.prompts = nn.Parameter(prompts)  # (M, L, d)
        self.top_k = top_k
        self.query = query
        self.max_virtual_tokens = top_k * prompts.shape[1]
        # learned: keys of their own, starting at the mean of their prompt's vectors (the
        # value TRACE's key has); prompt_mean: the key is the prompt's mean (TRACE).
        self.keys = nn.Parameter(prompts.mean(dim=1).clone()) if key == "learned" else None
        self.last_pull: Optional[torch.Tensor] = None
        self.last_chosen: Optional[torch.Tensor] = None

    def key_vectors(self) -> torch.Tensor:
        return self.keys if self.keys is not None else self.prompts.mean(dim=1)

    def forward(self, inputs_embeds: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        query = mean_query(inputs_embeds.detach(), query_mask if self.query == "input" else None)
        keys = self.key_vectors().float()
        chosen, _ = select_top_k(query.detach(), keys.detach(), self.top_k)
        self.last_pull = pull_loss(query, keys, chosen)
        self.last_chosen = chosen.detach()
        picked = self.prompts[chosen]  # (B, k, L, d)
        return picked.reshape(picked.shape[0], -1, picked.shape[-1])


# ------------------------------------------------------------------------ ProgPrompt
class ResidualMLP(nn.Module):
    """x + f(x), applied to each prompt vector: the reparameterisation of Progressive
    Prompts. mlp1: Linear(d,b) ReLU Linear(b,d) LayerNorm(d) (the authors' ResMLP 'MLP1');
    mlp2: Linear(d,b) ReLU Linear(b,b/2) Tanh Linear(b/2,d) ('MLP2', TRACE's choice)."""

    def __init__(self, width: int, bottleneck: int, form: str) -> None:
        super().__init__()
        if form == "mlp1":
            self.net = nn.Sequential(nn.Linear(width, bottleneck), nn.ReLU(), nn.Linear(bottleneck, width),
                                     nn.LayerNorm(width))
        else:
            half = max(1, bottleneck // 2)
            self.net = nn.Sequential(nn.Linear(width, bottleneck), nn.ReLU(), nn.Linear(bottleneck, half), nn.Tanh(),
                                     nn.Linear(half, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """Fresh weights (a new MLP for the new task), drawn from `generator` in place, so
        the parameters DDP and the checkpoints know stay the same objects."""
        for module in self.net:
            if isinstance(module, nn.Linear):
                bound = 1.0 / module.in_features ** 0.5  # nn.Linear's own default range
                module.weight.copy_(torch.empty_like(module.weight).uniform_(-bound, bound, generator=generator))
                module.bias.copy_(torch.empty_like(module.bias).uniform_(-bound, bound, generator=generator))
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()


class ProgressivePrompts(nn.Module):
    """prompts[t] for task t. While task `current` trains (current >= finished) its prompt
    goes through the MLP; after its task, `fold` stores MLP(P_t) as P_t and it is final."""

    def __init__(self, prompts: torch.Tensor, reparameterize: str = "none", bottleneck: int = 0) -> None:
        super().__init__()
        self.prompts = nn.ParameterList([nn.Parameter(p.clone()) for p in prompts])  # T x (L, d)
        width = prompts.shape[-1]
        self.mlp = ResidualMLP(width, bottleneck, reparameterize) if reparameterize != "none" else None
        self.max_virtual_tokens = prompts.shape[0] * prompts.shape[1]
        self.current = 0  # the task training (or last trained)
        self.finished = 0  # tasks whose prompt is final (folded)

    def task_prompt(self, t: int) -> torch.Tensor:
        prompt = self.prompts[t]
        if t >= self.finished and self.mlp is not None:
            return self.mlp(prompt)
        return prompt

    def forward(self, inputs_embeds: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        # Newest first: [P_t; P_{t-1}; ...; P_1] (the paper's and TRACE's order).
        blocks = [self.task_prompt(t) for t in range(self.current, -1, -1)]
        joined = torch.cat(blocks, dim=0)
        return joined.unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)

    @torch.no_grad()
    def fold(self, t: int) -> None:
        """Task t is done: its prompt becomes MLP(P_t) (the authors keep the MLP's output
        and drop the MLP) and is final."""
        if self.mlp is not None and t >= self.finished:
            self.prompts[t].copy_(self.mlp(self.prompts[t]))
        self.finished = max(self.finished, t + 1)
