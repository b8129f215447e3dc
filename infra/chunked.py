"""The vocabulary projection and cross-entropy a chunk of tokens at a time, for train.cross_entropy_sum: with a
150k-token vocabulary, an N x V logit tensor of a long micro-batch would otherwise take gigabytes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ChunkedCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk: d loss / d logits = softmax - one-hot, then
    d hidden = that @ W and d W += that^T @ hidden. The same three matmuls as plain autograd, with one chunk of
    logits alive at a time; backward only scales the stored gradients by the incoming one."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk: int, dtype: torch.dtype):
        w = weight.to(dtype)
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, len(targets), chunk):
            h, t = hidden[i:i + chunk].to(dtype), targets[i:i + chunk]
            logits = (h @ w.t()).float()
            loss += F.cross_entropy(logits, t, reduction="sum")
            grad_logits = logits.softmax(-1)
            grad_logits[torch.arange(len(t), device=t.device), t] -= 1
            grad_logits = grad_logits.to(dtype)
            grad_hidden[i:i + chunk] = grad_logits @ w
            grad_weight += (grad_logits.t() @ h).float()
        ctx.save_for_backward(grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None
