"""quantwise.metrics against float64 numpy references and hand-checked values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from quantwise.metrics import cosine_similarity, perplexity, relative_error, sqnr_db, top1_accuracy


def test_top1_accuracy_counts_argmax_hits():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((500, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 500)
    expect = float(np.mean(np.argmax(logits, axis=1) == labels))
    assert top1_accuracy(torch.from_numpy(logits), torch.from_numpy(labels)) == expect
    assert top1_accuracy(torch.eye(4), torch.arange(4)) == 1.0
    assert top1_accuracy(torch.eye(4), torch.zeros(4, dtype=torch.long)) == 0.25


def test_top1_accuracy_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="do not match"):
        top1_accuracy(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        top1_accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_cosine_similarity_per_row_in_float64():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 7, 64)).astype(np.float32)
    b = (a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    expect = (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))
    got = cosine_similarity(torch.from_numpy(a), torch.from_numpy(b))
    assert got.dtype == torch.float64 and got.shape == (3, 7)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12)


def test_cosine_similarity_edge_cases():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [1e-30, 0.0], [1.0, 0.0]])
    b = torch.tensor([[-1.0, -2.0], [0.0, 0.0], [3.0, 1.0], [1e-30, 0.0], [0.0, 5.0]])
    assert cosine_similarity(a, b).tolist() == pytest.approx([-1.0, 1.0, 0.0, 1.0, 0.0], abs=1e-15)
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_similarity(torch.zeros(2, 3), torch.zeros(3, 2))


def test_sqnr_db_matches_definition():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal(10_000).astype(np.float32)
    approx = (ref + 0.01 * rng.standard_normal(10_000)).astype(np.float32)
    r64, a64 = ref.astype(np.float64), approx.astype(np.float64)
    expect = 10 * np.log10(np.sum(r64**2) / np.sum((r64 - a64) ** 2))
    got = sqnr_db(torch.from_numpy(ref), torch.from_numpy(approx))
    assert got == pytest.approx(expect, rel=1e-12)
    assert 39 < expect < 41  # noise 1/100 of the signal's amplitude: about 40 dB


def test_sqnr_db_edge_cases():
    x = torch.randn(10)
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert sqnr_db(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 0.9])) == pytest.approx(20.0)


def test_relative_error_matches_definition():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((20, 30))
    approx = ref + 0.05 * rng.standard_normal((20, 30))
    expect = np.linalg.norm(ref - approx) / np.linalg.norm(ref)
    got = relative_error(torch.from_numpy(ref), torch.from_numpy(approx))
    assert got == pytest.approx(expect, rel=1e-12)
    assert relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])) == pytest.approx(0.2)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.zeros(3), torch.ones(3)) == math.inf


def _ref_perplexity(logits: np.ndarray, labels: np.ndarray, ignore: int) -> float:
    nll, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            target = labels[b, t + 1]
            if target == ignore:
                continue
            row = logits[b, t].astype(np.float64)
            log_z = row.max() + np.log(np.sum(np.exp(row - row.max())))
            nll += log_z - row[target]
            count += 1
    return math.exp(nll / count)


def test_perplexity_shifts_labels_and_skips_ignored_tokens():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((3, 9, 17)) * 3).astype(np.float32)
    labels = rng.integers(0, 17, (3, 9))
    labels[0, 4] = labels[2, 8] = -100
    expect = _ref_perplexity(logits, labels, -100)
    got = perplexity(torch.from_numpy(logits), torch.from_numpy(labels))
    assert got == pytest.approx(expect, rel=1e-10)
    # An unshifted computation would differ: the shift is really done inside.
    assert got != pytest.approx(_ref_perplexity(logits[:, 1:], labels[:, 1:], -100), rel=1e-3)


def test_perplexity_of_uniform_and_perfect_predictions():
    labels = torch.randint(0, 10, (2, 6))
    assert perplexity(torch.zeros(2, 6, 10), labels) == pytest.approx(10.0)
    perfect = torch.full((1, 4, 5), -1e4)
    ids = torch.tensor([[0, 3, 1, 4]])
    perfect[0, torch.arange(3), ids[0, 1:]] = 1e4
    assert perplexity(perfect, ids) == pytest.approx(1.0)
    assert perplexity(torch.zeros(6, 10), labels[0]) == pytest.approx(10.0)  # unbatched


def test_perplexity_rejects_inputs_without_tokens_to_predict():
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(torch.zeros(2, 1, 5), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        perplexity(torch.zeros(1, 3, 5), torch.full((1, 3), -100))
    with pytest.raises(ValueError, match="expected logits"):
        perplexity(torch.zeros(2, 3, 5), torch.zeros(3, 2, dtype=torch.long))
