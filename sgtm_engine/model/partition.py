"""The partition table: which rows/columns of which tensors are the forget slice, and which are frozen when.

Built once from (ModelSpec, MaskingSpec) and used by the forward masking, the gradient surgery, the mask-aware
optimizer, ablation and analysis, so the rules live in one place (docs/method.md §3, §5).

Choices:
- In every masked block the retain dims come first and the forget dims are the contiguous tail (as the reference):
  MLP units [split, d_mlp) and heads [head_split, n_head) are forget. Each parameter is split along at most one dim,
  so any region is one contiguous slice: `Region.RETAIN` = [0, split), `Region.FORGET` = [split, n), `Region.ALL`.
- "Frozen" for a (strategy, mode) is exactly the set of coordinates whose gradient is zero by that rule: either
  structurally (zeroed or detached activations) or by SGTM's surgery. Zeroing those gradients is then the same
  operation for every strategy, and the mask-aware optimizer leaves exactly those coordinates bit-identical.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from sgtm_engine.config import MaskingSpec, MaskMode, ModelSpec, Strategy
from sgtm_engine.errors import ConfigError


class Region(enum.Enum):
    ALL = "all"
    RETAIN = "retain"
    FORGET = "forget"


@dataclass(frozen=True)
class ParamSlice:
    """How one parameter tensor is split: along `dim` at `split` (forget = the tail). dim None = not split."""

    name: str
    dim: int | None
    split: int
    size: int

    def bounds(self, region: Region) -> tuple[int, int]:
        if region is Region.RETAIN:
            return 0, self.split
        if region is Region.FORGET:
            return self.split, self.size
        return 0, self.size


@dataclass(frozen=True)
class BlockPlan:
    """What a masked block does: where its forget slice starts and which parts of it are masked."""

    layer: int
    mlp_split: int  # retain MLP units = [0, mlp_split)
    head_split: int  # retain heads = [0, head_split)
    mask_attention: bool  # False for the joint-attention variant: stock attention
    mlp_proj_forget: bool  # c_proj columns + bias belong to the forget/retain partition (False = joint)
    attn_proj_forget: bool  # out_proj columns + bias likewise


_PROJ_FLAGS: dict[Strategy, tuple[bool, bool, bool]] = {
    # strategy: (mask attention, c_proj partitioned, out_proj partitioned)
    Strategy.SGTM: (True, True, True),
    Strategy.GRADIENT_ROUTING: (True, True, True),
    Strategy.ACTIVATION_MASKING: (True, True, True),
    Strategy.SGTM_JOINT_PROJECTION: (True, False, False),
    Strategy.SGTM_JOINT_MLP_PROJECTION: (True, False, True),
    Strategy.SGTM_JOINT_ATTN_PROJECTION: (True, True, False),
    Strategy.SGTM_JOINT_ATTENTION: (False, False, False),
}

SGTM_FAMILY = frozenset({Strategy.SGTM, Strategy.SGTM_JOINT_PROJECTION, Strategy.SGTM_JOINT_MLP_PROJECTION,
                         Strategy.SGTM_JOINT_ATTN_PROJECTION, Strategy.SGTM_JOINT_ATTENTION})


class Partition:
    """The per-model partition table. `frozen(mode)` maps parameter name -> frozen Region for that step's mode."""

    def __init__(self, model: ModelSpec, masking: MaskingSpec):
        problems = masking.problems_with(model)  # the stage specs' own check, for a model built directly too
        if problems:
            raise ConfigError(problems)
        self.model = model
        self.masking = masking
        self.strategy = masking.strategy
        forget_mlp, forget_heads = masking.forget_sizes(model) if masking.strategy != Strategy.NONE else (0, 0)
        self.forget_mlp, self.forget_heads = forget_mlp, forget_heads
        self.blocks: dict[int, BlockPlan] = {}
        if masking.strategy != Strategy.NONE:
            attn, mlp_proj, attn_proj = _PROJ_FLAGS[masking.strategy]
            for i in masking.layers(model):
                self.blocks[i] = BlockPlan(i, model.mlp_dim - forget_mlp, model.n_head - forget_heads,
                                           attn and forget_heads > 0, mlp_proj, attn_proj and forget_heads > 0)
        self.slices: dict[str, ParamSlice] = {}
        for i, b in self.blocks.items():
            self._add_block_slices(i, b)
        self._frozen = {mode: self._build_frozen(mode) for mode in MaskMode}

    # -- the table ----------------------------------------------------------------------------------------------------

    def _add_block_slices(self, i: int, b: BlockPlan) -> None:
        m, d, hd = self.model.mlp_dim, self.model.d_model, self.model.head_dim
        pre = f"transformer.h.{i}"
        self.slices[f"{pre}.mlp.c_fc.weight"] = ParamSlice(f"{pre}.mlp.c_fc.weight", 0, b.mlp_split, m)
        self.slices[f"{pre}.mlp.c_fc.bias"] = ParamSlice(f"{pre}.mlp.c_fc.bias", 0, b.mlp_split, m)
        self.slices[f"{pre}.mlp.c_proj.weight"] = ParamSlice(f"{pre}.mlp.c_proj.weight", 1, b.mlp_split, m)
        if b.mask_attention:
            for p in ("q_proj", "k_proj", "v_proj"):
                name = f"{pre}.attn.attention.{p}.weight"
                self.slices[name] = ParamSlice(name, 0, b.head_split * hd, d)
            name = f"{pre}.attn.attention.out_proj.weight"
            self.slices[name] = ParamSlice(name, 1, b.head_split * hd, d)

    def _build_frozen(self, mode: MaskMode) -> dict[str, Region]:
        frozen: dict[str, Region] = {}
        if self.strategy == Strategy.NONE or mode == MaskMode.DEFAULT:
            return frozen
        for i, b in self.blocks.items():
            pre = f"transformer.h.{i}"
            mlp = [f"{pre}.mlp.c_fc.weight", f"{pre}.mlp.c_fc.bias"]
            qkv = [f"{pre}.attn.attention.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")] if b.mask_attention \
                else []
            c_proj, out_proj = f"{pre}.mlp.c_proj.weight", f"{pre}.attn.attention.out_proj.weight"
            if mode == MaskMode.RETAIN:
                # Forward zeroing of the forget units/heads: their in-rows, biases and out-columns see zero gradient.
                for n in mlp + qkv + [c_proj] + ([out_proj] if b.mask_attention else []):
                    frozen[n] = Region.FORGET
                continue
            # forget mode: the retain side of the in-projections never learns from forget data, for every strategy
            for n in mlp + qkv:
                frozen[n] = Region.RETAIN
            if self.strategy in SGTM_FAMILY:
                if b.mlp_proj_forget:
                    frozen[c_proj] = Region.RETAIN
                    frozen[f"{pre}.mlp.c_proj.bias"] = Region.ALL
                if b.attn_proj_forget:
                    frozen[out_proj] = Region.RETAIN
                    frozen[f"{pre}.attn.attention.out_proj.bias"] = Region.ALL
            elif self.strategy == Strategy.ACTIVATION_MASKING:
                # zeroed retain activations: the retain columns of the down-projections see a zero input
                frozen[c_proj] = Region.RETAIN
                if b.mask_attention:
                    frozen[out_proj] = Region.RETAIN
            if self.masking.masks_layernorms():
                for ln in ("ln_1", "ln_2"):
                    frozen[f"{pre}.{ln}.weight"] = Region.ALL
                    frozen[f"{pre}.{ln}.bias"] = Region.ALL
        if mode == MaskMode.FORGET and self.masking.mask_embeddings:
            # tied embeddings: this also freezes the unembedding; ln_f and the output bias stay joint (a small leak)
            frozen["transformer.wte.weight"] = Region.ALL
            frozen["transformer.wpe.weight"] = Region.ALL
        return frozen

    # -- queries ------------------------------------------------------------------------------------------------------

    def frozen(self, mode: MaskMode) -> dict[str, Region]:
        """Parameter name -> the region that must not change on a step of this mode."""
        return self._frozen[mode]

    def slice_of(self, name: str) -> ParamSlice | None:
        return self.slices.get(name)

    def ablation_targets(self) -> list[tuple[str, ParamSlice]]:
        """θ_forget as ablation zeroes it: in-rows and biases always; down-projection columns when partitioned.

        Gradient routing and the joint-projection variants keep their down-projection columns (the reference does the
        same): functionally identical after zeroing the in-rows, but not a stationary point for a later attack.
        """
        out = []
        for i, b in self.blocks.items():
            pre = f"transformer.h.{i}"
            names = [f"{pre}.mlp.c_fc.weight", f"{pre}.mlp.c_fc.bias"]
            if b.mask_attention:
                names += [f"{pre}.attn.attention.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
            keeps_down = self.strategy == Strategy.GRADIENT_ROUTING
            if b.mlp_proj_forget and not keeps_down:
                names.append(f"{pre}.mlp.c_proj.weight")
            if b.attn_proj_forget and not keeps_down:
                names.append(f"{pre}.attn.attention.out_proj.weight")
            out += [(n, self.slices[n]) for n in names]
        return out

    def describe(self) -> dict[str, object]:
        """A JSON-able summary for logs and result files."""
        return {
            "strategy": self.strategy.value,
            "masked_layers": sorted(self.blocks),
            "forget_mlp_units_per_block": self.forget_mlp,
            "forget_heads_per_block": self.forget_heads,
            "frozen_on_forget_steps": sorted(self._frozen[MaskMode.FORGET]),
        }
