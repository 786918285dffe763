"""Hugging Face architectures built from configs (random weights) export to ONNX, pass the
parity check, and run at other batch sizes and sequence lengths."""

import onnx
import onnxruntime as ort
import pytest
import torch

import quantwise
from quantwise.export import export_onnx
from quantwise.export.check import fusion_report, parity
import hf_models

CASES = [("gpt2", "w8a8-dynamic"), ("llama", "w8a8-dynamic"), ("vit", "w8a8-dynamic"),
         ("gpt2", "w8a8"), ("llama", "w4"), ("vit", "w8a8"), ("bert", "w8a8")]


@pytest.mark.parametrize("name,preset", CASES)
def test_hf_models_export_and_pass_parity(name, preset, tmp_path):
    model = hf_models.build(name)
    calib = [hf_models.example_inputs(name, seed) for seed in range(3)]
    qmodel = quantwise.quantize(model, preset, calib, progress=False)
    result = export_onnx(qmodel, calib[0], tmp_path / f"{name}.onnx")
    onnx.checker.check_model(str(result.path))
    assert not result.notes, result.notes  # every layer exported in its own format
    assert result.opset == (21 if preset == "w4" else 20)  # int4 embeddings: INT4 tensors
    # w4: torch's int4 kernel rounds activations to bf16, ONNX Runtime's MatMulNBits does not
    tol = 0.03 if preset == "w4" else 1e-2
    report = parity(qmodel, result.path, [hf_models.example_inputs(name, 7)], max_rel_err=tol)
    assert report.ok, report.line()
    assert len(report.layers) == len(result.layers) > 0
    fusion = fusion_report(result.path)
    assert fusion.matmul_int8 == fusion.matmul_total > 0, fusion.line()
    # other batch size and sequence length than the export example
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = hf_models.example_inputs(name, 9)
    if name == "vit":
        x = {k: v.repeat(2, 1, 1, 1)[:3] for k, v in x.items()}
    else:
        x = {k: v[:, :11].repeat(3, 1) for k, v in x.items()}
    names = [i.name for i in sess.get_inputs()]
    got = torch.from_numpy(sess.run(None, {k: x[k].numpy() for k in names})[0])
    with torch.no_grad():
        ref = hf_models.main_output(qmodel(**x))
    assert got.shape == ref.shape
    assert float((got - ref).norm() / ref.norm()) < tol
