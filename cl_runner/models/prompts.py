"""Soft prompts (model.prompt): trainable vectors put in front of the input embeddings of a
frozen backbone, for causal, seq2seq and encoder-classifier models.

`PromptedModel` wraps the built transformers model. Its forward embeds `input_ids` with the
backbone's own (frozen) embedding table, asks its prompt source for P vectors per example,
inserts them, extends `attention_mask` (and `token_type_ids`) with ones (zeros), gives a
causal LM's `labels` P ignored (-100) positions, and calls the backbone with
`inputs_embeds`. `generate` does the same once and lets the backbone generate from the
embeddings, so KV-cache decoding sees the prompt in every step; for causal LMs it returns
`[input_ids, new tokens]` as a plain model's generate does (evaluation/predict.py cuts the
input off by its length). Positions come from the attention mask in HF generation
(cumsum), so left-padded generation inputs see the prompt at the positions training gave it.

Where the prompt goes: in front of everything for LMs (Lester et al. 2021, as TRACE's
L2P.py/PP.py); after the first token for encoder classifiers, whose pooler reads the first
position ([CLS]), so the head keeps reading [CLS].

Why not PEFT's prompt tuning (PeftModel with PromptTuningConfig): it keeps one fixed-length
prompt table per adapter and prepends the same rows to every input. L2P picks each input's
prompts from a pool by its own query, and ProgPrompt's prompt grows by a frozen block per
task; neither fits one table, and PEFT cannot mix prompt learning with LoRA in one model
either. What we would use from it (saving, merging) does not apply to prompts, which are
never merged into weights. So the prompt source is any module with
`forward(inputs_embeds, query_mask) -> (B, P, d)` (`SinglePrompt` here; the strategies'
pools and progressive prompts in cl_runner/strategies/parts/prompt_sources.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from cl_runner.errors import ConfigError, bad_value

IGNORE = -100
INITS = ("vocab", "text")
PROMPT_FILE = "soft_prompts.safetensors"  # beside model.safetensors in final_model/
# Why trainer.sharding=fsdp is refused with soft prompts (config validation, the prompt strategies).
SHARDING_REFUSAL = "soft prompts wrap the whole model, which trainer.sharding=fsdp does not shard yet"


@dataclass
class PromptMaker:
    """What a prompt source needs to make its prompts: the width and initial vectors drawn
    as model.prompt says (random rows of the frozen vocabulary, or a text's embeddings)."""

    width: int
    length: int  # model.prompt.length: virtual tokens per prompt
    embedding: torch.Tensor  # the backbone's input embedding table (vocab x d), frozen
    init: str = "vocab"
    text_ids: Optional[list[int]] = None  # init=text: the text's token ids
    generator: Optional[torch.Generator] = None

    def vectors(self, count: int = 1, length: Optional[int] = None, scale: float = 1.0) -> torch.Tensor:
        """(count, length, d) initial prompt vectors, float32."""
        length = self.length if length is None else length
        return torch.stack([initial_prompt(self.embedding, length, self.init, self.text_ids, self.generator) * scale
                            for _ in range(count)])


def initial_prompt(embedding: torch.Tensor, length: int, init: str, text_ids: Optional[list[int]] = None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(length, d) vectors: `vocab` = rows of randomly drawn tokens (Lester et al. 2021's
    sampled-vocabulary init; TRACE's init_new_prompt draws each row uniformly from the whole
    vocabulary); `text` = the embeddings of the text's tokens, repeated to the length."""
    table = embedding.detach().float()
    if init == "vocab":
        ids = torch.randint(0, table.shape[0], (length,), generator=generator)
    else:
        if not text_ids:
            raise ConfigError(bad_value("model.prompt.text", text_ids, "give a non-empty text to init from"))
        ids = torch.tensor([text_ids[i % len(text_ids)] for i in range(length)])
    return table[ids].clone()


class SinglePrompt(nn.Module):
    """One prompt for every input (prompt tuning, Lester et al. 2021)."""

    def __init__(self, maker: PromptMaker) -> None:
        super().__init__()
        self.prompt = nn.Parameter(maker.vectors(1)[0])
        self.max_virtual_tokens = maker.length

    def forward(self, inputs_embeds: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        return self.prompt.to(inputs_embeds.dtype).unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)


def insert_position(kind: str) -> int:
    """Where the virtual tokens go: after [CLS] in an encoder classifier, else first."""
    return 1 if kind == "classifier" else 0


def insert(tensor: torch.Tensor, block: torch.Tensor, at: int) -> torch.Tensor:
    """`block` (B, P, ...) put into `tensor` (B, L, ...) before position `at` along dim 1."""
    return torch.cat([tensor[:, :at], block, tensor[:, at:]], dim=1)


class PromptedModel(nn.Module):
    """A frozen backbone whose inputs get the prompt source's vectors (see the module doc)."""

    def __init__(self, backbone: nn.Module, source: nn.Module, kind: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.source = source
        self.kind = kind
        self.at = insert_position(kind)
        freeze_backbone(backbone, kind)

    # transformers facts the rest of the program reads off a model
    @property
    def config(self) -> Any:
        return self.backbone.config

    @property
    def generation_config(self) -> Any:
        return self.backbone.generation_config

    def _prompted(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None) -> dict:
        embeds = self.backbone.get_input_embeddings()(input_ids)
        query_mask = attention_mask.bool()
        if self.kind == "causal" and labels is not None:
            query_mask = query_mask & (labels == IGNORE)  # the query reads the input, never the answer
        prompts = self.source(embeds, query_mask).to(embeds.dtype)
        batch, length = prompts.shape[:2]
        ones = attention_mask.new_ones(batch, length)
        out = {"inputs_embeds": insert(embeds, prompts, self.at),
               "attention_mask": insert(attention_mask, ones, self.at)}
        if token_type_ids is not None:
            out["token_type_ids"] = insert(token_type_ids, torch.zeros_like(ones), self.at)
        if labels is not None:
            out["labels"] = insert(labels, labels.new_full((batch, length), IGNORE), self.at) \
                if self.kind == "causal" else labels
        return out

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None, **kwargs: Any):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.backbone(**self._prompted(input_ids, attention_mask, labels, token_type_ids), **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs: Any):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = self._prompted(input_ids, attention_mask)
        generated = self.backbone.generate(**inputs, **kwargs)
        if self.kind == "causal":
            # From embeddings alone, a decoder-only generate returns the new tokens only.
            generated = torch.cat([input_ids, generated], dim=1)
        return generated

    def save_pretrained(self, folder: Any, state_dict: Optional[dict] = None, **kwargs: Any) -> None:
        """The backbone as a plain transformers folder, the prompt source's tensors beside it
        in soft_prompts.safetensors (their keys as in this model's state dict)."""
        from pathlib import Path

        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(folder, state_dict=backbone, **kwargs)
        prompts = {k: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("source.")}
        save_file(prompts, str(Path(folder) / PROMPT_FILE))


def freeze_backbone(backbone: nn.Module, kind: str) -> None:
    """Every backbone weight frozen, but a classifier's new head: it has to learn the
    classes (PEFT's prompt tuning for sequence classification trains it as well)."""
    from cl_runner.models.adapters import head_modules

    backbone.requires_grad_(False)
    if kind == "classifier":
        heads = head_modules(backbone)
        if not heads:
            raise ConfigError("model.prompt on a classifier needs its head (classifier or score) to train, and this "
                              "model has neither; set model.prompt.length=0")
        for head in heads.values():
            head.requires_grad_(True)


def is_prompted(model: nn.Module) -> bool:
    return isinstance(model, PromptedModel)


def check_prompt_options(options: Any) -> None:
    """model.prompt.* ranges (length 0 = no prompt)."""
    if options.length < 0:
        raise ConfigError(bad_value("model.prompt.length", options.length, "use 0 (no prompt) or a positive length"))
    if options.init not in INITS:
        raise ConfigError(bad_value("model.prompt.init", options.init, f"choose one of: {', '.join(INITS)}"))
    if options.init == "text" and not options.text:
        raise ConfigError(bad_value("model.prompt.text", options.text,
                                    "model.prompt.init=text needs the text, e.g. model.prompt.text='Classify:'"))


SourceFactory = Callable[[PromptMaker], Optional[nn.Module]]


def attach_prompts(model: nn.Module, options: Any, kind: str, tokenizer: Any, seed: int,
                   make_source: Optional[SourceFactory] = None, max_length: Optional[int] = None) -> nn.Module:
    """`model` wrapped in a PromptedModel with the strategy's prompt source (`make_source`),
    or one prompt for every input when the strategy brings none (prompt tuning)."""
    check_prompt_options(options)
    if getattr(model, "peft_config", None) is not None:
        raise ConfigError("model.prompt cannot be combined with model.adapter=lora: soft prompts train on a frozen "
                          "backbone of their own; set model.adapter=none")
    table = model.get_input_embeddings().weight
    text_ids = tokenizer.encode(options.text) if options.init == "text" else None
    # Its own generator: the prompts' initial values depend on the seed only, not on what
    # drew random numbers before.
    generator = torch.Generator().manual_seed(int(seed))
    maker = PromptMaker(width=table.shape[1], length=int(options.length), embedding=table, init=options.init,
                        text_ids=text_ids, generator=generator)
    source = make_source(maker) if make_source is not None else None
    if source is None:
        source = SinglePrompt(maker)
    check_positions(model.config, max_length, virtual_tokens(source))
    return PromptedModel(model, source.to(table.device), kind)


def virtual_tokens(source: nn.Module) -> int:
    """The most virtual tokens the source puts in front of an input."""
    return int(getattr(source, "max_virtual_tokens", 0))


def check_positions(model_config: Any, max_length: Optional[int], virtual: int) -> None:
    """Inputs of model.max_length tokens plus the virtual tokens must fit the model's
    positions (T5's relative positions name no limit)."""
    from cl_runner.models.positions import position_limit

    limit = position_limit(model_config)
    if limit is None or max_length is None:
        return
    positions, key = limit
    if max_length + virtual > positions:
        raise ConfigError(bad_value("model.max_length", max_length,
                                    f"the soft prompts add {virtual} virtual tokens and the model has {positions} "
                                    f"positions ({key}); use model.max_length<={positions - virtual} or a shorter "
                                    "model.prompt.length"))
