import math

import pytest
import torch

import quantwise
from quantwise.evaluate import evaluate, median_latency_ms


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 20) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = TinyLM()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    ids = torch.randint(0, 20, (4, 9))
    result = evaluate(model, [ids, {"input_ids": ids}], "perplexity")
    assert math.isclose(result.value, 20.0, rel_tol=1e-5)


def test_cosine_and_sqnr_compare_with_the_reference():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).eval()
    data = [torch.randn(5, 6) for _ in range(3)]
    same = evaluate(model, data, "cosine", reference=model)
    assert same.value == pytest.approx(1.0) and same.details["min"] == pytest.approx(1.0)
    assert evaluate(model, data, "sqnr", reference=model).value == math.inf
    qmodel = quantwise.quantize(model, "w8a8", data, progress=False)
    sqnr = evaluate(qmodel, data, "sqnr", reference=model).value
    assert 25 < sqnr < math.inf  # int8: roughly 6 dB per bit, well above 25 dB here


def test_bad_metric_and_missing_reference_are_clear_errors():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(quantwise.QuantwiseError, match="valid metrics"):
        evaluate(model, [torch.randn(1, 2)], "accuracy")
    with pytest.raises(quantwise.QuantwiseError, match="reference"):
        evaluate(model, [torch.randn(1, 2)], "cosine")
    with pytest.raises(quantwise.CalibrationError, match="evaluation data is empty"):
        evaluate(model, [], "top1")


def test_latency_is_a_positive_median():
    model = torch.nn.Linear(4, 4)
    assert median_latency_ms(model, torch.randn(2, 4), warmup=1, runs=3) > 0
