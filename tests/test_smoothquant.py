"""SmoothQuant (methods/smoothquant.py) and the static int8 encoder fast path it feeds."""

import copy

import pytest
import torch

import quantwise
from quantwise.config import Config, Rule
from quantwise.encoder import FastBertLayer, remove_encoder_fastpath
from quantwise.methods.smoothquant import ACT_SPEC, WEIGHT_SPEC, find_groups, group_error, smooth
from quantwise.numerics import fake_quantize, qparams_from_range, tensor_range
from quantwise.state import get_state

pytest.importorskip("transformers")
import hf_models

CALIB_SEEDS = range(2)


def _calib(name):
    return [hf_models.example_inputs(name, s) for s in CALIB_SEEDS]


def _out(model, batch):
    with torch.no_grad():
        return hf_models.main_output(model(**batch))


def _with_outlier(name):
    """A tiny model whose norm weights have a few outlier channels (as trained transformers
    do), so smoothing has something to flatten."""
    model = hf_models.build(name)
    with torch.no_grad():
        for mod_name, m in model.named_modules():
            if isinstance(m, torch.nn.LayerNorm) or type(m).__name__.endswith("RMSNorm"):
                m.weight[[3, 17]] *= 12.0
    return model


@pytest.fixture(scope="module", params=["bert", "llama"])
def smoothed(request):
    name = request.param
    model = _with_outlier(name)
    s = copy.deepcopy(model)
    report = smooth(s, _calib(name))
    return name, model, s, report


def test_float_function_is_unchanged(smoothed):
    name, model, s, report = smoothed
    assert report.groups
    for seed in (50, 51):
        batch = hf_models.example_inputs(name, seed)
        ref, out = _out(model, batch), _out(s, batch)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
    # and the smoothing really changed the parameters (not a no-op)
    changed = [n for (n, p), (_, p0) in zip(s.named_parameters(), model.named_parameters())
               if not torch.equal(p, p0)]
    assert len(changed) >= len(report.groups)


def test_report_lists_groups_and_unsmoothable_linears(smoothed):
    name, _, _, report = smoothed
    if name == "bert":
        assert set(report.groups) == {f"encoder.layer.{i}.{g}" for i in range(2) for g in
                                      ("attention.self.qkv", "attention.output.dense",
                                       "intermediate.dense")}
        assert "GELU" in report.skipped["encoder.layer.0.output.dense"]
        assert "value rows" in report.groups["encoder.layer.0.attention.output.dense"].fold
    else:  # llama: q/k/v, o (GQA 2 query heads per kv head), gate/up, down
        assert len(report.groups) == 8 and not report.skipped
        assert "GQA" in report.groups["model.layers.0.self_attn.o_proj"].fold
    for g in report.groups.values():
        assert g.alpha in (0.5, 0.6, 0.7, 0.8) and g.error == min(g.errors.values())


def _input_absmax(model, name, linear_names):
    maxima = {}

    def hook(n):
        def fn(_, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            maxima[n] = x if n not in maxima else torch.maximum(maxima[n], x)
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in linear_names]
    for batch in _calib(name):
        _out(model, batch)
    for h in handles:
        h.remove()
    return maxima


def test_smoothed_activations_are_flatter(smoothed):
    name, model, s, report = smoothed
    firsts = [g.linears[0] for g in report.groups.values()]
    before, after = _input_absmax(model, name, firsts), _input_absmax(s, name, firsts)
    flatness = lambda m: float(m.max() / m.median())
    for n in firsts:
        assert flatness(after[n]) < flatness(before[n]), n
    # the outlier channels injected into the norms were the worst before and are tamed after
    first = firsts[0]
    assert flatness(before[first]) > 3 * flatness(after[first])


