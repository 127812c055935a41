"""A GPT-Neo-compatible decoder on `scaled_dot_product_attention`, with SGTM masking as part of the forward.

Choices (docs/method.md §1, §5):
- Parameter names and shapes are those of `transformers.GPTNeoForCausalLM`, so state dicts move both ways.
- GPT-Neo's quirks: no 1/sqrt(head_dim) score scaling (`scale=1.0`), alternating global / local-window layers (a
  local layer sees the last `window_size` positions, itself included), `gelu_new`, tied input/output embeddings,
  LayerNorm eps 1e-5, no dropout. Plus the paper's optional output bias (`lm_head.bias`).
- Every variant is initialized identically: N(0, init_std) weights, zero biases, unit LayerNorms.
- The step's mode is an attribute of each block (`set_mode`), not a forward kwarg: torch.compile specializes one graph
  per mode. Masked activations are never written in place (SDPA saves its output for backward): retain mode and
  activation masking simply compute the surviving units/heads on parameter slices, which is exact (gelu_new(0) = 0,
  a zero head contributes nothing to out_proj) and cheaper than computing and zeroing. Gradient routing computes the
  retain units/heads without autograd, which is `.detach()` on them.
- The loss never builds the whole [tokens, vocab] logit matrix: the output head and the cross-entropy run over row
  chunks (`head_chunks`), which bounds the loss's transient memory. The chunk size depends on the device
  (`HEAD_CHUNK_LOGITS`): on CPU each piece stays under glibc's 32 MiB mmap ceiling, so a step does not page-fault
  fresh mappings for its logits; on an accelerator chunks stay few, because each adds its own full-size gradient
  of the tied embedding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sgtm_engine.config import MaskingSpec, MaskMode, ModelSpec, Strategy
from sgtm_engine.model.partition import BlockPlan, Partition

IGNORE_INDEX = -100
#: Logits per chunk of the output head when a loss is computed, by device type: 2^22 fp32 logits (16 MiB) on CPU,
#: 2^28 (1 GiB) elsewhere.
HEAD_CHUNK_LOGITS = {"cpu": 1 << 22}
HEAD_CHUNK_LOGITS_ELSEWHERE = 1 << 28


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-Neo's tanh approximation of GELU; gelu_new(0) == 0 exactly, which retain-mode masking relies on."""
    return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------------------------------------------------------------
# Attention


