"""Every method preset on the four Hugging Face architectures (configs, random weights):
quantize, run, save/load bit-identically, and export to ONNX that ONNX Runtime runs."""

import onnxruntime as ort
import pytest
import torch

import quantwise
from quantwise.export import export_onnx
import hf_models

METHOD_PRESETS = ("w4-gptq", "w4-awq", "w8a8-smoothquant", "w8a8-dynamic-smoothquant")


@pytest.mark.parametrize("preset", METHOD_PRESETS)
@pytest.mark.parametrize("name", ("gpt2", "llama", "vit", "bert"))
def test_method_presets_quantize_save_load_and_export(name, preset, tmp_path):
    model = hf_models.build(name)
    calib = [hf_models.example_inputs(name, seed) for seed in range(2)]
    qmodel = quantwise.quantize(model, preset, calib, progress=False)
    x = hf_models.example_inputs(name, 5)
    with torch.no_grad():
        out, ref = hf_models.main_output(qmodel(**x)), hf_models.main_output(model(**x))
    cos = float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    assert cos > (0.9 if "smoothquant" in preset else 0.6), cos
    folder = quantwise.save(qmodel, tmp_path / "q")
    with torch.no_grad():
        again = hf_models.main_output(quantwise.load(folder, model=hf_models.build(name, seed=3))(**x))
    assert torch.equal(again, out)
    result = export_onnx(qmodel, calib[0], tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, feeds)[0])
    assert float((got - out).norm() / out.norm()) < 0.03
