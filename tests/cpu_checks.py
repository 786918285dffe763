"""Quality checks that must hold on every CPU; run by test_probe.py in this process and in a
subprocess with ONEDNN_MAX_CPU_ISA=AVX2 (oneDNN then takes the AVX2 code paths of CPUs without
VNNI, whatever this CPU has). Prints one JSON object: python tests/cpu_checks.py [--minilm]."""

from __future__ import annotations

import json
import sys
import warnings

import torch
from torch import nn

import quantwise
from quantwise.kernels.probe import isa_label, probe


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


def mlp_sqnr() -> float:
    """The w8a8 MLP of issue 14: Linear 256-1024-1024-256 with GELU and ReLU, random inputs."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 256)).eval()
    calib = [torch.randn(64, 256) for _ in range(8)]
    test = torch.randn(512, 256)
    q = quantwise.quantize(mlp, "w8a8", calib, progress=False)
    with torch.no_grad():
        return sqnr_db(mlp(test), q(test))


def extreme_linear_error() -> float:
    """Codes at the extremes (inputs 0 / 255, weights +-max), where int16 pair sums saturate.
    The quantization itself is lossless here, so the output must equal the float one."""
    torch.manual_seed(1)
    lin = nn.Linear(384, 64, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.where(torch.rand(64, 384) < 0.5, -1.0, 1.0))
    x = torch.where(torch.rand(32, 384) < 0.5, 0.0, 1.0)
    x[0] = 1.0  # the calibrated range is [0, 1]: codes 0 and 255
    model = nn.Sequential(lin)
    q = quantwise.quantize(model, "w8a8", [x], progress=False)
    assert quantwise.summary(q).quantized, "the Linear must be quantized"
    with torch.no_grad():
        ref, out = model(x), q(x)
    return float((out - ref).abs().max() / ref.abs().max())


def cnn_rel_err() -> float:
    """A small ResNet-style CNN (convs, residual adds) through the int8 graph path."""
    torch.manual_seed(2)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))) + x)

    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), Block(32), Block(32),
                        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), Block(64)).eval()
    calib = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    test = torch.randn(8, 3, 32, 32)
    q = quantwise.quantize(net, "w8a8", calib, progress=False)
    with torch.no_grad():
        ref, out = net(test), q(test)
    return float((out - ref).norm() / ref.norm())


def minilm_cosines() -> dict:
    from quantwise.data import corpus_split
    from quantwise.metrics import cosine_similarity
    from quantwise.models.minilm import load_minilm, load_tokenizer, tokenize

    model, tok = load_minilm(), load_tokenizer()
    calib = [tokenize(tok, corpus_split("calib")[i:i + 16]) for i in range(0, 64, 16)]
    held = tokenize(tok, corpus_split("heldout")[:128])
    with torch.no_grad():
        ref = model(**held)
    out = {}
    for preset in ("w8a8-dynamic", "w8a8-dynamic-smoothquant", "w8a8-smoothquant"):
        q = quantwise.quantize(model, preset, calib, progress=False)
        with torch.no_grad():
            cos = cosine_similarity(q(**held), ref)
        kernels = {r.kernel for r in quantwise.summary(q).quantized}
        out[preset] = {"mean": float(cos.mean()), "min": float(cos.min()),
                       "fallbacks": sum(r.kernel.startswith("float") for r in
                                        quantwise.summary(q).quantized),
                       "kernels": sorted(kernels)}
    return out


def main(argv: list[str]) -> dict:
    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    result = {"isa": isa_label(), "accumulation": probe().accumulation,
              "mlp_sqnr_db": mlp_sqnr(), "extreme_linear_rel_err": extreme_linear_error(),
              "cnn_rel_err": cnn_rel_err()}
    if "--minilm" in argv:
        result["minilm"] = minilm_cosines()
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
