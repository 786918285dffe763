"""Pure metric functions on tensors: accuracy, similarity and error of a quantized output.

Everything is computed in float64 so the metric does not add its own rounding to the error it
measures.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def top1_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction (0..1) of rows whose largest logit is at the label.

    `logits` is (..., classes) and `labels` holds integer class indices of shape logits.shape[:-1].

    Example:
        >>> top1_accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        0.5
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"top1_accuracy: labels of shape {tuple(labels.shape)} do not match "
                         f"logits of shape {tuple(logits.shape)} "
                         f"(expected {tuple(logits.shape[:-1])})")
    if labels.numel() == 0:
        raise ValueError("top1_accuracy: no samples")
    hits = logits.argmax(dim=-1) == labels.to(logits.device)
    return float(hits.double().mean())


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64 cosine similarity of each row (over the last dim); shape a.shape[:-1].

    Two all-zero rows count as identical (1.0); a zero row against a non-zero one gives 0.0.

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        >>> cosine_similarity(a, torch.tensor([[2.0, 0.0], [1.0, -1.0]]))
        tensor([1., 0.], dtype=torch.float64)
    """
    _same_shape(a, b, "cosine_similarity")
    a, b = a.detach().double(), b.detach().double()
    dot = (a * b).sum(dim=-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    both_zero = (a == 0).all(dim=-1) & (b == 0).all(dim=-1)
    cos = torch.where(norms > 0, dot / norms.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    # Rounding can push |cos| a hair past 1.
    return torch.where(both_zero, 1.0, cos).clamp(-1.0, 1.0)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 * log10(sum ref^2 / sum (ref - approx)^2), in dB.

    inf when approx equals reference exactly.

    Example:
        >>> round(sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])), 3)
        20.0
    """
    _same_shape(reference, approx, "sqnr_db")
    ref = reference.detach().double()
    noise = float(((ref - approx.detach().double()) ** 2).sum())
    if noise == 0.0:
        return math.inf
    signal = float((ref**2).sum())
    return -math.inf if signal == 0.0 else 10.0 * math.log10(signal / noise)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """||reference - approx|| / ||reference|| (Frobenius norms; 0 if equal, inf if ref is 0).

    Example:
        >>> relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]))
        0.2
    """
    _same_shape(reference, approx, "relative_error")
    ref = reference.detach().double()
    err = float((ref - approx.detach().double()).norm())
    if err == 0.0:
        return 0.0
    norm = float(ref.norm())
    return math.inf if norm == 0.0 else err / norm


def nll_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> tuple[float, int]:
    """Sum of the next-token negative log-likelihoods (nats, float64) and how many were predicted.

    Same shapes and shift as `perplexity`; summing per batch and dividing once at the end gives
    exactly the perplexity of all batches together without holding all logits.

    Example:
        >>> nll_sum(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]))[1]
        2
    """
    if logits.dim() == 2:
        logits, labels = logits.unsqueeze(0), labels.unsqueeze(0)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"perplexity: expected logits (batch, seq, vocab) and labels "
                         f"(batch, seq), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    pred = logits[:, :-1].detach().double().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1).to(device=pred.device, dtype=torch.long)
    count = int((target != ignore_index).sum())
    if count == 0:
        return 0.0, 0
    nll = F.cross_entropy(pred, target, ignore_index=ignore_index, reduction="sum")
    return float(nll), count


def perplexity(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> float:
    """Causal-LM perplexity: exp of the mean cross-entropy of predicting token t+1 from t.

    `logits` is (batch, seq, vocab) or (seq, vocab); `labels` the token ids, (batch, seq) or
    (seq,), unshifted: the shift by one happens here. Labels equal to `ignore_index` are skipped.

    Example:
        >>> uniform = torch.zeros(1, 5, 10)  # every token equally likely among 10
        >>> round(perplexity(uniform, torch.randint(0, 10, (1, 5))), 6)
        10.0
    """
    nll, count = nll_sum(logits, labels, ignore_index)
    if count == 0:
        raise ValueError("perplexity: no tokens to predict "
                         "(sequences shorter than 2, or all ignored)")
    return math.exp(nll / count)