class SelfAttention(nn.Module):
    """GPT-Neo self-attention: q/k/v without bias, out_proj with bias, no score scaling."""

    def __init__(self, spec: ModelSpec, layer_type: str):
        super().__init__()
        d = spec.d_model
        self.n_head, self.head_dim = spec.n_head, spec.head_dim
        self.local = layer_type == "local"
        self.window = spec.window_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=True)
        self._mask_cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _window_mask(self, t: int, device: torch.device) -> torch.Tensor | None:
        """Boolean [T, T] mask (True = may attend) for local layers longer than the window, else None (causal)."""
        if not self.local or t <= self.window:
            return None
        key = (t, device)
        if key not in self._mask_cache:
            i = torch.arange(t, device=device)
            rel = i[:, None] - i[None, :]
            self._mask_cache[key] = (rel >= 0) & (rel < self.window)
        return self._mask_cache[key]

    def _heads(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Attention outputs of heads [lo, hi): (B, T, (hi-lo)*hs)."""
        B, T, _ = x.shape
        a, b = lo * self.head_dim, hi * self.head_dim
        q = F.linear(x, self.q_proj.weight[a:b]).view(B, T, hi - lo, self.head_dim)
        k = F.linear(x, self.k_proj.weight[a:b]).view(B, T, hi - lo, self.head_dim)
        v = F.linear(x, self.v_proj.weight[a:b]).view(B, T, hi - lo, self.head_dim)
        mask = self._window_mask(T, x.device)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        # GPT-Neo applies no 1/sqrt(hs) scaling
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=1.0)
        return o.transpose(1, 2).reshape(B, T, b - a)

    def forward(self, x: torch.Tensor, mode: MaskMode, plan: BlockPlan | None, strategy: Strategy) -> torch.Tensor:
        H = self.n_head
        if plan is None or not plan.mask_attention or mode == MaskMode.DEFAULT:
            return self.out_proj(self._heads(x, 0, H))
        r = plan.head_split
        cut = r * self.head_dim
        if mode == MaskMode.RETAIN:  # forget heads output zero: only the retain heads reach out_proj
            return F.linear(self._heads(x, 0, r), self.out_proj.weight[:, :cut], self.out_proj.bias)
        if strategy == Strategy.ACTIVATION_MASKING:  # forget mode, retain heads zeroed
            return F.linear(self._heads(x, r, H), self.out_proj.weight[:, cut:], self.out_proj.bias)
        if strategy == Strategy.GRADIENT_ROUTING:  # forget mode, retain heads detached (values unchanged)
            with torch.no_grad():
                kept = self._heads(x, 0, r)
            return self.out_proj(torch.cat([kept, self._heads(x, r, H)], dim=-1))
        return self.out_proj(self._heads(x, 0, H))  # SGTM forget mode: stock forward, surgery after backward


class Attention(nn.Module):
    """GPT-Neo wraps its self-attention as `attn.attention`; kept for identical parameter names."""

    def __init__(self, spec: ModelSpec, layer_type: str):
        super().__init__()
        self.attention = SelfAttention(spec, layer_type)


# ---------------------------------------------------------------------------------------------------------------------
# MLP and block


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.c_fc = nn.Linear(spec.d_model, spec.mlp_dim)
        self.c_proj = nn.Linear(spec.mlp_dim, spec.d_model)

    def forward(self, x: torch.Tensor, mode: MaskMode, plan: BlockPlan | None, strategy: Strategy) -> torch.Tensor:
        if plan is None or mode == MaskMode.DEFAULT or plan.mlp_split == self.c_fc.out_features:
            return self.c_proj(gelu_new(self.c_fc(x)))
        r = plan.mlp_split
        W1, b1, W2 = self.c_fc.weight, self.c_fc.bias, self.c_proj.weight
        if mode == MaskMode.RETAIN:  # forget units' pre-activations zeroed: gelu(0) = 0, so they drop out
            return F.linear(gelu_new(F.linear(x, W1[:r], b1[:r])), W2[:, :r], self.c_proj.bias)
        if strategy == Strategy.ACTIVATION_MASKING:
            return F.linear(gelu_new(F.linear(x, W1[r:], b1[r:])), W2[:, r:], self.c_proj.bias)
        if strategy == Strategy.GRADIENT_ROUTING:
            with torch.no_grad():
                kept = F.linear(x, W1[:r], b1[:r])
            h = torch.cat([kept, F.linear(x, W1[r:], b1[r:])], dim=-1)
            return self.c_proj(gelu_new(h))
        return self.c_proj(gelu_new(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)
        self.attn = Attention(spec, spec.layer_types[layer])
        self.ln_2 = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)
        self.mlp = MLP(spec)
        self.plan: BlockPlan | None = None
        self.strategy = Strategy.NONE
        self.mode = MaskMode.DEFAULT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.attention(self.ln_1(x), self.mode, self.plan, self.strategy)
        return x + self.mlp(self.ln_2(x), self.mode, self.plan, self.strategy)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, spec.d_model)
        self.wpe = nn.Embedding(spec.context, spec.d_model)
        self.h = nn.ModuleList([Block(spec, i) for i in range(spec.n_layer)])
        self.ln_f = nn.LayerNorm(spec.d_model, eps=spec.layer_norm_eps)


# ---------------------------------------------------------------------------------------------------------------------
# The causal LM


class GPTNeoLM(nn.Module):
    """The causal LM. `forward(input_ids)` returns (logits, None), `forward(input_ids, labels)` (None, loss); the step's
    mode comes from `set_mode`."""

    def __init__(self, spec: ModelSpec, masking: MaskingSpec | None = None, vocab_size: int | None = None):
        super().__init__()
        vocab = vocab_size or spec.vocab_size
        if vocab is None:
            raise ValueError("GPTNeoLM needs a vocab_size: set ModelSpec.vocab_size or pass vocab_size")
        self.spec = spec
        self.vocab_size = vocab
        self.masking = masking or MaskingSpec(strategy=Strategy.NONE)
        self.transformer = Transformer(spec, vocab)
        self.lm_head = nn.Linear(spec.d_model, vocab, bias=spec.output_bias)
        self.lm_head.weight = self.transformer.wte.weight  # tied
        self.partition = Partition(spec, self.masking)
        for i, block in enumerate(self.transformer.h):
            block.plan = self.partition.blocks.get(i)
            block.strategy = self.masking.strategy
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-Neo's init for every variant: N(0, std) weights, zero biases, unit LayerNorms."""
        std = self.spec.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head:
                    continue  # tied to wte; only its bias is its own
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)

    # -- mode ---------------------------------------------------------------------------------------------------------

    def set_mode(self, mode: MaskMode) -> None:
        """The applied label of the current step; a clean model (strategy none) treats every mode as default."""
        mode = MaskMode(mode)
        for block in self.transformer.h:
            block.mode = mode

    # -- forward ------------------------------------------------------------------------------------------------------

    def hidden_states(self, input_ids: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """Residual stream after block `upto` (0-based; None = after ln_f). For RMU and probes."""
        T = input_ids.shape[1]
        if T > self.spec.context:
            raise ValueError(f"sequence length {T} exceeds the model context {self.spec.context}")
        pos = torch.arange(T, device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x)
            if upto is not None and i == upto:
                return x
        return self.transformer.ln_f(x)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, V), None); with `labels` (aligned to positions, -100 ignored) (None, the mean CE in fp32).

        With labels the logits are not returned: the loss is summed over `head_chunks` and divided by the target
        tokens, the same token-weighted mean stock GPT-Neo's cross-entropy takes over the whole matrix. The loss is
        computed from fp32 logits, as stock GPT-Neo does, so bf16 autocast changes only the matmuls.
        """
        hidden = self.hidden_states(input_ids)
        if labels is None:
            return self.lm_head(hidden), None
        total = hidden.new_zeros((), dtype=torch.float32)
        for logits, targets in self.head_chunks(hidden, labels):
            total = total + F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        return None, total / (labels != IGNORE_INDEX).sum()

    def head_chunks(self, hidden: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The output head over consecutive row chunks of the flattened positions: (fp32 logits [rows, V], labels
        [rows]) with at most `HEAD_CHUNK_LOGITS` logits each, computed as the caller takes them."""
        budget = HEAD_CHUNK_LOGITS.get(hidden.device.type, HEAD_CHUNK_LOGITS_ELSEWHERE)
        rows = max(1, budget // self.vocab_size)
        flat_hidden, flat_labels = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
        for h, y in zip(flat_hidden.split(rows), flat_labels.split(rows), strict=True):
            yield self.lm_head(h).float(), y

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """6 * params (training FLOPs per token), the convention the paper's compute axes use."""
        return 6.0 * self.num_parameters()


def unwrap(model: nn.Module) -> GPTNeoLM:
    """The GPTNeoLM inside a DDP / torch.compile wrapper."""
    while not isinstance(model, GPTNeoLM):
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            raise TypeError(f"not a GPTNeoLM: {type(model).__name__}")
        model = inner
    return model