def _brute_force_error(model, name, group, linear_names, alpha):
    """Smooth a fresh copy with this alpha, then fake-quantize the group's real inputs and
    weights from scratch (static per-tensor uint8 over all calibration rows, int8 per-channel)."""
    m = copy.deepcopy(model)
    smooth(m, _calib(name), alpha=alpha)
    rows = []
    lin0 = m.get_submodule(linear_names[0])
    h = lin0.register_forward_pre_hook(lambda _, a: rows.append(a[0].reshape(-1, a[0].shape[-1])))
    for batch in _calib(name):
        _out(m, batch)
    h.remove()
    x = torch.cat(rows)
    xs, xz = qparams_from_range(*tensor_range(x, ACT_SPEC), ACT_SPEC)
    xq = fake_quantize(x, xs, xz, ACT_SPEC)
    num = den = 0.0
    for n in linear_names:
        w = m.get_submodule(n).weight.detach()
        ws, wz = qparams_from_range(*tensor_range(w, WEIGHT_SPEC), WEIGHT_SPEC)
        ref = x @ w.t()
        num += float((xq @ fake_quantize(w, ws, wz, WEIGHT_SPEC).t() - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return num / den


@pytest.mark.parametrize("name,group", [("llama", "model.layers.0.mlp.down_proj")])
def test_alpha_search_picks_the_lowest_error(name, group):
    model = _with_outlier(name)
    report = smooth(copy.deepcopy(model), _calib(name))
    g = report.groups[group]
    brute = {a: _brute_force_error(model, name, group, g.linears, a) for a in (0.5, 0.6, 0.7, 0.8)}
    assert g.alpha == min(brute, key=brute.get)
    for a, err in brute.items():  # the same measure (all calibration rows fit in the sample)
        assert g.errors[a] == pytest.approx(err, rel=1e-3)


def test_groups_of_other_models_are_empty():
    groups, skipped = find_groups(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    assert not groups and not skipped


# -- quantized: static fast path -----------------------------------------------------------------
_DYN_OUT = Rule(pattern="*.output.dense", types=("Linear",),
                overrides={"activation": {"format": "int8", "symmetric": True,
                                          "granularity": "per_token"}, "dynamic": True})


@pytest.fixture(scope="module")
def qbert():
    model = _with_outlier("bert")
    s = copy.deepcopy(model)
    smooth(s, _calib("bert"))
    return model, s, quantwise.quantize(s, "w8a8", _calib("bert"), progress=False)


@pytest.mark.parametrize("mixed", [False, True])
def test_static_fast_path_matches_the_per_layer_path(qbert, mixed):
    model, s, q = qbert
    if mixed:  # output.dense per-token dynamic, the rest static
        q = quantwise.quantize(s, Config.preset("w8a8").with_rule(_DYN_OUT), _calib("bert"),
                               progress=False)
    assert get_state(q).encoder.layers == ["encoder.layer.0", "encoder.layer.1"]
    assert all(isinstance(layer.__dict__["forward"], FastBertLayer) for layer in q.encoder.layer)
    slow = copy.deepcopy(q)
    remove_encoder_fastpath(slow)
    batch = hf_models.example_inputs("bert", 60)
    fast, per_layer, ref = _out(q, batch), _out(slow, batch), _out(model, batch)
    keep = batch["attention_mask"].bool()
    # same codes up to the one fused division x / (x_scale * s) vs (x / s) / x_scale;
    # observed ~1e-6, while quantization error itself is ~1e-2
    assert float((fast - per_layer)[keep].abs().max()) < 2e-3
    assert float((per_layer - ref)[keep].abs().max()) > 2e-3  # the bound is not vacuous
    cos = torch.nn.functional.cosine_similarity(fast[keep], ref[keep], dim=-1)
    assert float(cos.min()) > 0.99


def test_static_fast_path_quantizes_qkv_separately_when_scales_differ(qbert):
    _model, _s, q = qbert
    q = copy.deepcopy(q)
    layer = q.encoder.layer[0]
    key = layer.attention.self.key
    key.input_scale = key.input_scale * 1.5
    key.build_kernel()
    remove_encoder_fastpath(q)
    from quantwise.encoder import apply_encoder_fastpath
    apply_encoder_fastpath(q, get_state(q))
    assert not layer.__dict__["forward"].qkv_fused
    slow = copy.deepcopy(q)
    remove_encoder_fastpath(slow)
    batch = hf_models.example_inputs("bert", 61)
    keep = batch["attention_mask"].bool()
    assert float((_out(q, batch) - _out(slow, batch))[keep].abs().max()) < 2e-3


def test_save_load_keeps_smoothing_and_fast_path(qbert, tmp_path):
    model, _s, q = qbert
    quantwise.save(q, tmp_path / "q")
    loaded = quantwise.load(tmp_path / "q", model)  # the unsmoothed float model is enough
    batch = hf_models.example_inputs("bert", 62)
    assert get_state(loaded).encoder.layers == get_state(q).encoder.layers
    assert torch.equal(_out(loaded, batch), _out(q, batch))
    slow_q, slow_l = copy.deepcopy(q), copy.deepcopy(loaded)
    remove_encoder_fastpath(slow_q)
    remove_encoder_fastpath(slow_l)  # the explicit divisions were restored too
    assert torch.equal(_out(slow_l, batch), _out(slow_q, batch))


def test_dynamic_smoothquant_preset_beats_plain_dynamic_and_keeps_the_fast_path(tmp_path):
    """w8a8-dynamic-smoothquant: smoothing scored with per-token inputs, then per-token int8;
    the encoder fast path divides by s before the per-row scale; save/load replays it."""
    model, calib = _with_outlier("bert"), _calib("bert")
    q = quantwise.quantize(model, "w8a8-dynamic-smoothquant", calib, progress=False)
    plain = quantwise.quantize(model, "w8a8-dynamic", calib, progress=False)
    assert get_state(q).encoder.layers == ["encoder.layer.0", "encoder.layer.1"]
    batch = hf_models.example_inputs("bert", 63)
    keep = batch["attention_mask"].bool()
    ref = _out(model, batch)
    err = lambda m: float((_out(m, batch) - ref)[keep].norm() / ref[keep].norm())  # noqa: E731
    assert err(q) < err(plain), (err(q), err(plain))
    slow = copy.deepcopy(q)
    remove_encoder_fastpath(slow)
    assert float((_out(q, batch) - _out(slow, batch))[keep].abs().max()) < 2e-3
    quantwise.save(q, tmp_path / "q")
    assert torch.equal(_out(quantwise.load(tmp_path / "q", model), batch), _out(q, batch))


def test_per_token_alpha_scoring_uses_row_scales():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    x[:4] *= 100.0  # a few loud tokens: per-tensor scales suffer, per-row ones do not
    w = [torch.randn(8, 16)]
    amin, amax = x.amin(dim=0), x.amax(dim=0)
    static = group_error(x, amin, amax, w, None)
    token = group_error(x, amin, amax, w, None, per_token=True)
    assert token < static / 4, (token, static)
