"""W8A8 convolution via oneDNN `qconv{1,2,3}d_pointwise` (u8 activations x s8 symmetric weights
-> s32, rescale and bias fused, float32 out). Weights are prepacked once at construction.

Two oneDNN defects found by randomized tests here (torch 2.13, oneDNN 3.12) are avoided:
- implicit padding larger than the kernel's reach, p > d * (k - 1) in some dimension, crashes
  (SIGSEGV) or gives garbage; mapped over 55,776 random 2-D cases: with p <= d * (k - 1) in
  every dimension there were 0 wrong results and 0 crashes, whatever the layout, x_shape,
  groups or sizes. So 2-D convs inside that rule (ResNet's 3x3/pad 1, 7x7/pad 3, 1x1/pad 0)
  pass padding to oneDNN; all others get it by hand: the uint8 codes are written straight into
  a buffer pre-filled with the input zero point (the code of 0.0, what the float conv pads
  with), which costs one byte-sized fill pass;
- groups with ONE input channel and several output channels (e.g. a grayscale stem) give wrong
  values when an output dimension is 1 under stride > 1.
On CPUs with AMX (Sapphire Rapids and later) oneDNN takes other code paths, and 3,000 random
cases there found two more, both depending on the input size, so handled per call (_plan):
padding >= the input size with oneDNN's padding (crash or wrong values; padded by hand), and
a size-1 output dimension under stride > 1 on any channel count (wrong values; that dimension
runs with stride 1 and is cropped, which also avoids the 1-input-channel defect above: its
former workaround, a zero-weight second input channel, kept such convs out of the int8 graph).
3,000 further random cases: 0 wrong, 0 crashes.

ConvTranspose: torch exposes oneDNN's int8 deconvolution only as `quantized::conv_transpose2d`,
which requantizes its output to uint8 and so cannot match the simulation. A transposed conv with
stride s runs as s^d direct int8 convs (sub-pixel decomposition): output phase r of a dimension
only receives the taps t with (r + padding - t * dilation) divisible by s, and those taps,
reversed, form an ordinary stride-1 (dilated) conv over the input. Each phase is its own
prepacked conv written into y[..., r::s]; every tap belongs to exactly one phase, so no MAC is
wasted and the integer sums stay exact. Phases that no tap reaches get the bias alone.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch

from quantwise.kernels.base import (ConvGeom, StaticAct, StaticU8Quantizer, dynamic_scale,
                                    tensor_bytes)

_OPS = {1: "qconv1d_pointwise", 2: "qconv2d_pointwise", 3: "qconv3d_pointwise"}


def _phase_plan(k: int, s: int, d: int, p: int, op: int) -> list[dict]:
    """Per output phase r of one dimension: taps (descending), dilation, padding, crop start."""
    plan = []
    c = d * (k - 1) - 2 * p + op + 1  # L_out = (n - 1) * s + c
    dil = d // math.gcd(s, d)
    for r in range(s):
        taps = [t for t in range(k - 1, -1, -1) if (r + p - t * d) % s == 0]
        if not taps:
            plan.append({"r": r, "taps": taps})
            continue
        e_min = (r + p - taps[0] * d) // s  # input offset of the first (largest) tap
        extra = -((r - c) // s) - 1  # (number of outputs of this phase) - n, independent of n
        pad = max(0, -e_min, extra + e_min + dil * (len(taps) - 1))
        plan.append({"r": r, "taps": taps, "dil": dil, "pad": pad, "start": e_min + pad})
    return plan


class OneDnnConv:
    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor],
                 act, geom: ConvGeom, padding: tuple, weight_label: str = "int8"):
        self.geom, self.dim, self.padding = geom, geom.dim, tuple(padding)
        codes = codes.to(torch.int8)
        self.weight_numel = codes.numel()
        self.static = isinstance(act, StaticAct)
        if self.static:
            self.quant = StaticU8Quantizer(act)
            xs, xzp = self.quant.scale, self.quant.zero_point
        else:
            self.qmax = act.spec.qmax
            xs, xzp = 1.0, 128
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        self.op = getattr(torch.ops.onednn, _OPS[self.dim])
        g = geom.groups
        if geom.transposed:  # [Cin, Cout/g, *k] -> [Cout, Cin/g, *k]; scales repeat per group
            cin, cout_g, k = codes.shape[0], codes.shape[1], codes.shape[2:]
            codes = codes.reshape(g, cin // g, cout_g, *k).transpose(1, 2)
            codes = codes.reshape(g * cout_g, cin // g, *k)
            w_scale = w_scale.repeat(g)
        self.kernel_size = codes.shape[2:]
        self.out_channels = codes.shape[0]
        self.w_scale = w_scale.to(torch.float32).contiguous()
        self.w_zero_point = torch.zeros(self.out_channels, dtype=torch.int64)

        def prepack(w, stride, dil, op_pad=None, x_shape=None):
            op_pad = [0] * self.dim if op_pad is None else list(op_pad)
            return torch.ops.onednn.qconv_prepack(w.contiguous(), self.w_scale, xs, xzp,
                                                  list(stride), op_pad, list(dil), g, x_shape)
        self._prepack, self._codes, self._probing = prepack, codes, False
        # oneDNN pads correctly only within the kernel's reach (module docstring)
        native = not geom.transposed and self.dim == 2 and all(
            p <= d * (k - 1) for p, d, k in zip(padding, geom.dilation, self.kernel_size))
        self.native = native
        self._variants: dict[tuple, dict] = {}  # direct convs: (native, stride) -> tuned phase
        if not geom.transposed:  # packed per input size on first use (_plan, _phase)
            self.phases = []
            self.in_pad = [0] * self.dim if native else list(padding)
            kind = f"conv{self.dim}d" + (", oneDNN padding" if native and any(padding) else "")
        else:
            plans = [_phase_plan(*a) for a in zip(self.kernel_size, geom.stride, geom.dilation,
                                                  padding, geom.output_padding)]
            self.phases = []
            for combo in itertools.product(*plans):
                phase = {"r": [c["r"] for c in combo], "packed": None}
                if all(c["taps"] for c in combo):
                    sub = codes
                    for axis, c in enumerate(combo):
                        sub = sub.index_select(2 + axis, torch.tensor(c["taps"]))
                    dil = [c["dil"] for c in combo]
                    phase.update(pad=[c["pad"] for c in combo], start=[c["start"] for c in combo],
                                 stride=[1] * self.dim, dil=dil,
                                 packed=prepack(sub, [1] * self.dim, dil))
                self.phases.append(phase)
            kind = f"transposed conv{self.dim}d as {len(self.phases)} sub-pixel phase convs"
            live = [ph["pad"] for ph in self.phases if ph["packed"] is not None]
            self.in_pad = [max([p[i] for p in live] or [0]) for i in range(self.dim)]
        per = "static per-tensor" if self.static else "dynamic per-tensor int8"
        self.name = (f"{weight_label} weights x uint8 activations -> int32, oneDNN "
                     f"{_OPS[self.dim]} ({kind}; prepacked; rescale+bias fused; {per} activations)")
        self.fallback_reason = None

    def _plan(self, sizes) -> tuple[bool, list[int], list[int]]:
        """For a direct conv on inputs of spatial `sizes`: (oneDNN pads?, stride, by-hand
        padding of the buffer). Two more oneDNN defects (found on AMX CPUs by randomized tests)
        depend on the input size, so they are routed around here, per call:
        - padding >= the input size in a dimension crashed or gave wrong values with oneDNN's
          own padding: such inputs are padded by hand;
        - an output dimension of size 1 under stride > 1 gave wrong values (the 1-input-channel
          case of the module docstring, on any channel count there): a size-1 output reads
          only the first window, so that dimension runs with stride 1 and is cropped to 1."""
        g = self.geom
        native = self.native and all(p < n for p, n in zip(self.padding, sizes))
        outs = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                zip(sizes, self.padding, g.dilation, self.kernel_size, g.stride)]
        stride = [1 if o == 1 else s for o, s in zip(outs, g.stride)]
        return native, stride, [0] * self.dim if native else list(self.padding)

    def _phase(self, native: bool, stride: list[int], buf_shape) -> dict:
        """The prepacked weights for this (padding mode, stride), packed once for the first real
        input size. oneDNN chooses the weight layout for the input shape it is told at prepack;
        without one it chose a layout that ran ResNet-18's 7x7x512 convs 1.8x slower (3.2 vs
        1.8 ms at batch 8, and 0.45 vs 0.26 ms at batch 1, measured). Batch 1 of the same
        spatial size packs as well for any batch."""
        key = (native, tuple(stride))
        phase = self._variants.get(key)
        if phase is None:
            op_pad = list(self.padding) if native else [0] * self.dim
            shape = [1, *buf_shape[1:]] if not self._probing else None
            phase = {"packed": self._prepack(self._codes, stride, self.geom.dilation, op_pad, shape),
                     "pad": [0] * self.dim if native else list(self.padding), "op_pad": op_pad,
                     "stride": stride,
                     "dil": list(self.geom.dilation)}
            if not self._probing:  # a probe's dummy shape must not choose the layout
                self._variants[key] = phase
        return phase

    def _crop(self, y: torch.Tensor, stride: list[int]) -> torch.Tensor:
        if stride == list(self.geom.stride):
            return y
        return y[(slice(None), slice(None),
                  *[slice(0, 1) if a != b else slice(None) for a, b in zip(stride, self.geom.stride)])]

    def probe(self, x: torch.Tensor) -> torch.Tensor:
        """Run once without tuning the weight layout to x (a construction-time check)."""
        self._probing = True
        try:
            return self(x)
        finally:
            self._probing = False

    def _input(self, x: torch.Tensor, in_pad: list[int]):
        """uint8 codes of x in a zero-point-filled, padded (`in_pad`) buffer."""
        bad = None
        if self.static:
            t = self.quant.shifted_codes(x)  # codes - 128
            xs, xzp = self.quant.scale, self.quant.zero_point
        else:
            x, s, bad = dynamic_scale(x, self.qmax, per_row=False)
            t = torch.div(x, s).round_()  # symmetric int8: the uint8 codes - 128
            xs, xzp = float(s), 128
        b, c, sizes = t.shape[0], t.shape[1], t.shape[2:]
        fmt = torch.channels_last if self.dim == 2 else torch.contiguous_format
        shape = (b, c, *[n + 2 * p for n, p in zip(sizes, in_pad)])
        buf = torch.empty(shape, dtype=torch.int8, memory_format=fmt)
        if any(in_pad):
            buf.fill_(xzp - 128)
        inner = (slice(None), slice(None),
                 *[slice(p, p + n) for n, p in zip(sizes, in_pad)])
        buf[inner] = t  # int8 conversion, layout change and placement in one pass
        # int8 -> uint8 (+128) is a bit flip (base.u8_from_shifted): float -> int8 is vectorised
        return buf.view(torch.uint8).bitwise_xor_(128), xs, xzp, sizes, bad

    def _conv(self, buf, xs, xzp, phase, sizes, in_pad):
        view = (slice(None), slice(None),
                *[slice(m - p, m + p + n) for m, p, n in zip(in_pad, phase["pad"], sizes)])
        return self.op(buf[view], xs, xzp, phase["packed"], self.w_scale, self.w_zero_point,
                       self.bias, phase["stride"], phase.get("op_pad", [0] * self.dim), phase["dil"],
                       self.geom.groups,
                       1.0, 0, torch.float32, "none", [], "")

    def _transposed(self, buf, xs, xzp, sizes_in):
        g = self.geom
        sizes = [(n - 1) * s + d * (k - 1) - 2 * p + op + 1 for n, s, d, k, p, op in
                 zip(sizes_in, g.stride, g.dilation, self.kernel_size, self.padding,
                     g.output_padding)]
        fmt = torch.channels_last if self.dim == 2 else torch.contiguous_format
        y = torch.empty(buf.shape[0], self.out_channels, *sizes, memory_format=fmt)
        for phase in self.phases:
            counts = [len(range(r, size, s)) for r, size, s in zip(phase["r"], sizes, g.stride)]
            if min(counts) <= 0:
                continue
            dst = (slice(None), slice(None),
                   *[slice(r, None, s) for r, s in zip(phase["r"], g.stride)])
            if phase["packed"] is None:  # no tap lands on this phase: bias only
                y[dst] = 0.0 if self.bias is None else self.bias.reshape(-1, *[1] * self.dim)
                continue
            z = self._conv(buf, xs, xzp, phase, sizes_in, self.in_pad)
            y[dst] = z[(slice(None), slice(None),
                        *[slice(a, a + c) for a, c in zip(phase["start"], counts)])]
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:
            x = x.float()
        unbatched = x.dim() == self.dim + 1
        if unbatched:
            x = x.unsqueeze(0)
        if self.geom.transposed:
            buf, xs, xzp, sizes, bad = self._input(x, self.in_pad)
            y = self._transposed(buf, xs, xzp, sizes)
        else:
            native, stride, in_pad = self._plan(x.shape[2:])
            buf, xs, xzp, sizes, bad = self._input(x, in_pad)
            phase = self._phase(native, stride, buf.shape)
            y = self._crop(self._conv(buf, xs, xzp, phase, sizes, in_pad), stride)
        if bad is not None:  # samples that held NaN/Inf (dynamic only): NaN out
            y.masked_fill_(bad, float("nan"))
        if x.is_contiguous() and not y.is_contiguous():
            y = y.contiguous()  # keep torch's convention: output layout follows the input's
        return y.squeeze(0) if unbatched else y

    def nbytes(self) -> int:
        return self.weight_numel + tensor_bytes(self.w_scale, self.w_zero_point, self.bias)

    # -- the int8 graph path (quantwise.int8graph): uint8 codes in and out, fused post-ops ----
    @property
    def fusable(self) -> bool:
        """Whether run_fused applies: a static direct 2-D conv whose padding oneDNN does."""
        return (self.static and self.dim == 2 and not self.geom.transposed
                and not any(self.in_pad))

    @property
    def input_qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the uint8 input codes this conv was calibrated for."""
        return self.quant.scale, self.quant.zero_point

    @property
    def takes_full_range_codes(self) -> bool:
        """True when the input codes span 0..255, so any uint8 edge with these qparams fits."""
        return self.quant.lo == 0 and self.quant.hi == 255

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """float32 input -> its uint8 codes, channels_last (what run_fused takes)."""
        return self.quant(x.float(), memory_format=torch.channels_last)

    def output_size(self, x: torch.Tensor) -> tuple[int, ...]:
        g = self.geom
        return (x.shape[0], self.out_channels,
                *[(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                  zip(x.shape[2:], self.padding, g.dilation, self.kernel_size, g.stride)])

    def run_fused(self, xq: torch.Tensor, out_q: Optional[tuple[float, int]], relu: bool,
                  accum: Optional[torch.Tensor] = None,
                  accum_q: Optional[tuple[float, int]] = None) -> torch.Tensor:
        """relu?(conv(xq) + accum?) from uint8 channels_last codes `xq` (this conv's input
        qparams), requantized by oneDNN to uint8 with `out_q` = (scale, zero point), or float32
        when `out_q` is None. With uint8 output, `accum` is uint8 with `accum_q` and is
        overwritten with the result (oneDNN's in-place sum); with float output it is float32."""
        xs, xzp = self.quant.scale, self.quant.zero_point
        native, stride, in_pad = self._plan(xq.shape[2:])
        if any(in_pad):  # padding >= the input size: by hand (see _plan)
            b, c, sizes = xq.shape[0], xq.shape[1], xq.shape[2:]
            buf = torch.empty(b, c, *[n + 2 * p for n, p in zip(sizes, in_pad)], dtype=torch.uint8,
                              memory_format=torch.channels_last).fill_(xzp)
            buf[(slice(None), slice(None), *[slice(p, p + n) for n, p in zip(sizes, in_pad)])] = xq
            xq = buf
        phase = self._phase(native, stride, xq.shape)
        cropped = stride != list(self.geom.stride)
        os_, ozp, dtype = (1.0, 0, torch.float32) if out_q is None else (out_q[0], out_q[1], None)
        common = (phase["packed"], self.w_scale, self.w_zero_point)
        geo = (phase["stride"], phase["op_pad"], phase["dil"], self.geom.groups)
        attr = "relu" if relu else "none"
        if accum is None:
            y = self.op(xq, xs, xzp, *common, self.bias, *geo, os_, ozp, dtype, attr, [], "")
            return self._crop(y, stride).contiguous(memory_format=torch.channels_last) if cropped else y
        a_s, a_zp = (1.0, 0) if out_q is None else accum_q
        if cropped:  # oneDNN's in-place sum needs the uncropped shape: sum, ReLU, requantize here
            y = self._crop(self.op(xq, xs, xzp, *common, self.bias, *geo, 1.0, 0, torch.float32,
                                   "none", [], ""), stride)
            y = y + (accum if out_q is None else (accum.float() - a_zp) * a_s)
            if relu:
                y = y.relu_()
            if out_q is None:
                return y
            return accum.copy_(torch.round(y / os_).add_(ozp).clamp_(0, 255))
        return self.op.binary(xq, xs, xzp, *common, accum, self.bias, *geo, os_, ozp, dtype,
                              a_s, a_zp, "sum", 1.0, attr, [], "")
