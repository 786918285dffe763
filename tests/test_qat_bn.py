"""QAT with Conv+BatchNorm folded for training and the BatchNorm statistics frozen late
(Krishnamoorthi 2018, section 3.2): batch statistics until freeze_bn, running ones after, and
convert() folding the trained BatchNorm into the same real kernels as PTQ."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantwise
from quantwise.fold import fold_conv_bn
from quantwise.qat import freeze_bn, lsq_fake_quantize, prepare_qat, qat_layers
from quantwise.state import get_state
from small_models import MiniResNet, randomize_bn
from test_qat import W4A4, convert_and_check, distill_steps


def _net():
    """A conv with a bias and one without, each followed by a BatchNorm."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    return randomize_bn(net)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize_bn(MiniResNet()), [torch.randn(8, 3, 32, 32) for _ in range(3)]


def _expected(layer, x, live):
    """The scheme written out from its definition: fold with the running statistics,
    fake-quantize, then (live) undo the fold and normalise with the batch statistics.
    Returns the output and (live) the unfolded conv output the statistics come from."""
    conv, bn = layer.module, layer.bn
    x = lsq_fake_quantize(x, layer.act_scale, layer.act_zero_point, layer.act_spec.qmin, layer.act_spec.qmax)
    std = torch.sqrt(bn.running_var + bn.eps)
    factor = (bn.weight / std).reshape(-1, 1, 1, 1)
    w = lsq_fake_quantize(conv.weight * factor, layer.weight_scale.reshape(-1, 1, 1, 1),
                          torch.zeros(()), layer.weight_spec.qmin, layer.weight_spec.qmax)
    b = conv.bias if conv.bias is not None else torch.zeros(bn.num_features)
    if not live:
        return F.conv2d(x, w, (b - bn.running_mean) * bn.weight / std + bn.bias, padding=1), None
    y = F.conv2d(x, w, padding=1) / factor.reshape(1, -1, 1, 1) + b.reshape(1, -1, 1, 1)
    mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    out = (y - mean) / torch.sqrt(var + bn.eps) * bn.weight.reshape(1, -1, 1, 1) + bn.bias.reshape(1, -1, 1, 1)
    return out, y


def test_the_bn_is_live_in_its_conv_layer_and_identity_in_the_tree():
    net, calib = _net(), [torch.randn(4, 3, 8, 8)]
    qat = prepare_qat(net, W4A4, calib, progress=False)
    assert isinstance(qat[1], nn.Identity) and isinstance(qat[4], nn.Identity)
    assert get_state(qat).folded == [("0", "1"), ("3", "4")]
    assert isinstance(qat[0].bn, nn.BatchNorm2d) and isinstance(qat[3].bn, nn.BatchNorm2d)
    assert torch.equal(qat[0].module.weight, net[0].weight)  # the conv is unfolded again
    assert qat[3].module.bias is None
    # at prepare the eval forward is that of PTQ's fold (frozen from the start) exactly
    folded = prepare_qat(net, W4A4, calib, progress=False, freeze_bn_after=0)
    assert all(layer.bn is None for layer in qat_layers(folded))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(qat.eval()(x), folded.eval()(x))


