"""A fused output-projection + cross-entropy for CPU training.

At the paper's small shapes the vocabulary dominates: the 8M TinyStories model spends 6.4M of its 7.7M parameters
in the (tied) embedding, and a [tokens, 50257] logit matrix is ~400 MB per 2k tokens. The stock path (addmm,
log_softmax, nll_loss, then their backwards) makes several full passes over that matrix and zero-fills another.
This one makes the minimum: the matmul writes the logits, one exp pass turns them into unnormalized probabilities
in place, and the backward scales them in place into the logit gradient (softmax - onehot) / N. The loss is
computed from the log-sum-exp, not from log(prob), so it stays exact for very unlikely targets (ablated models).

Where the engine's C kernels are available (cpu_kernels.py), the elementwise passes are one C pass per row while the
row is in cache (kernels/cross_entropy.c), and the logit matrix lives in one reused workspace: a fresh 400 MB buffer
per step costs a page fault per 4 KB under the C library's default allocator (~0.15 s per step at the 8M shape).

The saved buffer is overwritten by the backward, so the graph can be backpropagated once (as training does).
Evaluation uses the same kernel pass without a graph (`token_losses`: per-position loss and top-1 correctness).
"""

from __future__ import annotations

import weakref

import torch

from sgtm_engine.model import cpu_kernels


class _Token:
    """Held by one graph's autograd context while it owns the workspace; dies with the graph."""


class _Workspace:
    """One grow-only logit buffer, lent to one graph at a time from its forward to the end of its backward.

    A second forward while a graph still owns it (two graphs alive at once) gets a fresh buffer instead; a graph
    dropped without a backward frees its token, which returns the buffer.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._owner: weakref.ref[_Token] | None = None

    def take(self, rows: int, cols: int, token: _Token) -> torch.Tensor:
        if self._owner is not None and self._owner() is not None:
            return torch.empty(rows, cols)
        if self._buffer is None or self._buffer.numel() < rows * cols:
            self._buffer = None  # free the old one before allocating the larger one
            self._buffer = torch.empty(rows * cols)
        self._owner = weakref.ref(token)
        return self._buffer[: rows * cols].view(rows, cols)

    def give_back(self, token: _Token) -> None:
        if self._owner is not None and self._owner() is token:
            self._owner = None


_workspace = _Workspace()


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _kernel_forward(lib, hidden, weight, bias, labels, ignore_index: int, token: _Token, want_max: bool):
    """The C path's forward: logits into the workspace (lent to `token`), then one kernel pass per row. Returns
    (unnormalized probabilities [N, V], target logit, row sum, log-sum-exp, row max or None), the last four [N]."""
    N, V = hidden.shape[0], weight.shape[0]
    probs = torch.mm(hidden, weight.t(), out=_workspace.take(N, V, token))
    bias_c = bias.contiguous() if bias is not None else None
    target, row_sum, lse = hidden.new_empty(N), hidden.new_empty(N), hidden.new_empty(N)
    row_max = hidden.new_empty(N) if want_max else None
    args = (probs.data_ptr(), V, _ptr(bias_c), labels.data_ptr(), ignore_index, target.data_ptr(),
            row_sum.data_ptr(), lse.data_ptr(), _ptr(row_max))
    cpu_kernels.parallel(lambda _, lo, hi: lib.sgtm_ce_forward(*args, lo, hi), N)
    return probs, target, row_sum, lse, row_max


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int):  # type: ignore[override]
        # hidden [N, d], weight [V, d], bias [V] or None, labels [N]
        lib = cpu_kernels.for_tensor(hidden)
        valid = labels != ignore_index
        count = valid.sum().clamp(min=1)
        ctx.has_bias, ctx.ignore_index, ctx.lib, ctx.token = bias is not None, ignore_index, lib, None
        if lib is None:
            logits = torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()
            safe = torch.where(valid, labels, torch.zeros_like(labels))
            target = logits.gather(1, safe[:, None]).squeeze(1)
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: unnormalized probabilities
            row_sum = probs.sum(dim=1)
            lse = row_max.squeeze(1) + row_sum.log()
            labels = safe
        else:
            ctx.token = _Token()
            labels = labels.contiguous()
            probs, target, row_sum, lse, _ = _kernel_forward(lib, hidden, weight, bias, labels, ignore_index,
                                                             ctx.token, want_max=False)
        loss = ((lse - target) * valid).sum() / count
        ctx.save_for_backward(hidden, weight, probs, row_sum, labels, valid, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        hidden, weight, probs, row_sum, labels, valid, count = ctx.saved_tensors
        row_grad = ((grad_loss / count) * valid.to(probs.dtype)).contiguous()  # [N]
        grad_bias = None
        if ctx.lib is None:
            grad_logits = probs.mul_((row_grad / row_sum)[:, None])  # softmax * grad, in place
            rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
            grad_logits.index_put_((rows, labels), -row_grad, accumulate=True)  # minus the one-hot
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_logits.sum(0)
        else:
            lib, (N, V) = ctx.lib, probs.shape
            want_bias = ctx.has_bias and ctx.needs_input_grad[2]
            partial = probs.new_zeros(cpu_kernels.threads_for(N), V) if want_bias else None
            args = (probs.data_ptr(), V, labels.data_ptr(), ctx.ignore_index, row_grad.data_ptr(), row_sum.data_ptr())

            def run(worker: int, lo: int, hi: int) -> int:
                return lib.sgtm_ce_backward(*args, None if partial is None else partial[worker].data_ptr(), lo, hi)

            cpu_kernels.parallel(run, N)
            grad_logits = probs
            grad_bias = partial.sum(0) if partial is not None else None
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ hidden if ctx.needs_input_grad[1] else None
        if ctx.token is not None:
            _workspace.give_back(ctx.token)
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T + bias) against labels, without keeping log-softmax."""
    d = hidden.shape[-1]
    return _LinearCrossEntropy.apply(hidden.reshape(-1, d), weight, bias, labels.reshape(-1), ignore_index)


@torch.no_grad()
def token_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                 ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Evaluation without the logits: per position, the cross-entropy and whether the target is a top-1 prediction
    (its logit equals the row's max; an exact tie counts as correct, where argmax would pick the lower index). None
    where the C kernels cannot run (then compute from the logits). Ignored positions get loss 0 and not correct."""
    lib = cpu_kernels.for_tensor(hidden)
    if lib is None:
        return None
    shape = labels.shape
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).contiguous()
    token = _Token()
    try:
        _, target, _, lse, row_max = _kernel_forward(lib, hidden, weight, bias, labels, ignore_index, token,
                                                     want_max=True)
    finally:
        _workspace.give_back(token)
    valid = labels != ignore_index
    return ((lse - target) * valid).view(shape), (valid & (target >= row_max)).view(shape)
