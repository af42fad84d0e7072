"""The pretraining config schema: every key, its default and its valid range, in one place."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from data_prep.configfile import Location, Section, config_hash, dotted
from pretrain.presets import PRESETS, ModelConfig, preset


class DataConfig(Section):
    dataset: Location = Field(description="a dataset directory (or fsspec URL) holding manifest.json")
    streams: int | None = Field(
        None, ge=1,
        description="parallel example streams; the global example order depends on this, the seed and the "
                    "micro batch only (not on ranks or workers). Default: the smallest multiple of world size x "
                    "num_workers that is 8 or more (a resumed run keeps its checkpoint's)",
    )
    shuffle_buffer: int = Field(10_000, ge=1, description="examples shuffled together (rounded up to whole shards)")
    num_workers: int = Field(1, ge=0, description="loader processes per rank (0: load in the training process)")
    eval_examples: int = Field(2000, ge=0, description="validation examples per evaluation, spread evenly over the "
                                                       "val split (0: no evaluation)")


class ModelSection(Section):
    """`preset` plus any field of `pretrain.presets.ModelConfig` to override (vocab_size comes from the dataset)."""

    preset: Literal[tuple(PRESETS)] = "base"  # type: ignore[valid-type]
    hidden_size: int | None = Field(None, ge=8)
    num_layers: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    intermediate_size: int | None = Field(None, ge=1)
    max_position: int | None = Field(None, ge=8)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    attention_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    layer_norm_eps: float | None = Field(None, gt=0.0)
    pre_ln: bool | None = None
    init_std: float | None = Field(None, gt=0.0)

    def build(self, vocab_size: int) -> ModelConfig:
        over = {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}
        return preset(self.preset, vocab_size, **over)

    @model_validator(mode="after")
    def _shape(self):
        _, hidden, heads = PRESETS[self.preset]
        hidden, heads = self.hidden_size or hidden, self.num_heads or heads
        if hidden % heads:
            raise ValueError(f"model.hidden_size ({hidden}) is not a multiple of model.num_heads ({heads})")
        return self


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1, description="optimizer steps")
    micro_batch_size: int = Field(32, ge=1, description="sequences per rank per forward/backward")
    global_batch_size: int = Field(
        256, ge=1, description="sequences per optimizer step; accumulation = global / (micro x world)"
    )
    optimizer: Literal["adamw", "lamb"] = "adamw"
    lr: float = Field(1e-4, gt=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["linear", "cosine", "poly", "constant"] = "linear"
    poly_power: float = Field(0.5, gt=0.0, description="exponent of the poly decay (NVIDIA's BERT recipe: 0.5)")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="the decay ends at lr x this")
    grad_clip: float = Field(1.0, ge=0.0, description="max global gradient norm (0: off)")
    masking: Literal["static", "dynamic"] = "static"
    mlm_loss: Literal["global_mean", "micro_batch_mean"] = Field(
        "global_mean", description="global_mean: every masked token of the step's global batch weighs the same "
                                   "(one all-reduce of a count per step); micro_batch_mean: each micro batch's own "
                                   "mean, as Google's and NVIDIA's BERT (a micro batch of few masked tokens, e.g. "
                                   "short sequences, weighs its tokens more)")
    unpad: bool = Field(True, description="run the encoder on the real tokens only (the same model; saves the "
                                          "batch's padding fraction of the work); false: the padded (B, L) layout")
    varlen_attention: bool = Field(
        False, description="with unpad: attention too on the real tokens, each sequence over its own (nested jagged "
                           "tensors; FlashAttention's varlen kernel on GPUs) instead of padding inside attention")
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile the encoder layers (fused elementwise kernels; the same model). auto: on "
                            "with CUDA and ZeRO 0-2; off on CPU, where compiling takes longer than it saves")
    eval_every: int = Field(500, ge=0, description="steps between evaluations on the val split (0: only at the end)")
    log_every: int = Field(10, ge=1, description="steps between console progress lines")
    max_skipped_steps: int = Field(
        20, ge=1, description="consecutive steps skipped for non-finite loss or gradients before the run stops"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.varlen_attention and not self.unpad:
            raise ValueError("train.varlen_attention=true runs attention on the packed real tokens: it needs "
                             "train.unpad=true")
        if self.global_batch_size % self.micro_batch_size:
            below = self.global_batch_size - self.global_batch_size % self.micro_batch_size
            nearest = " or ".join(str(n) for n in (below, below + self.micro_batch_size) if n > 0)
            raise ValueError(f"train.global_batch_size ({self.global_batch_size}) is not a multiple of "
                             f"train.micro_batch_size ({self.micro_batch_size}): set it to {nearest} (on one "
                             "process; with several, a multiple of micro_batch_size x their number), or change "
                             "train.micro_batch_size")
        return self


# DeepSpeed config keys that the config's own keys set (pretrain/engine.py ds_config, build_engine): set there,
# they would differ from what the run records and what resuming and export read. Precision is not among them:
# DeepSpeed's own bf16 mode is an option for network-bound jobs (README, performance notes).
DEEPSPEED_KEYS_OWNED = {
    "train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size and train.micro_batch_size",
    "gradient_clipping": "train.grad_clip", "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "optimizer": "train.optimizer and its hyperparameters (train.lr, train.betas, train.eps, train.weight_decay)",
    "scheduler": "train.schedule and its keys (train.warmup_steps...)",
}


class DeepSpeedSection(Section):
    owned: ClassVar[dict[str, str]] = DEEPSPEED_KEYS_OWNED
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = Field(False, description="keep optimizer states in CPU memory (ZeRO >= 1)")
    config: dict[str, Any] = Field(
        default_factory=dict, description="extra DeepSpeed config keys merged over the generated ones (expert use)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> "DeepSpeedSection":
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        for key, ours in self.owned.items():
            if dotted(self.config, key) is not None:
                raise ValueError(f"deepspeed.config.{key} is set from {ours}: set that instead")
        return self


class CheckpointConfig(Section):
    dir: Location = "checkpoints/run"
    every_steps: int = Field(500, ge=0, description="steps between checkpoints (0: only at the end and on SIGTERM)")
    keep: int = Field(3, ge=1, description="committed checkpoints kept (older ones are deleted)")


class MlflowConfig(Section):
    enabled: bool = True
    tracking_uri: str = Field(
        "", description="empty: $MLFLOW_TRACKING_URI, else a sqlite store mlflow.db in the working directory"
    )
    experiment: str = "bert-pretraining"
    run_name: str | None = None


def registry_name_problem(name: str | None, alias: str | None) -> str | None:
    """What MLflow would refuse in a registered model's name or alias (checked here, before any training), or None."""
    if name is not None and (not name.strip() or any(c in name for c in "/:'\"")):
        # (quotes: MLflow's searches by name, which registering a version needs, cannot hold them)
        return f"registered model name {name!r}: MLflow names are not empty and hold no '/', ':' or quotes"
    if alias is None:
        return None
    if alias.lower() == "latest":
        return ("the alias 'latest' is reserved by MLflow (models:/NAME/latest already means the newest version); "
                "choose another, e.g. champion")
    if re.fullmatch(r"[vV]\d+", alias):
        return (f"the alias {alias!r} is reserved by MLflow (models:/NAME@{alias} means version {alias[1:]}); "
                "choose another, e.g. champion")
    if not re.fullmatch(r"[\w-]{1,255}", alias):
        return f"alias {alias!r}: MLflow aliases hold letters, digits, '_' and '-' only (at most 255)"
    return None


