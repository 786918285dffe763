"""GPTQ (Frantar et al. 2022): per Linear, minimize ||W X - W_hat X||^2 column by column.

    H = 2/n sum x x^T over the layer's calibration inputs (float64 accumulator)
    H += damp * mean(diag H) * I                          (damp: 1% by default)
    U = cholesky(H^-1) upper                               (the rows of H^-1 needed, stably)
    for each column i (in order, or by descending diag(H) with act_order):
        q_i = quant(w_i); err = (w_i - q_i) / U[i, i]
        w_j -= err * U[i, j] for the remaining columns j  (lazily, in blocks of `block_size`)

Group scales: without act_order, a group's scales are computed when its first column is reached,
from the weight as updated so far (the reference algorithm). With act_order the columns are
visited out of order, so a group's columns are not contiguous any more; we use "static groups":
every group's scales are computed once from the original weight before any column is quantized,
and each column uses the scales of the group it belongs to in the original order. The stored
format thus stays plain per-group (no g_idx permutation), exactly what convert() and the int4
kernels expect.

Dead inputs (diag(H) == 0: the input channel was always zero) get H[i, i] = 1 and their weight
column is quantized as is (it never mattered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantwise.methods.weights import WeightTarget, fake_quant, group_qparams, mse_shrink


@dataclass
class HessianAccumulator:
    """Running H = 2/n sum x x^T (float64) over rows x of a Linear's inputs."""

    columns: int
    h: torch.Tensor | None = None
    n: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.columns).float()
        m = x.shape[0]
        if m == 0:
            return
        if self.h is None:
            self.h = torch.zeros(self.columns, self.columns, dtype=torch.float64)
        # float32 product of one batch (exact enough: a few thousand terms), float64 running sum
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        # promoted element by element (no float64 copy), in column chunks: the float32 product
        # of a 5632-input down_proj would be 127 MB beside H, a chunk of 1024 columns is 23 MB
        xt = x.t()
        for j in range(0, self.columns, self.CHUNK):
            self.h[:, j:j + self.CHUNK].add_(xt @ x[:, j:j + self.CHUNK], alpha=2.0 / self.n)

    CHUNK = 1024

    def value(self) -> torch.Tensor:
        if self.h is None:
            return torch.zeros(self.columns, self.columns, dtype=torch.float64)
        return self.h

    def take(self) -> torch.Tensor:
        """value(), handed over: the accumulator lets go of it (gptq_quantize(overwrite_h=True)
        then frees H once factorized instead of holding it through the column loop)."""
        h, self.h = self.value(), None
        return h


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, target: WeightTarget, *, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128, mse: bool = False,
                  overwrite_h: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of w [out, in] with Hessian h [in, in]. `mse`: each group's range is shrunk to
    minimize sum |w - Q(w)|^2.4 over its weights when its scales are computed (the reference
    quantizer's `mse` option) instead of covering the full range.

    Returns (dequantized weight [out, in] float32, scale [out, in // group] float32,
    zero point [out, in // group] int32): the dequantized weight is (q - zp) * scale exactly.
    `overwrite_h`: use a float64 `h` as the workspace (as LAPACK's overwrite_a) instead of a copy:
    the caller no longer needs it. Memory: W and a few of its columns, H (a copy unless
    overwrite_h) factorized in place, a float32 copy of H and of its inverse factor."""
    rows, cols = w.shape
    group = target.group
    n_groups = cols // group
    W = w.detach().to(torch.float32).clone()
    H = h.detach().to(torch.float64, copy=not overwrite_h)
    del h  # with overwrite_h and a taken H, `del H` below frees it
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0

    scale = torch.empty(rows, n_groups, dtype=torch.float32)
    zp = torch.empty(rows, n_groups, dtype=torch.int32)
    static = act_order or n_groups == 1
    if static:  # every group's scales from the original weight (see the module docstring)
        s, z = _qparams(W.reshape(rows, n_groups, group), target, mse)
        scale.copy_(s)
        zp.copy_(z)

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
        _permute_symmetric_(H, perm)
    col_group = (perm if perm is not None else torch.arange(cols)) // group  # original group of each column

    diag_mean = torch.mean(torch.diag(H))
    H.diagonal().add_(damp * diag_mean if damp > 0 else 0.0)
    hinv32 = _inverse_cholesky_(H).to(torch.float32)  # upper triangular U with U^T U = H^-1
    del H

    Q = torch.zeros_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = hinv32[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(col_group[col])
            if not static and col % group == 0:
                # this group's columns as updated so far: the rest of this block, then beyond it
                span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :group]
                s, z = _qparams(span, target, mse)
                scale[:, g], zp[:, g] = s, z
            w_col = W1[:, i]
            q_col = fake_quant(w_col, scale[:, g], zp[:, g], target)
            Q1[:, i] = q_col
            err = (w_col - q_col) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        if i2 < cols:
            # in place (no [rows, cols - i2] product beside W: 80 MB for gate/up; same values)
            W[:, i2:].addmm_(Err1, hinv32[i1:i2, i2:], alpha=-1.0)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale, zp


def _qparams(w: torch.Tensor, target: WeightTarget, mse: bool):
    return group_qparams(w, target, mse_shrink(w, target) if mse else 1.0)


def _permute_symmetric_(H: torch.Tensor, perm: torch.Tensor, rows: int = 256) -> None:
    """H <- H[perm][:, perm] in place, with a row and a block of rows as the only extra memory
    (index_select would copy H: 254 MB for 5632 inputs). Rows move along the permutation's
    cycles; then each block of rows has its columns permuted."""
    order = perm.tolist()
    done = [False] * len(order)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        first = H[start].clone()  # new row i = old row order[i], one cycle at a time
        i = start
        while True:
            done[i] = True
            j = order[i]
            if j == start:
                H[i] = first
                break
            H[i] = H[j]
            i = j
    for r in range(0, H.shape[0], rows):
        H[r:r + rows] = H[r:r + rows].index_select(1, perm)


def _inverse_cholesky_(H: torch.Tensor) -> torch.Tensor:
    """Overwrite H (float64) with the upper Cholesky factor U of H^-1 (U^T U = H^-1) and return it.

    Factorization, inverse and second factorization all run in H's own storage, through its
    transpose: torch hands LAPACK a column-major matrix as it is but copies a row-major one
    (measured: a 254 MB copy per call for 5632 inputs). H is symmetric, so H.mT is the same
    matrix in column-major order; the lower factors computed in it read, in H's own row-major
    order, as the upper factor U. The only extra memory is a float32 copy of H kept for the
    rare retry: when H is not positive definite, it is restored from that copy with more
    damping on its diagonal."""
    backup = H.to(torch.float32)
    mean = max(float(torch.mean(torch.diag(H))), 1e-12)
    info = torch.zeros((), dtype=torch.int32)
    cm = H.mT  # column-major view of the same storage
    extra = 0.0
    for _ in range(8):
        if extra:
            H.copy_(backup).diagonal().add_(extra)
        torch.linalg.cholesky_ex(cm, out=(cm, info))  # cm = L, L L^T = H
        if int(info) == 0:
            torch.cholesky_inverse(cm, out=cm)  # H^-1
            torch.linalg.cholesky_ex(cm, out=(cm, info))  # cm = L2, L2 L2^T = H^-1: H = L2^T
            if int(info) == 0:
                return H
        extra = extra * 10 if extra else 1e-6 * mean
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after extra damping")


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - W_hat) H (W - W_hat)^T): the summed squared output error on the inputs of H (/2n)."""
    d = (w.double() - w_hat.double())
    return float(torch.einsum("ij,jk,ik->", d, h.double(), d))
