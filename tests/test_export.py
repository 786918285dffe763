"""ONNX QDQ export: the file checks, ONNX Runtime fuses it into integer kernels, and it computes
what the PyTorch quantized model computes (overall and per layer), at other batch sizes too."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import quantwise
from quantwise.export import export_onnx
from quantwise.export.check import fusion_report, parity
from quantwise.modules import QuantizedLayer
from small_models import MLP, MiniResNet, randomize_bn


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run(path, x):
    sess = _session(path)
    feeds = x if isinstance(x, dict) else {sess.get_inputs()[0].name: x}
    names = {i.name for i in sess.get_inputs()}
    return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = randomize_bn(MiniResNet())
    calib = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    return model, quantwise.quantize(model, "w8a8", calib, progress=False)


@pytest.fixture(scope="module")
def cnn_onnx(cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    return export_onnx(cnn[1], torch.randn(2, 3, 32, 32), path)


def test_cnn_every_conv_runs_as_an_integer_kernel(cnn_onnx):
    onnx.checker.check_model(str(cnn_onnx.path))
    report = fusion_report(cnn_onnx.path)
    assert report.conv_total == 6 and report.conv_int8 == 6, report.line()
    assert report.float_compute == [] or all("Conv" not in op for _, op in report.float_compute)
    assert report.int8_other.get("QLinearAdd", 0) >= 1, report.line()  # residual add stays int8


def test_cnn_matches_the_quantized_model_at_other_batch_sizes(cnn, cnn_onnx):
    model, qmodel = cnn
    for batch in (1, 2, 7):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref, fp32 = qmodel(x), model(x)
        got = _run(cnn_onnx.path, x)
        assert got.shape == ref.shape
        # ONNX Runtime requantizes each conv output once more than the fused PyTorch graph
        assert _rel(got, ref) < 0.02
        assert _rel(got, fp32) < 2 * _rel(ref, fp32) + 0.01


def test_cnn_parity_report_names_every_layer(cnn, cnn_onnx):
    meta = {p.key: p.value for p in onnx.load(str(cnn_onnx.path)).metadata_props}
    layers = json.loads(meta["quantwise.layer_outputs"])
    quantized = [n for n, m in cnn[1].named_modules() if isinstance(m, QuantizedLayer)]
    assert sorted(layers) == sorted(quantized)
    report = parity(cnn[1], cnn_onnx.path, [torch.randn(3, 3, 32, 32) for _ in range(2)])
    assert report.ok, report.line()
    assert [entry.name for entry in report.layers] == list(layers)
    assert max(entry.rel_err for entry in report.layers) < 0.02


def test_wrong_scale_is_caught_and_located(cnn, cnn_onnx, tmp_path):
    """A corrupted weight scale in the file: parity fails and names that layer first."""
    proto = onnx.load(str(cnn_onnx.path))
    target = next(i for i in proto.graph.initializer
                  if "block1" in i.name and "conv2" in i.name and i.name.endswith("w_scale"))
    values = onnx.numpy_helper.to_array(target) * 3
    target.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), target.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    report = parity(cnn[1], bad, [torch.randn(3, 3, 32, 32)])
    assert not report.ok
    assert report.first_jump == "block1.conv2"


@pytest.mark.parametrize("preset", ["w8a8-dynamic", "w8a8", "w4", "w8", "fp16"])
def test_mlp_presets_export_and_agree(preset, tmp_path):
    torch.manual_seed(0)
    model = MLP(widths=(64, 128, 128, 10)).eval()
    calib = [torch.randn(16, 64) for _ in range(3)]
    qmodel = quantwise.quantize(model, preset, calib, progress=False)
    result = export_onnx(qmodel, calib[0], tmp_path / "mlp.onnx")
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = qmodel(x)
    got = _run(result.path, x)
    tol = {"w4": 2e-2, "fp16": 1e-3}.get(preset, 1e-2)
    assert _rel(got, ref) < tol, preset
    ops = {k.split(".")[-1]: v for k, v in fusion_report(result.path).op_counts.items()}
    if preset == "w8a8-dynamic":
        assert ops.get("MatMulIntegerToFloat", 0) == 3
    if preset == "w4":
        assert ops.get("MatMulNBits", 0) == 3  # int4 weights stay packed at run time
    if preset == "w8a8":
        assert fusion_report(result.path).matmul_int8 == 3


def test_int4_file_is_small(tmp_path):
    torch.manual_seed(0)
    model = MLP(widths=(256, 512, 256)).eval()
    fp32 = sum(p.numel() * 4 for p in model.parameters())
    result = export_onnx(quantwise.quantize(model, "w4", progress=False), torch.randn(2, 256),
                         tmp_path / "w4.onnx")
    assert result.path.stat().st_size < 0.2 * fp32


def test_per_token_dynamic_is_exact_up_to_float_rounding(tmp_path):
    """Per-token scales: every row quantized on its own, rows with outliers included."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(96, 48))
    qmodel = quantwise.quantize(layer, "w8a8-dynamic", progress=False)
    path = export_onnx(qmodel, torch.randn(2, 7, 96), tmp_path / "tok.onnx").path
    x = torch.randn(3, 11, 96)
    x[0, 3] *= 1000  # an outlier token must not coarsen the other tokens
    x[1, 4] = 0.0    # an all-zero token
    with torch.no_grad():
        ref = qmodel(x)
    got = _run(path, x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
@pytest.mark.parametrize("opset", [17, 20])
def test_dynamic_linears_are_one_fused_integer_gemm(granularity, opset, tmp_path):
    """Each dynamic Linear is one com.microsoft MatMulIntegerToFloat on the N-D input (row
    scales applied in the kernel, no Reshape that would hide the rank from ONNX Runtime's
    fusions), its bias a separate Add (the kernel would scale it by the row scale), and the
    file computes what the PyTorch model does."""
    from quantwise.config import Config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    cfg = Config.from_dict({"default": {"weight": {"format": "int8"}, "dynamic": True,
                                        "activation": {"format": "int8", "symmetric": True,
                                                       "granularity": granularity}}})
    qmodel = quantwise.quantize(model, cfg, progress=False)
    path = export_onnx(qmodel, torch.randn(2, 5, 64), tmp_path / "d.onnx", opset=opset).path
    proto = onnx.load(str(path))
    kinds = [n.op_type for n in proto.graph.node]
    assert kinds.count("MatMulIntegerToFloat") == 2 and "MatMulInteger" not in kinds
    assert "Reshape" not in kinds and "Round" not in kinds
    x = torch.randn(3, 9, 64)
    x[1, 2] *= 300  # an outlier token
    with torch.no_grad():
        ref = qmodel(x)
    got = _run(path, x)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_refuses_bad_requests(cnn, tmp_path):
    model, qmodel = cnn
    with pytest.raises(quantwise.ModelLoadError, match="no quantized layer"):
        export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "f.onnx")
    with pytest.raises(quantwise.OutputPathError, match=".onnx"):
        export_onnx(qmodel, torch.randn(1, 3, 32, 32), tmp_path / "f.txt")
    existing = tmp_path / "exists.onnx"
    existing.write_bytes(b"keep me")
    with pytest.raises(quantwise.OutputPathError, match="overwrite"):
        export_onnx(qmodel, torch.randn(1, 3, 32, 32), existing)
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(quantwise.OutputPathError, match="does not exist"):
        export_onnx(qmodel, torch.randn(1, 3, 32, 32), tmp_path / "no" / "f.onnx")