class RegistrySection(Section):
    """A registered model name and the alias moved to each new version, as MLflow accepts them."""

    name: str | None = Field(None, description="register under this model name (none: do not register)")
    alias: str | None = Field(None, description="alias moved to each newly registered version (e.g. champion)")

    @model_validator(mode="after")
    def _mlflow_rules(self):
        problem = registry_name_problem(self.name, self.alias)
        if problem:
            raise ValueError(problem)
        return self


class RegistryConfig(RegistrySection):
    when: Literal["end", "every_checkpoint", "best"] = Field(
        "end", description="end: the final checkpoint; best: each checkpoint with the lowest eval loss so far"
    )
    pooling: Literal["cls", "mean"] = Field("cls", description="sentence embedding of the registered pyfunc")


class DebugConfig(Section):
    trace_examples: bool = Field(
        False, description="each rank appends the keys of every example it trains on to CHECKPOINT_DIR/trace/"
    )
    nan_at_step: int | None = Field(None, ge=1, description="make this step's loss NaN (tests the numerics guard)")
    dump_weights: bool = Field(
        False, description="at the end, write the live engine's weights to CHECKPOINT_DIR/engine-weights.safetensors"
    )


class PretrainConfig(Section):
    data: DataConfig
    model: ModelSection = ModelSection()
    train: TrainConfig = TrainConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it (Ampere and newer), else fp32 (on CPU, bf16 matmuls "
                            "are slow without AMX); bf16: fp32 weights and optimizer, bf16 compute under autocast; "
                            "fp16: fp16 weights, loss scaling (V100, T4: their fast tensor-core type)"
    )
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    checkpoint: CheckpointConfig = CheckpointConfig()
    resume: Literal["auto", "must", "never"] = "auto"
    init_from: str | None = Field(
        None, description="a fresh run starts from this model's weights instead of random ones (step 0, a new "
                          "optimizer and schedule): a checkpoint or checkpoint.dir, a model directory, or a models:/ "
                          "or runs:/ URI. For a second phase at a longer sequence length on a dataset made with the "
                          "same tokenizer (data prep's tokenizer.path). A run that resumes ignores it")
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    seed: int = Field(1234, ge=0)
    debug: DebugConfig = DebugConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainConfig":
        if self.train.optimizer == "lamb" and self.deepspeed.zero_stage >= 1:
            raise ValueError(
                "train.optimizer=lamb cannot run under ZeRO: partitioning the parameters breaks LAMB's per-layer "
                "trust ratios, and DeepSpeed refuses it. Use train.optimizer=adamw, or deepspeed.zero_stage=0 on GPU"
            )
        if self.train.compile is True and self.deepspeed.zero_stage == 3:
            raise ValueError("train.compile=true cannot run under ZeRO-3: its parameters are gathered by hooks "
                             "inside each layer's forward, which a compiled layer does not run. Use "
                             "train.compile=auto (off under ZeRO-3) or deepspeed.zero_stage=1 or 2")
        if self.registry.name and not self.mlflow.enabled:
            raise ValueError("registry.name needs mlflow.enabled=true (the registry lives in the MLflow store)")
        if self.registry.when == "best" and not self.data.eval_examples:
            raise ValueError("registry.when=best needs evaluation: set data.eval_examples > 0")
        return self

    def hash(self) -> str:
        """What the run computes, not where its checkpoints are kept (a cluster job moves checkpoint.dir)."""
        return config_hash(self.model_dump(mode="json", exclude={"checkpoint": {"dir"}}))


