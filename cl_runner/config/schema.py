"""The typed schema of every config group but the strategies' (each strategy module
declares its own): one dataclass per group, each option's default written once."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


# --------------------------------------------------------------------------- model
@dataclass
class LoraOptions:
    """LoRA adapter settings (model.adapter=lora), built with PEFT. Defaults are O-LoRA's
    scripts' (github.com/cmnfriend/O-LoRA, src/run_uie_lora.py: lora_dim 8, lora_alpha 32,
    lora_dropout 0.1); see docs/adapters.md."""

    r: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    # Module names (or name suffixes) to adapt; None = the family's default
    # (cl_runner/models/adapters.py: q/v projections for LLaMA-style, T5 and BERT).
    target_modules: Optional[list[str]] = None


@dataclass
class PromptOptions:
    """Soft prompts on a frozen backbone (cl_runner/models/prompts.py, docs/models.md):
    virtual tokens put in front of the input embeddings. length 0 = none. A prompt strategy
    (l2p, prog_prompt) decides how many prompts there are and which an input gets; without
    one, every input gets one prompt of this length (prompt tuning, Lester et al. 2021)."""

    # Virtual tokens per prompt; 0 = no soft prompt.
    length: int = 0
    # vocab: rows of randomly drawn vocabulary tokens (TRACE's init_new_prompt) | text: the
    # embeddings of `text`'s tokens, repeated to the length.
    init: str = "vocab"
    text: Optional[str] = None


@dataclass
class ModelConfig:
    name: str = "tiny_gpt2"
    # causal (GPT-2/LLaMA/Qwen), seq2seq (T5), classifier (BERT-style encoder + head)
    kind: str = "causal"
    # Hub id, local folder, or pkg://<python package>/<subfolder>. None = random init.
    path: Optional[str] = None
    # Random init: HF model_type and its config kwargs (used when path is None). With a
    # path, only dry_run's memory plan reads them (the sizes, for a model not on disk).
    architecture: Optional[str] = None
    architecture_config: dict[str, Any] = field(default_factory=dict)
    # A GGUF file (llama.cpp format): a path, pkg://<package>/<file>.gguf, or a file name
    # inside `path`. Dequantised by transformers (needs the `gguf` package) on first use
    # and kept as a converted copy in the cache (docs/models.md); its tokenizer is used.
    gguf_file: Optional[str] = None
    # Where converted GGUF models are kept; None = $CL_RUNNER_CACHE, else ~/.cache/cl-runner.
    cache_dir: Optional[str] = None
    # "byte" = built-in byte-level tokenizer; None = the tokenizer that ships with `path`.
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    max_length: int = 512
    # classifier only: one head class per distinct label string shared across tasks
    # ("label_string"), or separate classes per task ("per_task").
    head_sharing: str = "label_string"
    trust_remote_code: bool = False
    # Allow fetching from the hub at run time (off: missing models fail at once).
    allow_download: bool = False
    # none: strategies train the model's own weights | lora: they train LoRA adapters
    # (PEFT) on frozen base weights; a classifier's head trains too (docs/adapters.md).
    adapter: str = "none"
    lora: LoraOptions = field(default_factory=LoraOptions)
    prompt: PromptOptions = field(default_factory=PromptOptions)


# ---------------------------------------------------------------------- task streams
@dataclass
class TaskStreamConfig:
    name: str = "synthetic"
    # synthetic | trace | olora | custom
    kind: str = "synthetic"
    # trace/olora: the root folder on disk
    data_dir: Optional[str] = None
    # Task names in training order (trace/olora/synthetic; custom: taken from `tasks`), or
    # the name of one of the benchmark's orders (olora: order1..order6; trace: default, reverse).
    order: Any = field(default_factory=list)
    max_train_per_task: Optional[int] = None
    max_test_per_task: Optional[int] = None
    test_split: str = "test"
    # synthetic options
    num_digits: int = 5
    train_size: int = 2000
    test_size: int = 100
    # custom: list of task entries (see docs/data.md, "Custom streams")
    tasks: list[Any] = field(default_factory=list)
    # olora: wrap sentences in the instruction template (generative models);
    # null = template for causal/seq2seq models, bare sentence for classifiers.
    template: Optional[bool] = None
    # olora/custom: a record whose label is not in labels.json: error | drop (logged)
    unknown_labels: str = "error"
    # custom: let hf_dataset entries download (off: the local HF cache only)
    allow_download: bool = False


# ---------------------------------------------------------------------------- trainer
@dataclass
class FSDPConfig:
    # Recompute each block's activations in backward (less memory, ~30% more compute).
    activation_checkpointing: bool = False
    # Keep parameters, gradients and optimizer state on the CPU; the optimizer steps there.
    cpu_offload: bool = False
    # Free each block's gathered weights after its forward (ZeRO-3); false keeps them
    # until backward (ZeRO-2-like: faster, more memory).
    reshard_after_forward: bool = True


@dataclass
class TrainerConfig:
    # Per task: a number, or a list with one entry per task (TRACE presets).
    epochs: Any = 1
    # When set, a fixed number of optimizer steps per task replaces `epochs`.
    steps_per_task: Optional[int] = None
    batch_size: int = 16  # per device, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    # constant | linear | cosine (per task; the lr_schedule add-on can replace it)
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    # no | bf16 | fp16 (accelerate mixed precision)
    precision: str = "no"
    # Save a checkpoint every N optimizer steps (0 = only at task boundaries).
    checkpoint_every_steps: int = 0
    # Keep this many mid-task checkpoints (task-boundary ones replace each other too).
    keep_checkpoints: int = 1
    log_every_steps: int = 10
    progress_bar: bool = True
    # torch's CPU threads per process (intra- and inter-op); None = torch's default.
    # Keeps a CPU run on a shared node from using every core.
    cpu_threads: Optional[int] = None
    # none: every process holds the whole model (one process, or DDP); fsdp: FSDP2
    # (fully_shard) of every transformer block and the root, state sharded over processes.
    sharding: str = "none"
    fsdp: "FSDPConfig" = field(default_factory=lambda: FSDPConfig())


@dataclass
class EvaluationConfig:
    # greedy | sample (TRACE's original: sample at temperature 0.1)
    decoding: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    # None = the task's own budget (e.g. 50 for O-LoRA tasks)
    max_new_tokens: Optional[int] = None
    batch_size: int = 64
    save_predictions: bool = True
    # Tasks scored at every row of R (before training too) but never trained: is general
    # ability kept? Names of tasks in the stream's format (e.g. sst-2 for an O-LoRA
    # stream, loaded like its tasks) or custom task entries (as task_stream.tasks).
    monitor: list[Any] = field(default_factory=list)


@dataclass
class LoggerConfig:
    # wandb | none
    name: str = "wandb"
    project: str = "cl-runner"
    entity: Optional[str] = None
    # offline (default: sync later with `wandb sync`) | online | disabled
    mode: str = "offline"
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class OpsConfig:
    # None = fastest available; torch | cpp | cuda forces one
    backend: Optional[str] = None


@dataclass
class PaperTableConfig:
    """Set by a table's row presets (configs/table_row/), read by `cl-report --layout table`."""

    # The table the run is a cell of (olora_standard, trace, ...); None outside a table.
    name: Optional[str] = None
    # The row's name as the paper prints it (SeqFT, IncLoRA, ...).
    row: Optional[str] = None
    # Rows are printed by rank, as in the paper.
    rank: int = 0


@dataclass
class RunSettings:
    """Top-level keys that are not groups."""

    experiment_name: str = "default"
    seed: int = 0
    # How run folders and reports name the strategy; None = its name and the add-ons on
    # (seq_ft+lr_schedule+replay). A strategy preset sets it (strategy=rewarm_replay).
    strategy_label: Optional[str] = None
    output_dir: Optional[str] = None
    resume: Optional[str] = None
    # Print the resolved config and stop.
    dry_run: bool = False
    # dry_run's memory plan: processes (None = $WORLD_SIZE, else 1) and GiB per GPU for a
    # fits / does-not-fit verdict (None = no verdict). Nothing else reads them.
    plan_world_size: Optional[int] = None
    plan_gpu_memory_gb: Optional[float] = None
    # Write the final weights as a Hugging Face folder (safetensors) to <run>/final_model.
    save_final_model: bool = False


SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "task_stream": TaskStreamConfig,
    "trainer": TrainerConfig,
    "evaluation": EvaluationConfig,
    "logger": LoggerConfig,
    "ops": OpsConfig,
    "paper_table": PaperTableConfig,
}
