"""quantwise.export.check on hand-made ONNX graphs: what ONNX Runtime fuses, and parity with torch.

The graphs are built here with onnx.helper, so these tests do not depend on the exporter.
"""

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import quantwise  # noqa: E402
from quantwise.errors import CheckpointError, DataLoadError  # noqa: E402
from quantwise.export.check import LAYER_OUTPUTS_KEY, fusion_report, parity  # noqa: E402

RNG = np.random.default_rng(0)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _save(tmp_path, nodes, inputs, inits, name="m", outputs=("y",), opset=18, meta=None):
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if meta:
        helper.set_model_props(model, meta)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _x(*shape):
    return [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]


def _qdq_act(src, dst, s, zp, tag):
    """src -> QuantizeLinear -> DequantizeLinear -> dst, qparams as initializers named after tag."""
    nodes = [helper.make_node("QuantizeLinear", [src, f"s_{tag}", f"zp_{tag}"], [f"{dst}_q"]),
             helper.make_node("DequantizeLinear", [f"{dst}_q", f"s_{tag}", f"zp_{tag}"], [dst])]
    return nodes, [_init(f"s_{tag}", np.float32(s)), _init(f"zp_{tag}", np.uint8(zp))]


def _qdq_conv(tmp_path, output_q=True):
    """The pattern ORT fuses into QLinearConv: DQ(uint8 x), DQ(int8 W, per-channel axis 0),
    DQ(int32 bias, scale s_in * s_w, zp 0) -> Conv -> Q -> DQ."""
    s_w = (RNG.random(4) * 0.01 + 0.005).astype(np.float32)
    nodes, inits = _qdq_act("x", "xd", 0.02, 128, "in")
    nodes += [helper.make_node("DequantizeLinear", ["W", "s_w", "zp_w"], ["Wd"], axis=0),
              helper.make_node("DequantizeLinear", ["B", "s_b", "zp_b"], ["Bd"], axis=0),
              helper.make_node("Conv", ["xd", "Wd", "Bd"], ["c" if output_q else "y"], pads=[1] * 4, name="conv0")]
    inits += [_init("W", RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)), _init("s_w", s_w),
              _init("zp_w", np.zeros(4, np.int8)), _init("B", RNG.integers(-500, 500, 4).astype(np.int32)),
              _init("s_b", (np.float32(0.02) * s_w).astype(np.float32)), _init("zp_b", np.zeros(4, np.int32))]
    if output_q:
        out_nodes, out_inits = _qdq_act("c", "y", 0.05, 128, "out")
        nodes, inits = nodes + out_nodes, inits + out_inits
    return _save(tmp_path, nodes, _x(1, 3, 8, 8), inits, name=f"qdq_conv_{output_q}")


def test_qdq_conv_runs_as_qlinearconv(tmp_path):
    rep = fusion_report(_qdq_conv(tmp_path))
    assert (rep.conv_int8, rep.conv_total) == (1, 1)
    assert rep.op_counts.get("com.microsoft.QLinearConv") == 1 and rep.float_compute == []
    assert rep.qdq_left == 1 and rep.input_quant == 1  # the output's DQ; the input's Q feeds it
    assert rep.matmul_total == 0
    assert rep.line().startswith("ONNX Runtime runs 1/1 convs as integer kernels (QLinearConv x1)")
    json.dumps(rep.to_dict())


def test_conv_without_output_q_stays_float(tmp_path):
    # ORT's QDQ Conv selector needs the output QuantizeLinear: without it the conv runs in float
    rep = fusion_report(_qdq_conv(tmp_path, output_q=False))
    assert (rep.conv_int8, rep.conv_total) == (0, 1)
    assert [op for _, op in rep.float_compute] == ["Conv"] and rep.qdq_left == 4


def test_float_conv_is_counted_under_its_nchwc_name(tmp_path):
    w, b = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32), np.zeros(8, np.float32)
    path = _save(tmp_path, [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1] * 4, name="conv0"),
                            helper.make_node("Relu", ["c"], ["y"])], _x(1, 3, 8, 8), [_init("W", w), _init("B", b)])
    rep = fusion_report(path)
    assert (rep.conv_int8, rep.conv_total) == (0, 1) and rep.qdq_left == 0
    assert len(rep.float_compute) == 1 and rep.float_compute[0][1] == "Conv"
    assert "com.microsoft.nchwc.Conv" in rep.op_counts  # what ORT_ENABLE_ALL makes of it on x86
    assert "0/1 convs" in rep.line() and "float: Conv x1" in rep.line()


