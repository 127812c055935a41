"""The vocabulary: every word a spec may use for data, gradient treatment, methods and stages, as `StrEnum`s.

`Split` names data (what a document is); `MaskMode` names how one optimizer step treats the forget slice.
"""

from __future__ import annotations

import enum


class Split(enum.StrEnum):
    """What a document is (its true label)."""

    RETAIN = "retain"
    FORGET = "forget"
    ADJACENT = "adjacent"


class MaskMode(enum.StrEnum):
    """The label applied to one optimizer step, which decides how masking treats it."""

    DEFAULT = "default"  # unlabelled: ordinary training, every parameter learns
    RETAIN = "retain"  # forward with the forget slice zeroed: the forget slice gets no gradient
    FORGET = "forget"  # strategy-specific: only the forget slice learns (SGTM), or retain paths are cut (GR, AM)


class Strategy(enum.StrEnum):
    """How forget data is localized (docs/method.md §5)."""

    NONE = "none"  # a clean model: stock forward, no gradient surgery
    SGTM = "sgtm"  # parameter-gradient masking, down-projections and their biases included
    GRADIENT_ROUTING = "gradient_routing"  # retain activations detached on forget steps
    ACTIVATION_MASKING = "activation_masking"  # retain activations zeroed on forget steps
    SGTM_JOINT_PROJECTION = "sgtm_joint_projection"  # c_proj and out_proj are joint (paper App. A)
    SGTM_JOINT_MLP_PROJECTION = "sgtm_joint_mlp_projection"  # only c_proj is joint
    SGTM_JOINT_ATTN_PROJECTION = "sgtm_joint_attn_projection"  # only out_proj is joint
    SGTM_JOINT_ATTENTION = "sgtm_joint_attention"  # stock attention; MLP masked on c_fc only (Memorization Sinks-like)


class OptimizerKind(enum.StrEnum):
    MASK_AWARE = "mask_aware"  # masked coordinates keep weight, both moments and step count bit-identical
    LEGACY = "legacy"  # one AdamW over everything: the paper's runs (zeroed grads still move weights)


class AblationKind(enum.StrEnum):
    ZERO = "zero"  # the paper: the forget slice set to 0 (a stationary point for fine-tuning)
    REINIT = "reinit"  # re-drawn from N(0, std of the matching retain slice): a stronger attacker's start


class AttackData(enum.StrEnum):
    """What the fine-tuning attacker trains on (docs/method.md §12)."""

    MIXTURE = "mixture"  # every train split, forget upsampled, one split per step (the paper)
    FORGET_ONLY = "forget_only"  # forget train documents only


class NoiseModel(enum.StrEnum):
    PRECISION_RECALL = "precision_recall"
    TPR_FPR = "tpr_fpr"


class NoiseGranularity(enum.StrEnum):
    DOCUMENT = "document"  # one fixed label per document for the whole run (a deterministic classifier)
    BATCH = "batch"  # re-drawn per logical batch every epoch (paper parity)


class FalsePositiveSource(enum.StrEnum):
    """Which non-forget data the labelling classifier flags as forget by mistake."""

    RETAIN_AND_ADJACENT = "retain_and_adjacent"  # uniformly over all negatives (a rate-like classifier)
    ADJACENT_FIRST = "adjacent_first"  # adjacent data first, retain only once adjacent is used up
    ADJACENT_ONLY = "adjacent_only"  # the reference: adjacent data only; the count saturates there


class FilterKind(enum.StrEnum):
    NONE = "none"  # train on everything
    WEAK = "weak"  # drop documents labelled forget
    STRICT = "strict"  # drop documents labelled forget and every adjacent document


class FilterMatching(enum.StrEnum):
    COMPUTE = "compute"  # same optimizer-step count: dropped data is replaced by more of the rest (Wikipedia)
    EPOCH = "epoch"  # dropped steps are skipped; the LR schedule still spans them (TinyStories)


class Device(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(enum.StrEnum):
    AUTO = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    FP32 = "fp32"
    BF16 = "bf16"


class StageKind(enum.StrEnum):
    TRAIN = "train"
    ABLATE = "ablate"
    EVALUATE = "evaluate"
    ATTACK = "attack"
    RMU = "rmu"
