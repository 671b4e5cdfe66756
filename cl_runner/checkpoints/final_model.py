"""`save_final_model=true`: the final weights as a Hugging Face folder (config, safetensors,
the tokenizer when it is a Hugging Face one) in <run>/final_model, loadable with plain
`transformers`: LoRA adapters merged into the weights, an FSDP2 model gathered on rank 0
one tensor at a time."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from cl_runner.training.run import RunContext


def save_final_model(run: RunContext) -> Optional[str]:
    """The final weights as a Hugging Face folder (config, safetensors, tokenizer when it is
    a Hugging Face one) in <run>/final_model; every rank calls it, rank 0 writes."""
    model = run.accelerator.unwrap_model(run.model)
    from cl_runner.models.adapters import is_adapted, merged_for_saving

    if is_adapted(model):  # a plain transformers folder: the active LoRAs merged into the weights
        model = merged_for_saving(model)
    if run.sharded:
        from cl_runner.distributed.sharding import full_state_dict

        state = full_state_dict(model)  # collective; the full tensors land on rank 0 only
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if run.is_main else None
    if not run.is_main:
        return None
    folder = run.run_dir / "final_model"
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    hf_tokenizer = getattr(run.bundle.tokenizer, "hf", None)
    if hf_tokenizer is not None:
        hf_tokenizer.save_pretrained(folder)
    print(f"[cl-run] final model: {folder}", flush=True)
    return str(folder)