def test_export_leaves_the_model_untouched(cnn, tmp_path):
    _, qmodel = cnn
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = qmodel(x)
    export_onnx(qmodel, x, tmp_path / "again.onnx")
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)


def test_rounding_spread_is_reported_when_the_gate_is_missed(cnn, cnn_onnx):
    """A strict gate fails; the report then says how far the model moves under float32-level
    noise by itself, and whether the export's difference is within that spread."""
    report = parity(cnn[1], cnn_onnx.path, [torch.randn(3, 3, 32, 32)], per_layer=False,
                    max_rel_err=1e-9)
    assert not report.ok
    assert report.rounding_spread is not None and 0 <= report.rounding_spread < 0.05
    assert ("within 1.2x" in report.line()) == report.within_spread
    assert report.to_dict()["within_rounding_spread"] == report.within_spread
    assert report.gate == "elementwise"  # no float model given: the caller's gate only


def test_rounding_spread_gate_needs_the_quality_of_the_pytorch_model(cnn, cnn_onnx, tmp_path,
                                                                     monkeypatch):
    """With the float model as reference, a missed elementwise gate is decided by the rule for
    models whose own rounding forbids elementwise agreement: error <= 1.2x the rounding spread
    AND quality vs fp32 within 0.002 of the PyTorch quantized model's; a file that computes
    something else fails it however wide the spread."""
    import quantwise.export.check as check

    model, qmodel = cnn
    x = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))]
    strict = parity(qmodel, cnn_onnx.path, x, per_layer=False, max_rel_err=1e-9, reference=model)
    assert strict.gate == "rounding spread" and strict.quality_metric == "top-1 agreement"
    assert strict.ok == (strict.within_spread and strict.quality_kept)
    assert "gate: rounding spread" in strict.line()
    assert abs(strict.quality_onnx - strict.quality_torch) <= 1 / 16  # the same predictions
    plain = parity(qmodel, cnn_onnx.path, x, per_layer=False, reference=model)
    assert plain.ok and plain.gate == "elementwise" and plain.rounding_spread is None
    torch.manual_seed(1)  # another network's file
    other = quantwise.quantize(randomize_bn(MiniResNet()), "w8a8",
                               [torch.randn(4, 3, 32, 32) for _ in range(2)], progress=False)
    wrong = export_onnx(other, x[0][:2], tmp_path / "other.onnx").path
    monkeypatch.setattr(check, "SPREAD_FACTOR", 1e12)  # within any spread...
    report = parity(qmodel, wrong, x, per_layer=False, reference=model)
    assert report.within_spread and not report.quality_kept and not report.ok  # ...not its quality
    assert report.quality_onnx < report.quality_torch - 0.002


