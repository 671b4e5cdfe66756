"""What the prompt strategies (l2p, prog_prompt) share: they need model.prompt on, find
their prompt source on the built model, and count the prompts' cost."""
from __future__ import annotations

from typing import Any

from torch import nn

from cl_runner.models.prompts import SHARDING_REFUSAL
from cl_runner.strategies.base import Strategy, StrategyContext
from cl_runner.strategies.memory import PlanInputs

# The one-line refusals of their registrations.
NO_ADAPTERS = ("it trains soft prompts on a frozen backbone (model.prompt), and a LoRA would be a second trainable "
               "part the method does not have")
NO_SHARDING = SHARDING_REFUSAL


class PromptStrategy(Strategy):
    """A strategy whose trainable part is the soft prompts its `prompt_source` makes."""

    # The length the strategy's option file sets (configs/strategy/<name>.yaml), for the error.
    suggested_length = 5

    def check_run_config(self, cfg: Any) -> None:
        prompt = cfg.model.get("prompt")
        length = prompt.length if prompt is not None else 0
        if length <= 0:
            raise ValueError(f"strategy={self.name} trains soft prompts, but model.prompt.length={length}; set "
                             f"model.prompt.length={self.suggested_length} (configs/strategy/{self.name}.yaml "
                             "does unless overridden)")

    def setup(self, ctx: StrategyContext) -> None:
        from cl_runner.models.prompts import is_prompted

        super().setup(ctx)
        model = ctx.unwrapped_model
        if not is_prompted(model) or not self._owns(model.source):
            raise ValueError(f"strategy={self.name} needs the model built with its soft prompts "
                             f"(model.prompt.length > 0, the source from {type(self).__name__}.prompt_source)")
        self.source = model.source

    def _owns(self, source: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def head_params(inputs: PlanInputs) -> int:
        """A classifier's head trains beside the prompts: hidden x classes (+ bias), read
        off the meta model."""
        from cl_runner.models.adapters import head_modules

        if inputs.facts.kind != "classifier":
            return 0
        return sum(p.numel() for m in head_modules(inputs.facts.model).values() for p in m.parameters())