# -- Fine-tuning (`python -m pretrain finetune`) -----------------------------------------------------------

class TaskConfig(Section):
    """A sequence classification task: labelled rows in jsonl (.jsonl/.json) or csv/tsv files, .gz allowed."""

    train: Location = Field(description="labelled training rows (a path or fsspec URL)")
    validation: Location | None = Field(None, description="picks the best checkpoint; none: a stratified split of train")
    test: Location | None = Field(None, description="scored once with the best checkpoint (test_accuracy, test_macro_f1)")
    text_field: str = "text"
    text_pair_field: str | None = Field(None, description="a second text per row (pair tasks: NLI, paraphrase, QA)")
    label_field: str = "label"
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="of train, when task.validation is unset")


class FinetuneTrainConfig(Section):
    epochs: int = Field(3, ge=1)
    micro_batch_size: int = Field(32, ge=1, description="sequences per rank per step")
    max_seq_length: int = Field(128, ge=8, description="longer rows are truncated (the longer text of a pair first)")
    optimizer: Literal["adamw"] = "adamw"
    lr: float = Field(5e-5, gt=0.0, description="BERT's fine-tuning range is 2e-5 to 5e-5")
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="share of all steps with a linear LR warmup")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float = Field(1.0, ge=0.0, description="max global gradient norm (0: off)")
    classifier_dropout: float | None = Field(None, ge=0.0, lt=1.0, description="default: the model's dropout")
    eval_every: int = Field(0, ge=0, description="steps between validations (0: at the end of each epoch)")
    best_metric: Literal["accuracy", "macro_f1", "loss"] = Field(
        "accuracy", description="the validation metric that picks the best checkpoint")
    patience: int = Field(0, ge=0, description="validations without improvement before stopping early (0: never)")
    log_every: int = Field(20, ge=1, description="steps between console progress lines")


class FinetuneDeepSpeed(DeepSpeedSection):
    owned: ClassVar[dict[str, str]] = {
        **DEEPSPEED_KEYS_OWNED,
        **{k: "train.micro_batch_size (fine-tuning does not accumulate)" for k in (
            "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")},
        "scheduler": "train.schedule and train.warmup_ratio",
    }
    enabled: bool = Field(False, description="train under a DeepSpeed engine (needed for several processes)")
    zero_stage: Literal[0, 1, 2, 3] = 2


class FinetuneMlflow(MlflowConfig):
    experiment: str = "bert-finetuning"


class FinetuneConfig(Section):
    model: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH, a pulled or exported "
                                   "model directory, or a pretraining checkpoint (a path, or the object-store URL "
                                   "a cluster job uploaded it to)")
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: the same architecture and tokenizer from scratch (a baseline)")
    task: TaskConfig
    train: FinetuneTrainConfig = FinetuneTrainConfig()
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it (Ampere and newer), else fp32. fp16 needs "
                            "deepspeed.enabled")
    deepspeed: FinetuneDeepSpeed = FinetuneDeepSpeed()
    output: Location = Field("finetune/run", description="directory for the best model, metrics.jsonl and the summary")
    mlflow: FinetuneMlflow = FinetuneMlflow()
    registry: RegistrySection = RegistrySection()  # CLI: --register NAME [--alias ALIAS]
    seed: int = Field(1234, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.registry.name and not self.mlflow.enabled:
            raise ValueError("registry.name needs mlflow.enabled=true (the registry lives in the MLflow store)")
        if self.registry.alias and not self.registry.name:
            raise ValueError("registry.alias needs registry.name (--register NAME): the alias names a version of it")
        if self.precision == "fp16" and not self.deepspeed.enabled:
            raise ValueError("precision=fp16 needs deepspeed.enabled=true (its loss scaling); use bf16 or fp32")
        return self