def _qdq_matmul(tmp_path, bias=None, weight_zp=True):
    """DQ(uint8 x) and DQ(int8 W [K, N], per-channel axis 1) -> MatMul [+ Add bias], no output Q."""
    s_w = (RNG.random(8) * 0.01 + 0.005).astype(np.float32)
    nodes, inits = _qdq_act("x", "xd", 0.02, 128, "in")
    nodes += [helper.make_node("DequantizeLinear", ["W", "s_w"] + ["zp_w"] * weight_zp, ["Wd"], axis=1),
              helper.make_node("MatMul", ["xd", "Wd"], ["m" if bias else "y"], name="mm0")]
    inits += [_init("W", RNG.integers(-127, 128, (16, 8)).astype(np.int8)), _init("s_w", s_w),
              _init("zp_w", np.zeros(8, np.int8))]
    if bias == "int32":
        nodes += [helper.make_node("DequantizeLinear", ["B", "s_b"], ["Bd"], axis=0),
                  helper.make_node("Add", ["m", "Bd"], ["y"])]
        inits += [_init("B", RNG.integers(-500, 500, 8).astype(np.int32)), _init("s_b", np.float32(0.02) * s_w)]
    elif bias == "float":
        nodes.append(helper.make_node("Add", ["m", "Bf"], ["y"]))
        inits.append(_init("Bf", RNG.standard_normal(8).astype(np.float32)))
    return _save(tmp_path, nodes, _x(2, 4, 16), inits, name=f"mm_{bias}_{weight_zp}")


@pytest.mark.parametrize("bias, weight_zp, expected", [
    (None, True, "com.microsoft.MatMulIntegerToFloat"), (None, False, "com.microsoft.MatMulIntegerToFloat"),
    ("int32", True, "com.microsoft.QGemm"),  # MatMul + Add -> Gemm first, then QGemm (float output)
    ("int32", False, None),  # ORT's QGemm selector wants explicit zero points on its DQ inputs
    ("float", True, None)])  # a float bias Add blocks it too (it does not when a Q follows)
def test_qdq_matmul_without_output_q(tmp_path, bias, weight_zp, expected):
    rep = fusion_report(_qdq_matmul(tmp_path, bias, weight_zp))
    assert rep.matmul_total == 1
    if expected is None:  # float Gemm on dequantized values
        assert rep.matmul_int8 == 0 and [op for _, op in rep.float_compute] == ["Gemm"]
    else:
        assert rep.matmul_int8 == 1 and rep.op_counts.get(expected) == 1 and rep.float_compute == []
        assert rep.qdq_left == 0 and rep.input_quant == 1  # the input's QuantizeLinear feeds it


