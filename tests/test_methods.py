"""GPTQ, AWQ, the block runner and the method presets (quantwise.methods)."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import quantwise
from quantwise.config import Config, weight_method_config
from quantwise.errors import ConfigError
from quantwise.methods import PRECOMPUTED_ATTR, apply_method
from quantwise.methods.awq import awq_scale_block
from quantwise.methods.blocks import BlockPass, BlockInput, find_blocks, run_blocks
from quantwise.methods.gptq import HessianAccumulator, gptq_quantize, output_error
from quantwise.methods.weights import rtn, weight_target
from quantwise.spec import PerChannel, PerGroup, QuantSpec

import hf_models

INT4_G32 = QuantSpec("int4", symmetric=True, granularity=PerGroup(32))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one thread avoids oversubscription on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _correlated_inputs(n: int, k: int, seed: int = 0, outliers: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(n, 8, generator=gen) @ torch.randn(8, k, generator=gen) + 0.3 * torch.randn(n, k, generator=gen) @ mix
    if outliers:
        x[:, :outliers] *= 20.0
    return x


def _layer(k: int = 128, out: int = 64, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, out)


def _errors(spec: QuantSpec, bits=None, **gptq_args):
    layer = _layer()
    x = _correlated_inputs(2048, 128)
    acc = HessianAccumulator(128)
    acc.add(x[:1024])
    acc.add(x[1024:])
    target = weight_target(layer, spec, bits)
    w = layer.weight.detach()
    q_rtn, _, _ = rtn(w, target)
    q_gptq, scale, zp = gptq_quantize(w, acc.value(), target, **gptq_args)
    err = lambda q: float((x @ (w - q).t()).norm())  # noqa: E731
    return err(q_rtn), err(q_gptq), q_gptq, scale, zp, target


def test_hessian_accumulator_is_2_x_xt_over_n():
    x = torch.randn(300, 16)
    acc = HessianAccumulator(16)
    for part in x.split(70):
        acc.add(part)
    torch.testing.assert_close(acc.value(), 2 * x.double().t() @ x.double() / 300, rtol=1e-5, atol=1e-6)


def test_hessian_accumulator_in_column_chunks_and_taken(monkeypatch):
    monkeypatch.setattr(HessianAccumulator, "CHUNK", 7)  # 16 columns: chunks of 7, 7, 2
    x = torch.randn(300, 16)
    acc = HessianAccumulator(16)
    for part in x.split(70):
        acc.add(part)
    h = acc.take()
    torch.testing.assert_close(h, 2 * x.double().t() @ x.double() / 300, rtol=1e-5, atol=1e-6)
    assert acc.h is None  # handed over: the accumulator no longer keeps it alive


@pytest.mark.parametrize("n", [1, 5, 300])
def test_symmetric_permutation_in_place_is_index_select(n):
    from quantwise.methods.gptq import _permute_symmetric_

    a = torch.randn(n, n, dtype=torch.float64)
    a = a + a.t()
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    expected = a.index_select(0, perm).index_select(1, perm)
    _permute_symmetric_(a, perm, rows=64)
    assert torch.equal(a, expected)


@pytest.mark.parametrize("args", [{}, {"act_order": True}, {"damp": 0.1}, {"damp": 0.0},
                                  {"act_order": True, "block_size": 32}])
def test_gptq_beats_rtn_on_correlated_inputs(args):
    e_rtn, e_gptq, q, scale, zp, target = _errors(INT4_G32, **args)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    # the dequantized weight is exactly (codes - zp) * scale on the int4 grid, per group of 32
    codes = torch.round(q.reshape(64, 4, 32) / scale.unsqueeze(-1)) + zp.unsqueeze(-1)
    assert codes.min() >= -8 and codes.max() <= 7
    torch.testing.assert_close((codes - zp.unsqueeze(-1)) * scale.unsqueeze(-1), q.reshape(64, 4, 32),
                               rtol=0, atol=0)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_in_place_hessian_gives_the_same_result(act_order):
    layer, x = _layer(), _correlated_inputs(512, 128)
    acc = HessianAccumulator(128)
    acc.add(x)
    target, w = weight_target(layer, INT4_G32), layer.weight.detach()
    h = acc.value().clone()
    copied = gptq_quantize(w, h, target, act_order=act_order)
    assert torch.equal(h, acc.value())  # not overwritten by default
    in_place = gptq_quantize(w, h, target, act_order=act_order, overwrite_h=True)
    for a, b in zip(copied, in_place):
        assert torch.equal(a, b)


def test_gptq_singular_hessian_is_damped_until_it_factorizes():
    # rank 8 inputs, no damping: H is singular, the retry adds damping to a restored copy
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(256, 8, generator=gen) @ torch.randn(8, 128, generator=gen)
    acc = HessianAccumulator(128)
    acc.add(x)
    layer = _layer()
    target, w = weight_target(layer, INT4_G32), layer.weight.detach()
    q, scale, zp = gptq_quantize(w, acc.value(), target, damp=0.0)
    assert torch.isfinite(q).all()
    q_rtn = rtn(w, target)[0]
    err = lambda q: float((x @ (w - q).t()).norm())  # noqa: E731
    assert err(q) < err(q_rtn)


def test_gptq_options_change_the_result():
    base = _errors(INT4_G32)[2]
    assert not torch.equal(base, _errors(INT4_G32, act_order=True)[2])
    assert not torch.equal(base, _errors(INT4_G32, damp=0.5)[2])


@pytest.mark.parametrize("bits,fmt,lo,hi", [(3, "int4", -4, 3), (8, "int8", -128, 127), (4, "int4", -8, 7)])
def test_gptq_bits(bits, fmt, lo, hi):
    spec = QuantSpec(fmt, symmetric=True, granularity=PerGroup(32))
    e_rtn, e_gptq, q, scale, zp, target = _errors(spec, bits=bits)
    assert (target.qmin, target.qmax) == (lo, hi)
    codes = torch.round(q.reshape(64, 4, 32) / scale.unsqueeze(-1))
    assert codes.min() >= lo and codes.max() <= hi
    assert codes.min() == lo or codes.max() == hi  # the narrowed range is actually used
    assert e_gptq < e_rtn


def test_gptq_per_channel_and_affine():
    for spec in (QuantSpec("int4", granularity=PerChannel(0)),
                 QuantSpec("uint4", symmetric=False, granularity=PerGroup(64))):
        e_rtn, e_gptq, *_ = _errors(spec)
        assert e_gptq < e_rtn


def test_bits_wider_than_the_format_is_an_error():
    with pytest.raises(ConfigError, match="exceeds"):
        weight_target(_layer(), INT4_G32, 8)


# -- AWQ ------------------------------------------------------------------------------------------

class _PreNormBlock(nn.Module):
    """LayerNorm -> q/k/v -> attention -> o: the fold patterns of a pre-norm block."""

    def __init__(self, k: int = 128) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(k)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(k, k)
        self.self_attn.k_proj = nn.Linear(k, k)
        self.self_attn.v_proj = nn.Linear(k, k)
        self.self_attn.o_proj = nn.Linear(k, k)

    def forward(self, x):
        h = self.input_layernorm(x)
        a = self.self_attn
        att = torch.softmax(a.q_proj(h) @ a.k_proj(h).transpose(-1, -2) / h.shape[-1] ** 0.5, dim=-1)
        return x + a.o_proj(att @ a.v_proj(h))


class _Stack(nn.Module):
    def __init__(self, n: int = 2, k: int = 128) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([_PreNormBlock(k) for _ in range(n)])
        with torch.no_grad():  # a few salient channels, as in LLMs
            for block in self.layers:
                block.input_layernorm.weight[:4] = 15.0
                block.self_attn.v_proj.weight[:4] *= 15.0  # -> salient inputs of o_proj

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def _stack_data(n=4, k=128):
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(2, 16, k, generator=gen) for _ in range(n)]


def test_awq_scaling_keeps_the_float_function():
    model = _Stack()
    data = _stack_data()
    with torch.no_grad():
        ref = [model(x) for x in data]
    probe = copy.deepcopy(model)
    targets = {n: weight_target(m, INT4_G32) for n, m in probe.named_modules() if isinstance(m, nn.Linear)}
    inputs = [BlockInput([x], {}, None) for x in data]
    with torch.no_grad():
        for index, block in enumerate(probe.layers):
            linears = {f"layers.{index}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            bp = BlockPass(index, f"layers.{index}", block, linears, inputs)
            before = [bp.forward(i) for i in inputs]
            report = {}
            _, _, scales = awq_scale_block(bp, targets, grid=10, report=report)
            assert len(report["scaled"]) == 2 and not report.get("folds_undone")  # LN->q/k/v, v->o
            assert set(scales) == set(linears)
            assert all(float(s.max() / s.min()) > 1.1 for s in scales.values())  # really scaled
            assert not any(hasattr(m, PRECOMPUTED_ATTR) for m in linears.values())
            for i, o in zip(inputs, before):
                torch.testing.assert_close(bp.forward(i), o, rtol=1e-4, atol=1e-4)
                i.hidden = bp.forward(i)
        for x, r in zip(data, ref):
            torch.testing.assert_close(probe(x), r, rtol=1e-4, atol=1e-4)
    changed = [n for n, p in probe.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert any("layernorm" in n for n in changed) and any("v_proj" in n for n in changed)


def test_awq_beats_rtn_on_salient_channels():
    model = _Stack()
    data = _stack_data(8)
    test = _stack_data(2)
    cfg = Config.from_dict({"preset": "w4", "default": {"weight": INT4_G32.to_dict()}})
    awq = Config.from_dict({"preset": "w4-awq", "default": {"weight": INT4_G32.to_dict()}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q_rtn = quantwise.quantize(model, cfg, data, progress=False)
        q_awq = quantwise.quantize(model, awq, data, progress=False)
    with torch.no_grad():
        err = lambda q: sum(float((q(x) - model(x)).norm()) for x in test)  # noqa: E731
        assert err(q_awq) < 0.9 * err(q_rtn), (err(q_awq), err(q_rtn))


# -- block runner ---------------------------------------------------------------------------------

def test_find_blocks_on_hf_models():
    assert find_blocks(hf_models.build("llama"))[0] == "model.layers"
    assert find_blocks(hf_models.build("gpt2"))[0] == "transformer.h"
    assert find_blocks(hf_models.build("bert"))[0] == "encoder.layer"


def test_block_runner_processes_each_block_once_holding_one_blocks_inputs():
    model = _Stack(n=3)
    data = _stack_data(4)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    calls, held, pre_calls = [], [], []
    for block in model.layers:
        block.register_forward_pre_hook(lambda m, a: pre_calls.append(m))

    def process(bp):
        calls.append(bp.index)
        assert set(bp.linears) == {n for n in linears if n.startswith(f"layers.{bp.index}.")}
        held.append(len(bp.inputs))
        n_inputs = []
        groups = bp.collect(lambda leader, x: n_inputs.append((leader, x.shape)))
        assert len(n_inputs) == 2 * len(data)  # LN output (q/k/v share it) and o's input
        assert sorted(map(len, groups.values())) == [1, 3]

    report = run_blocks(model, data, process, linears)
    assert calls == [0, 1, 2]
    assert held == [4, 4, 4]  # one input per calibration sample, for the current block only
    # block 0: capture (stops at its pre-hook) x4, collect x4, outputs x4; later blocks 8 each
    assert report["block_forward_calls"] == [8, 8, 8]
    assert len(pre_calls) == 4 + 3 * 8


def test_block_inputs_skip_padding_tokens():
    model = hf_models.build("bert")
    sample = hf_models.example_inputs("bert")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")}
    rows = []
    run_blocks(model, [sample], lambda bp: bp.collect(lambda leader, x: rows.append(x.shape[0])),
               linears)
    assert set(rows) == {int(sample["attention_mask"].sum())}


# -- presets, save / load -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["w4-gptq", "w4-awq", "w8a8-smoothquant", "w8a8-dynamic-smoothquant"])
def test_method_presets_resolve_and_round_trip(tmp_path, name):
    cfg = Config.resolve(name)
    assert cfg.method == name.split("-")[-1]
    assert Config.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml") == cfg
    if "smoothquant" not in name:
        assert cfg.default.weight == Config.preset("w4").default.weight


def test_method_config_options_and_errors():
    cfg = Config.from_dict({"preset": "w4-gptq", "method_args": {"bits": 3, "act_order": True,
                                                                  "damp": 0.05}})
    assert cfg.method == "gptq" and cfg.method_args == {"bits": 3, "act_order": True, "damp": 0.05}
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert "method" not in Config.preset("w4").to_dict()  # plain configs serialize as before
    three = weight_method_config("awq", bits=3, group_size=64)
    assert three.default.weight.granularity == PerGroup(64) and three.method_args == {"bits": 3}
    assert weight_method_config("gptq", bits=8).default.weight.format.value == "int8"
    with pytest.raises(ConfigError, match="valid keys"):
        Config.from_dict({"preset": "w4-gptq", "method_args": {"act_ordr": True}})
    with pytest.raises(ConfigError, match="valid methods"):
        Config.from_dict({"preset": "w4", "method": "gptqq"})
    with pytest.raises(ConfigError, match="bits"):
        Config.from_dict({"preset": "w4-gptq", "method_args": {"bits": 12}})


def _outputs(model, sample):
    with torch.no_grad():
        out = model(**sample)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch,config", [("llama", "w4-gptq"), ("gpt2", "w4-gptq"), ("bert", "w4-gptq"),
                                         ("llama", "w4-awq"), ("gpt2", "w4-awq"),
                                         ("llama", "w3-gptq-g32")])
def test_methods_quantize_hf_models_and_reload_bit_identically(tmp_path, arch, config):
    model = hf_models.build(arch)
    data = [hf_models.example_inputs(arch, seed) for seed in range(3)]
    cfg = weight_method_config("gptq", bits=3, group_size=32) if config == "w3-gptq-g32" else config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantwise.quantize(model, cfg, data, progress=False)
    state = qmodel._quantwise
    quantized = [r for r in state.records.values() if r.status == "quantized"]
    assert len(quantized) >= 8
    test = hf_models.example_inputs(arch, 7)
    out = _outputs(qmodel, test)
    ref = _outputs(model, test)
    cos = torch.nn.functional.cosine_similarity(out.flatten(0, -2), ref.flatten(0, -2)).mean()
    assert cos > (0.5 if config == "w3-gptq-g32" else 0.8)
    if config == "w3-gptq-g32":  # 3-bit codes in int4 storage
        for name, m in qmodel.named_modules():
            if type(m).__name__ == "QuantizedLayer" and ".layers." in f".{name}":
                codes = m.codes()
                assert codes.min() >= -4 and codes.max() <= 3
    quantwise.save(qmodel, tmp_path / "q")
    loaded = quantwise.load(tmp_path / "q", model=hf_models.build(arch))
    assert loaded._quantwise.config == Config.resolve(cfg)
    assert torch.equal(_outputs(loaded, test), out)


def test_gptq_codes_reach_convert():
    """convert() stores exactly the codes GPTQ chose (not a re-rounding of the float weight)."""
    model = hf_models.build("llama")
    data = [hf_models.example_inputs("llama", seed) for seed in range(3)]
    work = copy.deepcopy(model)
    apply_method(work, Config.preset("w4-gptq"), data)
    name = "model.layers.0.mlp.down_proj"
    module = work.get_submodule(name)
    scale, zp = getattr(module, PRECOMPUTED_ATTR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantwise.quantize(model, "w4-gptq", data, progress=False)
    qlayer = qmodel.get_submodule(name)
    torch.testing.assert_close(qlayer.weight_scale, scale, rtol=0, atol=0)
    expected = torch.round(module.weight.detach().float() / scale.repeat_interleave(
        module.weight.shape[1] // scale.shape[1], dim=1)).clamp(-8, 7)
    assert torch.equal(qlayer.codes().float(), expected)


def test_smoothquant_preset():
    if importlib.util.find_spec("quantwise.methods.smoothquant") is None:
        pytest.skip("quantwise/methods/smoothquant.py (smooth()) is not written yet")
    model = hf_models.build("bert")
    data = [hf_models.example_inputs("bert", seed) for seed in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = quantwise.quantize(model, "w8a8-smoothquant", data, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    test = hf_models.example_inputs("bert", 7)
    cos = torch.nn.functional.cosine_similarity(_outputs(qmodel, test).flatten(0, -2),
                                                _outputs(model, test).flatten(0, -2)).mean()
    assert cos > 0.9


def test_method_without_blocks_or_data():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    data = [torch.randn(4, 128)]
    with pytest.warns(quantwise.errors.QuantwiseWarning, match="no Linear inside repeated"):
        qmodel = quantwise.quantize(model, "w4-gptq", data, progress=False)
    assert qmodel._quantwise.records["0"].status == "quantized"
    with pytest.raises(quantwise.errors.CalibrationError, match="method 'gptq' needs it"):
        quantwise.quantize(model, "w4-gptq", None, progress=False)


def test_inplace_quantize_consumes_the_model_and_matches_the_copy():
    """inplace=True: no copy of the model is made (for models that fit in memory once); the
    result equals the copying path."""
    import hf_models

    model = hf_models.build("llama")
    calib = [hf_models.example_inputs("llama", seed) for seed in range(2)]
    copied = quantwise.quantize(model, "w4-gptq", calib, progress=False)
    consumed = quantwise.quantize(model, "w4-gptq", calib, progress=False, inplace=True)
    assert consumed is model
    x = hf_models.example_inputs("llama", 9)
    with torch.no_grad():
        assert torch.equal(hf_models.main_output(consumed(**x)), hf_models.main_output(copied(**x)))
