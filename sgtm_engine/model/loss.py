"""A fused output-projection + cross-entropy for CPU training.

At the paper's small shapes the vocabulary dominates: the 8M TinyStories model spends 6.4M of its 7.7M parameters
in the (tied) embedding, and a [tokens, 50257] logit matrix is ~400 MB per 2k tokens. The stock path (addmm,
log_softmax, nll_loss, then their backwards) makes several full passes over that matrix and zero-fills another.
This one makes the minimum: the matmul writes the logits, one exp pass turns them into unnormalized probabilities
in place, and the backward scales them in place into the logit gradient (softmax - onehot) / N. The loss is
computed from the log-sum-exp, not from log(prob), so it stays exact for very unlikely targets (ablated models).

The saved buffer is overwritten by the backward, so the graph can be backpropagated once (as training does).
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index: int):  # type: ignore[override]
        # hidden [N, d], weight [V, d], bias [V] or None, labels [N]
        logits = torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        target = logits.gather(1, safe[:, None]).squeeze(1)
        row_max = logits.amax(dim=1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # in place: unnormalized probabilities
        row_sum = probs.sum(dim=1, keepdim=True)
        lse = row_max.squeeze(1) + row_sum.squeeze(1).log()
        count = valid.sum().clamp(min=1)
        loss = ((lse - target) * valid).sum() / count
        ctx.save_for_backward(hidden, weight, probs, row_sum, safe, valid, count)
        ctx.has_bias = bias is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        hidden, weight, probs, row_sum, safe, valid, count = ctx.saved_tensors
        scale = (grad_loss / count) * valid.to(probs.dtype)  # [N]
        grad_logits = probs.mul_(scale[:, None] / row_sum)  # softmax * scale, in place
        rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
        grad_logits.index_put_((rows, safe), -scale, accumulate=True)  # minus the one-hot
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad_logits.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of softmax(hidden @ weight.T + bias) against labels, without keeping log-softmax."""
    d = hidden.shape[-1]
    return _LinearCrossEntropy.apply(hidden.reshape(-1, d), weight, bias, labels.reshape(-1), ignore_index)