def test_weight_only_int4_and_activation_matmuls(tmp_path):
    k, n = 64, 32
    w = helper.make_tensor("W", TensorProto.INT4, [k, n], RNG.integers(-8, 8, k * n).tolist())
    nodes = [helper.make_node("DequantizeLinear", ["W", "s_w"], ["Wd"], axis=0, block_size=32),
             helper.make_node("MatMul", ["x", "Wd"], ["h"]),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["h", "ht"], ["y"])]  # activation x activation: not counted
    path = _save(tmp_path, nodes, _x(2, 4, k), [w, _init("s_w", np.full((k // 32, n), 0.01, np.float32))], opset=21)
    rep = fusion_report(path)
    assert (rep.matmul_int8, rep.matmul_total, rep.weight_only) == (1, 1, 1)
    assert rep.int8_products == {"MatMulNBits": 1} and sum(rep.act_matmul.values()) == 1
    assert "MatMulNBits x1 weight-only" in rep.line() and "activation x activation" in rep.line()


def test_unreadable_file_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="cannot load"):
        fusion_report(bad)
    with pytest.raises(CheckpointError, match="no ONNX file"):
        fusion_report(tmp_path / "missing.onnx")


# -- parity ---------------------------------------------------------------------------------------
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def qnet():
    torch.manual_seed(0)
    calib = [torch.randn(16, 3, 6, 6)]
    return quantwise.quantize(Net().eval(), "w8a8", calib_data=calib, progress=False), \
        [torch.randn(8, 3, 6, 6) for _ in range(3)]


def _qnet_onnx(tmp_path, q, scale=None, meta=True):
    """The QDQ graph of `q`, layer by layer from its buffers; scale = (layer, factor) perturbs
    that layer's weight scales. Layer outputs (before ReLU) are named in the metadata."""
    nodes, inits = [], []
    src = "x"
    for name, layer in (("conv", q.conv), ("fc", q.fc)):
        act, more = _qdq_act(src, f"{name}_in", float(layer.input_scale), int(layer.input_zero_point), name)
        w_scale = layer.weight_scale.numpy() * (scale[1] if scale and scale[0] == name else 1.0)
        codes = layer.codes().numpy()
        nodes += act
        inits += more + [_init(f"{name}_s_w", w_scale.astype(np.float32)), _init(f"{name}_b", layer.bias.numpy())]
        if name == "conv":
            inits.append(_init("conv_W", codes))
            nodes += [helper.make_node("DequantizeLinear", ["conv_W", "conv_s_w"], ["conv_Wd"], axis=0),
                      helper.make_node("Conv", ["conv_in", "conv_Wd", "conv_b"], ["conv_out"], pads=[1] * 4),
                      helper.make_node("Relu", ["conv_out"], ["r"]), helper.make_node("Flatten", ["r"], ["flat"])]
            src = "flat"
        else:
            inits.append(_init("fc_W", codes.T.copy()))
            nodes += [helper.make_node("DequantizeLinear", ["fc_W", "fc_s_w"], ["fc_Wd"], axis=1),
                      helper.make_node("MatMul", ["fc_in", "fc_Wd"], ["fc_mm"]),
                      helper.make_node("Add", ["fc_mm", "fc_b"], ["y"])]
    props = {LAYER_OUTPUTS_KEY: json.dumps({"conv": "conv_out", "fc": "y"})} if meta else None
    return _save(tmp_path, nodes, _x("N", 3, 6, 6), inits, name=f"qnet_{scale}", meta=props)


def test_parity_of_a_faithful_export(tmp_path, qnet):
    q, samples = qnet
    rep = parity(q, _qnet_onnx(tmp_path, q), samples)
    assert rep.ok and rep.samples == 3 and rep.rows == 24
    assert rep.max_rel_err < 1e-3 and rep.min_cosine > 0.9999 and rep.top1_agreement == 1.0
    assert [x.name for x in rep.layers] == ["conv", "fc"] and all(x.rel_err < 1e-3 for x in rep.layers)
    assert rep.first_jump is None and "OK" in rep.line()
    json.dumps(rep.to_dict())
    assert q.__dict__.get("forward") is not None  # the caller's model keeps its int8 graph path


@pytest.mark.parametrize("layer", ["conv", "fc"])
def test_parity_names_the_perturbed_layer(tmp_path, qnet, layer):
    q, samples = qnet
    rep = parity(q, _qnet_onnx(tmp_path, q, scale=(layer, 1.1)), samples)
    assert not rep.ok and 0.03 < rep.max_rel_err < 0.3
    assert rep.first_jump == layer
    errs = {x.name: x.rel_err for x in rep.layers}
    assert 0.05 < errs[layer] < 0.15  # a 10% weight-scale error
    if layer == "fc":
        assert errs["conv"] < 1e-3
    assert "first jump at layer " + layer in rep.line() and "**first jump**" in rep.table()


def test_parity_nan_fails_and_no_metadata_is_noted(tmp_path, qnet):
    q, samples = qnet
    rep = parity(q, _qnet_onnx(tmp_path, q, scale=("fc", float("nan")), meta=False), samples)
    assert not rep.ok and np.isnan(rep.max_rel_err) and rep.layers == [] and rep.first_jump is None
    assert any("no 'quantwise.layer_outputs'" in n for n in rep.notes)
    assert json.dumps(rep.to_dict())  # NaN written as a string, still JSON


def test_parity_dict_inputs_and_model_output(tmp_path):
    transformers = pytest.importorskip("transformers")

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 6)

        def forward(self, input_ids, attention_mask, token_type_ids=None):  # like BERT
            h = self.emb(input_ids) * attention_mask.unsqueeze(-1).float()
            return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=h)

    model = Tiny().eval()
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["e"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axis"], ["mu"]), helper.make_node("Mul", ["e", "mu"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["B", "S"]) for n in ("input_ids", "attention_mask")]
    inits = [_init("E", model.emb.weight.detach().numpy()), _init("axis", np.array([-1], np.int64))]
    path = _save(tmp_path, nodes, inputs, inits, name="tiny_bert")
    ids = torch.randint(0, 20, (2, 5))
    sample = {"input_ids": ids, "attention_mask": torch.ones(2, 5, dtype=torch.int32),  # cast to int64
              "token_type_ids": torch.zeros(2, 5, dtype=torch.long)}
    rep = parity(model, path, [sample])
    assert rep.ok and rep.max_rel_err < 1e-6 and rep.top1_agreement is None and rep.rows == 2
    assert any("token_type_ids" in n for n in rep.notes)
    with pytest.raises(DataLoadError, match="attention_mask"):
        parity(model, path, [{"input_ids": ids}])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.export's own deprecation noise
def test_parity_of_a_dynamo_export(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"], output_names=["y"], verbose=False)
    rep = parity(model, path, [x, (x * 2,)])  # a tensor and a one-tensor tuple
    assert rep.ok and rep.max_rel_err < 1e-5 and rep.top1_agreement == 1.0 and rep.samples == 2