def test_large_models_go_to_external_data(cnn, tmp_path, monkeypatch):
    """Past protobuf's 2 GB limit the weights go to a .data file beside the .onnx (threshold
    lowered here so a small model takes that path)."""
    from quantwise.export import onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 64 * 2 ** 20 + 1000)
    result = export_onnx(cnn[1], torch.randn(2, 3, 32, 32), tmp_path / "big.onnx")
    assert result.external_data
    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = cnn[1](x)
    assert _rel(_run(result.path, x), ref) < 0.02
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_int4_convs_and_embeddings_stay_int4_in_the_file(tmp_path):
    """4-bit weights that MatMulNBits does not cover go out as INT4 tensors (opset 21)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(512, 256), nn.Flatten(0, 0), nn.Linear(256, 8)).eval()
    qmodel = quantwise.quantize(model, "w4", progress=False)
    result = export_onnx(qmodel, torch.randint(0, 512, (2, 5)), tmp_path / "emb.onnx")
    assert result.opset == 21 and not result.notes
    proto = onnx.load(str(result.path))
    assert any(i.data_type == onnx.TensorProto.INT4 and list(i.dims) == [512, 256]
               for i in proto.graph.initializer)
    assert result.path.stat().st_size < 0.2 * 4 * (512 * 256 + 256 * 8)
    ids = torch.randint(0, 512, (3, 7))
    with torch.no_grad():
        ref = qmodel(ids)
    assert _rel(_run(result.path, ids), ref) < 0.02  # torch's int4 GEMM rounds inputs to bf16

    cnn = randomize_bn(MiniResNet())
    qcnn = quantwise.quantize(cnn, "w4", progress=False)
    result = export_onnx(qcnn, torch.randn(2, 3, 32, 32), tmp_path / "cnn4.onnx")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = qcnn(x)
    assert result.opset == 21 and _rel(_run(result.path, x), ref) < 0.02


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic"])
def test_opset_17_is_enough_for_8_bit(preset, tmp_path):
    torch.manual_seed(0)
    model = MLP(widths=(32, 64, 10)).eval()
    calib = [torch.randn(8, 32) for _ in range(2)]
    qmodel = quantwise.quantize(model, preset, calib, progress=False)
    result = export_onnx(qmodel, calib[0], tmp_path / "m17.onnx", opset=17)
    proto = onnx.load(str(result.path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert _rel(_run(result.path, x), qmodel(x)) < 1e-2
    with pytest.raises(quantwise.OutputPathError, match="opset"):
        export_onnx(qmodel, calib[0], tmp_path / "m16.onnx", opset=16)


def test_export_warns_where_onnx_runtime_saturates(tmp_path, monkeypatch):
    """ONNX Runtime's u8 x s8 kernels are measured (ort_exactness); where they only sum int16
    pairs, an export with 8-bit weight codes says so, and one with 7-bit codes does not."""
    from quantwise.export import ort_exactness
    from quantwise.kernels.probe import EXACT, INEXACT, PAIRS

    assert ort_exactness.ort_accumulation() in (EXACT, PAIRS, INEXACT)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    calib = [torch.randn(4, 16)]
    qmodel = quantwise.quantize(model, "w8a8", calib, progress=False)
    layer = qmodel[0]
    monkeypatch.setattr(ort_exactness, "ort_accumulation", lambda: PAIRS)
    wide = int(layer.codes().to(torch.int16).abs().max())
    note = ort_exactness.saturation_note(qmodel)
    assert (note is not None) == (wide > 64)
    if note:
        assert "7-bit weights" in note and "--weight-dtype uint8" in note
    with torch.no_grad():
        layer.weight.copy_(layer.weight.clamp(-64, 64))  # what quantize() makes on such a CPU
    assert ort_exactness.saturation_note(qmodel) is None
    result = export_onnx(qmodel, calib[0], tmp_path / "m.onnx")
    assert result.runtime_note is None and "runtime_note" in result.to_dict()


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-dynamic"])
def test_export_writes_exact_uint8_weights_where_onnx_runtime_saturates(preset, tmp_path, monkeypatch):
    """Where ONNX Runtime's u8 x s8 kernels only sum int16 pairs, "auto" writes the 8-bit
    weights as uint8 codes + 128 with zero point 128: the same values, run by its exact
    u8 x u8 kernels, still fused into integer ops, with the same outputs as the int8 file."""
    from quantwise.export import ort_exactness
    from quantwise.kernels.probe import PAIRS

    from quantwise import workflow

    torch.manual_seed(0)
    model = MLP().eval()
    calib = [torch.randn(8, 16) for _ in range(2)]
    monkeypatch.setattr(workflow, "weight_code_limit", lambda kind, bits: None)  # 8-bit codes,
    qmodel = quantwise.quantize(model, preset, calib, progress=False)  # as made on a VNNI CPU
    assert ort_exactness.widest_code(qmodel) > 64
    signed = export_onnx(qmodel, calib[0], tmp_path / "s8.onnx", weight_dtype="int8")
    signed_exact = ort_exactness.ort_accumulation() == "exact"  # this CPU's, before faking PAIRS
    monkeypatch.setattr(ort_exactness, "ort_accumulation", lambda: PAIRS)
    if not ort_exactness.ort_unsigned_exact():
        pytest.skip("ONNX Runtime's u8 x u8 MatMulInteger is not exact on this CPU either")
    result = export_onnx(qmodel, calib[0], tmp_path / "u8.onnx")
    assert result.weight_dtype == "uint8" and "u8 x u8" in result.runtime_note
    assert signed.weight_dtype == "int8"
    proto = onnx.load(str(result.path))
    kinds = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in proto.graph.initializer
             if len(t.dims) == 2}
    assert np.dtype(np.uint8) in kinds and np.dtype(np.int8) not in kinds
    fused_s8, fused_u8 = fusion_report(signed.path), fusion_report(result.path)
    assert fused_u8.line() == fused_s8.line() and fused_u8.matmul_int8 == fused_u8.matmul_total > 0
    x = torch.randn(16, 16)
    a, b = _run(signed.path, x), _run(result.path, x)
    with torch.no_grad():
        ref = qmodel(x)
    if signed_exact:
        assert np.array_equal(a, b)
    else:  # a real CPU without VNNI: the int8 file saturates, the uint8 one is the exact one
        assert _rel(b, ref) <= _rel(a, ref)
    assert _rel(b, ref) < 1e-2


def test_export_refuses_an_unknown_weight_dtype(tmp_path):
    qmodel = quantwise.quantize(MLP().eval(), "w8a8", [torch.randn(8, 16)], progress=False)
    with pytest.raises(quantwise.ConfigError, match="weight_dtype"):
        export_onnx(qmodel, torch.randn(2, 16), tmp_path / "m.onnx", weight_dtype="u4")
    assert not (tmp_path / "m.onnx").exists()


def test_openvino_runs_the_exported_convs_in_int8(cnn, cnn_onnx):
    """OpenVINO's CPU plugin reads the QDQ file: its runtime model says every conv runs in
    int8, and its output agrees with the PyTorch quantized model."""
    pytest.importorskip("openvino")
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):  # OpenVINO bundles oneDNN: under the cap on an
        pytest.skip("OpenVINO under ONEDNN_MAX_CPU_ISA")  # AVX-512 CPU it refuses float graphs
    import openvino as ov

    from quantwise.export.openvino import openvino_report, report_from_compiled

    report = openvino_report(cnn_onnx.path)
    assert report.conv_total == 6 and report.conv_int8 == 6, report.line()
    assert "6/6 convs" in report.line() and report.to_dict()["conv_int8"] == 6
    core = ov.Core()
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    compiled = core.compile_model(str(cnn_onnx.path), "CPU")
    assert report_from_compiled(compiled).conv_int8 == 6
    x = torch.randn(3, 3, 32, 32)
    got = torch.from_numpy(next(iter(compiled(x.numpy()).values())))
    with torch.no_grad():
        ref = cnn[1](x)
    assert _rel(got, ref) < 0.02
