"""The run-config sections of the methods that start from a finished run (flatray.config.run holds the rest):
sharpness, dynamic int8 PTQ, one-shot pruning, CoFi, SQuAT/LSQ and loss contours. Each forbids unknown keys."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    # allow_inf_nan=False: an inf or nan hyperparameter (lr, rho, ...) is a typo, never a setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SharpnessConfig(Section):
    """epsilon-sharpness (METHODS.md section 7) of the final model; at the end of a fine-tuning run when enabled."""

    enabled: bool = False
    eps: list[float] = Field([5e-3, 1e-3, 5e-4], min_length=1)
    dim: int | None = Field(100, ge=1, description="random projection size p; null = the full parameter space")
    samples: int = Field(256, gt=0, description="the fixed subset: the first `samples` training examples")
    max_iter: int = Field(10, gt=0, description="L-BFGS-B iterations")

    @field_validator("eps")
    @classmethod
    def _positive(cls, eps):
        if any(e <= 0 for e in eps):
            raise ValueError("positive numbers")
        return eps


class PTQConfig(Section):
    """Post-training dynamic int8 quantization of a finished run (METHODS.md section 6), for kind: ptq."""

    latency_batches: int = Field(20, gt=0, description="dev batches timed for CPU latency, before and after")
    embeddings: bool = Field(False, description="also int8 embedding tables (weight-only, per row); P1: Linear only")


class OneShotConfig(Section):
    """One-shot magnitude pruning of a finished run without retraining (P1 A.3, Figure 7), for kind: oneshot. The
    dense model (0%) is always evaluated too."""

    sparsities: list[float] = Field([round(0.05 * k, 2) for k in range(1, 13)], min_length=1,
                                    description="fractions of the prunable weights to prune, each evaluated; "
                                    "default P1's 5%, 10%, ..., 60%")

    @field_validator("sparsities")
    @classmethod
    def _fractions(cls, sparsities):
        if not all(0 < s < 1 for s in sparsities) or len(set(sparsities)) < len(sparsities):
            raise ValueError("distinct fractions in (0, 1), e.g. [0.05, 0.1, 0.6] (0, the dense model, is always "
                             "evaluated)")
        return sorted(sparsities)


class CoFiConfig(Section):
    """CoFi structured pruning with distillation (METHODS.md section 5), for kind: cofi (alias: structured). `model`
    is the teacher (a finished fine-tuning checkpoint); the student starts as a copy of it. flatray.methods.cofi
    reads this section as it is."""

    target_sparsity: float = Field(0.95, gt=0, lt=1)
    prune_epochs: int = Field(20, gt=0, description="epochs of distillation with L0 masks and the Lagrangian")
    finetune_epochs: int = Field(20, ge=0, description="epochs of fine-tuning the physically pruned student")
    ramp_fraction: float = Field(0.5, gt=0, le=1, description="part of the pruning phase over which the target ramps up")
    ramp_steps: int | None = Field(None, gt=0, description="steps of the ramp; default ramp_fraction x the pruning "
                                   "phase's steps")
    alpha_ce: float = Field(1.0, ge=0, description="weight of the KL distillation (temperature T)")
    alpha_layer: float = Field(0.0, ge=0, description="weight of the hidden-state distillation (CoFi scripts: 0.9)")
    temperature: float = Field(2.0, gt=0)
    droprate_init: float = Field(0.5, gt=0, lt=1, description="initial P(z = 0) of the FFN unit masks (the "
                                 "layer, head and hidden masks start kept, as in CoFi's code)")
    lr_masks: float = Field(0.01, gt=0, description="lr of log_alpha (CoFi's reg_learning_rate)")
    lr_lambdas: float = Field(0.01, gt=0, description="lr of the Lagrange multipliers")
    mask_beta1: float = Field(0.0, ge=0, lt=1, description="Adam's beta1 for the masks and multipliers (CoFi's "
                              "code: 0.9, which makes the sparsity overshoot the target and oscillate)")
    sparsity_tolerance: float = Field(0.01, ge=0, lt=1, description="the run fails when the pruned model's sparsity "
                                      "is further than this from target_sparsity (P1: 95% accepted within 1%)")
    # The hard-concrete stretch and temperature (Louizos et al. 2018, as CoFi uses them): constants, not settings.
    limit_a: ClassVar[float] = -0.1
    limit_b: ClassVar[float] = 1.1
    beta: ClassVar[float] = 2.0 / 3.0


class SquatConfig(Section):
    """SQuAT and its baselines (METHODS.md sections 8 and 9, a reconstruction from P2's abstract), for kind: squat.
    `model` is the full-precision teacher (a finished fine-tuning checkpoint); the student starts as a copy of it.
    optimizer adam = LSQ-QAT; sam/asam with alternate: true = SQuAT; with alternate: false = joint SAM + LSQ."""

    weight_bits: int = Field(4, description="2, 3, 4 or 8")
    act_bits: int | None = Field(8, description="input activations of the quantized Linears; null = full precision")
    symmetric: bool = Field(False, description="weights in +-(2^(b-1) - 1) (ternary at 2 bits) instead of [-2^(b-1), 2^(b-1) - 1]")
    embedding_bits: int | None = Field(None, description="null = full-precision embeddings, or 8")
    layers: Literal["encoder", "encoder+pooler"] = "encoder"
    init_scale: float = Field(1.0, gt=0, description="multiplies LSQ's step-size init 2 mean|v| / sqrt(Q_P)")
    alternate: bool = True
    period: int = Field(1, ge=1, description="optimizer steps per phase of the alternation (k)")
    lr_steps: float = Field(1e-3, gt=0, description="lr of the step sizes (the latent weights use train.lr)")
    task_loss: float = Field(0.0, ge=0, description="weight of the task loss on the labels")
    kd_logits: float = Field(1.0, ge=0, description="weight of the logit distillation from the teacher")
    kd_hidden: float = Field(0.0, ge=0, description="weight of the hidden-state MSE to the teacher")
    kd_attention: float = Field(0.0, ge=0, description="weight of the attention-probability MSE to the teacher")
    kd_temperature: float = Field(1.0, gt=0)

    @field_validator("weight_bits")
    @classmethod
    def _bits(cls, bits):
        if bits not in (2, 3, 4, 8):
            raise ValueError("2, 3, 4 or 8")
        return bits

    @field_validator("act_bits", "embedding_bits")
    @classmethod
    def _act_bits(cls, bits):
        if bits is not None and not 2 <= bits <= 8:
            raise ValueError("null or 2 to 8")
        return bits

    @model_validator(mode="after")
    def _some_loss(self):
        if not (self.task_loss or self.kd_logits or self.kd_hidden or self.kd_attention):
            raise ValueError("at least one of task_loss, kd_logits, kd_hidden, kd_attention above 0")
        return self


class ContourConfig(Section):
    """Loss contours (P1 A.2, Figure 6; flatray.methods.contour), for kind: contour: the loss on the plane through
    `model` (w_init, the pretrained weights) and two fine-tuned checkpoints, one surface per checkpoint's head."""

    models: list[str] = Field(default_factory=list, description="the two fine-tuned checkpoints (w_adam, w_sam); in a "
                              "sweep, the checkpoints of the parent trials of its group (feed: group)")
    labels: list[str] = Field(default_factory=list, description="their names (a sweep: the parents' optimizer.name); "
                              "the plane's first axis points to the first")
    grid: int = Field(11, ge=2, le=201, description="grid points per axis")
    margin: float = Field(0.3, ge=0, le=10, description="the grid's extent beyond the three points on each side, as a "
                          "fraction of theirs")
    samples: int = Field(256, gt=0, description="the loss is over the first `samples` examples of `split`")
    split: Literal["train", "dev"] = Field("train", description="train, or the task's first dev split")