def test_training_uses_batch_statistics_until_frozen_then_running_ones():
    net = _net()
    qat = prepare_qat(net, W4A4, [torch.randn(4, 3, 8, 8) * 2], progress=False)
    layer, bn = qat[0], qat[0].bn
    x = torch.randn(6, 3, 8, 8) + 0.5
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():
        expected, y = _expected(layer, x, live=True)
        out = layer(x)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    # running statistics: momentum 0.1 towards the batch's, of the unfolded conv output
    assert torch.allclose(bn.running_mean, 0.9 * mean0 + 0.1 * y.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 * var0 + 0.1 * y.var((0, 2, 3)), rtol=1e-5)
    assert not torch.allclose(bn.running_mean, mean0, atol=1e-3)
    assert int(layer.bn_calls) == 1 and int(bn.num_batches_tracked) == 1

    assert freeze_bn(qat) == 2
    stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    with torch.no_grad():
        train_out = layer(x)  # still train mode
        assert torch.allclose(train_out, _expected(layer, x, live=False)[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(train_out, layer.eval()(x))  # frozen: training computes eval's output
    assert all(torch.equal(a, b) for a, b in zip(stats, (bn.running_mean, bn.running_var,
                                                         bn.num_batches_tracked)))
    assert int(layer.bn_calls) == 1


def test_frozen_eval_forward_is_the_folded_conv():
    """After training and freeze_bn, the eval forward is conv(x_fq, fq(W'), b') with W', b'
    folded from the trained conv and BatchNorm (as PTQ folds them)."""
    net = _net()
    qat = prepare_qat(net, W4A4, [torch.randn(4, 3, 8, 8)], progress=False)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    for _ in range(3):
        loss = qat(torch.randn(4, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    freeze_bn(qat)
    qat.eval()
    assert not torch.allclose(qat[0].bn.running_var, net[1].running_var, rtol=1e-2)  # trained
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        layer = qat[0]
        assert torch.allclose(layer(x), _expected(layer, x, live=False)[0], atol=1e-5, rtol=1e-5)
        # the same through PTQ's fold of the trained float pair
        float_pair = nn.Sequential(copy.deepcopy(layer.module), copy.deepcopy(layer.bn)).eval()
        fold_conv_bn(float_pair, [("0", "1")])
        w = lsq_fake_quantize(float_pair[0].weight, layer.weight_scale.reshape(-1, 1, 1, 1),
                              torch.zeros(()), -8, 7)
        x_fq = lsq_fake_quantize(x, layer.act_scale, layer.act_zero_point, 0, 15)
        assert torch.allclose(layer(x), F.conv2d(x_fq, w, float_pair[0].bias, padding=1), atol=1e-6)


def test_gradients_reach_gamma_beta_and_the_weight_scale():
    qat = prepare_qat(_net(), W4A4, [torch.randn(4, 3, 8, 8)], progress=False)
    for frozen in (False, True):
        if frozen:
            freeze_bn(qat)
        qat.zero_grad()
        qat(torch.randn(4, 3, 8, 8)).square().mean().backward()
        for layer in qat_layers(qat):
            for p in (layer.bn.weight, layer.bn.bias, layer.weight_scale, layer.module.weight):
                assert p.grad is not None and torch.isfinite(p.grad).all()
                assert float(p.grad.abs().max()) > 0, (frozen, layer.qname)


def test_freeze_bn_after_n_training_calls():
    qat = prepare_qat(_net(), W4A4, [torch.randn(4, 3, 8, 8)], progress=False, freeze_bn_after=2)
    bn = qat[3].bn
    with torch.no_grad():
        qat.eval()(torch.randn(4, 3, 8, 8))  # eval calls do not count
        qat.train()
        seen = []
        for _ in range(4):
            before = bn.running_mean.clone()
            qat(torch.randn(4, 3, 8, 8))
            seen.append(not torch.equal(bn.running_mean, before))
    assert seen == [True, True, False, False]
    assert all(bool(layer.bn_frozen) and int(layer.bn_calls) == 2 for layer in qat_layers(qat))


def test_convert_matches_the_qat_forward_within_one_step_and_reloads(resnet, tmp_path):
    """tests/test_qat.py's check, with the BatchNorms trained live, then frozen, then folded."""
    model, calib = resnet
    qat = prepare_qat(model, W4A4, calib, progress=False)
    bn = qat.block1.conv1.bn
    mean0 = bn.running_mean.clone()
    distill_steps(qat, model, 6, before_step=lambda step: step == 3 and freeze_bn(qat))
    assert not torch.allclose(bn.running_mean, mean0, atol=1e-3)  # the statistics did move
    x = torch.randn(5, 3, 32, 32)
    # load folds a fresh float model's BatchNorms (old statistics), then loads the trained weights
    qmodel, _ = convert_and_check(qat, model, x, tmp_path / "qat-bn")
    assert sum(r.status == "folded" for r in quantwise.summary(qmodel).rows) == 5
