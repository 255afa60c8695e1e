"""SOFT's product out = P^T (A^+ (P V)) (eq. 9 of Lu et al., NeurIPS 2021) fused for the CPU, with a hand-written
backward. It computes what `soft_reference.soft_product_reference` computes, takes the same arguments, and is tested
against it (outputs and gradients, float64, padding masks: tests/test_soft_fused.py).

What it does differently, for speed:
- The n x m work runs in token blocks that stay in cache (`_chunks`), where padding and the d^-1/4 scale are applied
  too, so no masked or scaled copy of q, v or their gradients is made, and the output keeps the head split's memory
  layout (merging heads is free). Empty landmarks get exactly-zero kernel rows from the augmented vectors (see
  `soft_reference._augment`) instead of masking passes over m x m matrices.
- The backward pass of the inverse uses the analytic gradient of the inverse, d(A^-1) = -A^-1 dA A^-1, evaluated at
  the final iterate (as the authors' 2022 code does), instead of keeping 20 iterates for autograd; because the output
  only needs A^+ W with W = P V (m x d), it costs two m x m x d products, and the m x m gradient is never formed.
- Only the blocks of P are kept for backward besides q and v themselves (not copies) and m x m / m x d matrices:
  the token blocks are gathered again in backward, which works on halves of the blocks. At m = 64, n = 16384 (batch
  8, 2 heads, head dim 32) that took the forward+backward peak from 1.25x SDPA's (364 MiB) to 0.94x (274 MiB; SDPA
  291 MiB), at 0.96-0.98x the CPU time (one thread, side by side).
- `inverse="solve"` factors A + ridge I with a blocked Cholesky (`_linalg`, CPU); without gradients, Newton applies
  Algorithm 2 to W in product form (`_newton_apply`).

Shapes: b batch, h heads, n tokens, c tokens of one block, m landmarks, d head dim.
"""
from __future__ import annotations

import torch
from torch import Tensor

from lra_soft.attention import _linalg
from lra_soft.attention.soft_reference import (SoftOptions, _augment, _kernel_product, _newton_iterate,
                                               _ridge_cholesky, _with_ones, newton_alpha)

CHUNK_ELEMENTS, MIN_CHUNK = 1 << 22, 256  # CPU blocking of the m x n kernel work (see _chunks)
BACKWARD_SPLIT = 2  # the backward works on halves of those blocks (see _split_blocks)


def _newton_apply(A: Tensor, W: Tensor, iters: int, init: str, nonnegative: bool | None = None) -> Tensor:
    """A_T W (Algorithm 2 applied to W (..., m, d)) at half the cost, for inference.

    Every iterate is a polynomial in A, so with T_k = A A_k the update A_{k+1} = A_k (2I - T_k) gives
    T_{k+1} = T_k (2I - T_k) and A_T = A_0 prod_k (2I - T_k), with commuting factors. Applying the factors to the thin
    W as they come costs one m x m product per iteration (the squaring of T) instead of two; in exact arithmetic the
    result is Algorithm 2's A_T W. Used when no gradient is needed, where A_T itself is never required.
    """
    with torch.no_grad():
        alpha, A2 = newton_alpha(A, init, nonnegative)
        T = alpha * (A2 if A2 is not None else A @ A)  # T_0 = A A_0
        m = T.shape[-1]
        for k in range(iters):
            W = W * 2 - T @ W  # (2I - T_k) W
            if k + 1 < iters:
                T = torch.baddbmm(T.reshape(-1, m, m), T.reshape(-1, m, m), T.reshape(-1, m, m), beta=2.0,
                                  alpha=-1.0).view_as(T)
        return alpha * (A @ W)


def _chunks(n: int, rows: int, device: torch.device) -> list[tuple[int, int]]:
    """Token ranges for the m x n work: on CPU, blocks of about 2^22 kernel entries (16 MB), so that each block of P
    is built, exponentiated, used and (in backward) multiplied while it is still in the last-level cache; one block on
    GPUs. (A sweep of 2^18..2^22 and no blocking, with the allocator tuned, at batch 32 / n 2048 / m 64, at n 4096 and
    16384 / m 64, and at n 4096 / m 1024: 2^22 was the fastest or within 3% of it everywhere.)"""
    size = n if device.type != "cpu" else max(MIN_CHUNK, CHUNK_ELEMENTS // max(rows, 1))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _split_blocks(Ps: list[Tensor], chunks: list[tuple[int, int]], parts: int):
    """(columns of a block of P, their token range) with each block cut into `parts`: the backward's temporaries for
    a block (m x c and c x 2d) then take that much less memory. At batch 8, 2 heads, head dim 32, m = 64, n = 16384,
    halves took SOFT's forward+backward peak from 290 to 274 MiB (SDPA's: 291) at no measured cost in time."""
    for P, (s, e) in zip(Ps, chunks):
        size = -(-(e - s) // parts)
        for i in range(s, e, size):
            j = min(i + size, e)
            yield P[..., i - s:j - s], (i, j)


def _write_rows(out: Tensor, block: Tensor, keep: Tensor | None, s: int, e: int) -> None:
    """out[..., s:e, :] = block, with the padded rows zero; `keep` is the float mask (b, n). A multiplication, which
    is several times faster than a masked fill here, is safe because the blocks written are finite wherever the
    inputs are (padded tokens enter them only as zero rows)."""
    if keep is None:
        out[..., s:e, :] = block
    elif torch.compiler.is_compiling():  # dynamo refuses non-contiguous out= tensors
        out[..., s:e, :] = block * keep[:, None, s:e, None]
    else:
        torch.mul(block, keep[:, None, s:e, None], out=out[..., s:e, :])


def _gather_tokens(out: Tensor, x: Tensor, mask: Tensor | None, s: int, e: int, scale: float = 1.0) -> Tensor:
    """Rows s:e of x (b, h, n, d) copied into the block `out` (b, h, e - s, d), padded rows zeroed, times `scale`.

    One read of x in whatever layout it has (e.g. the (b, n, h, d) memory of a head split), with the padding zeroed
    on the way (a select, so that even NaN or inf in padded rows cannot leak); the scaling then acts on the block in
    cache. This replaces masked and scaled copies of the whole of q and v (and of their gradients)."""
    if mask is None:
        out.copy_(x[..., s:e, :])
    elif torch.compiler.is_compiling():  # dynamo refuses non-contiguous out= tensors
        out.copy_(torch.where(mask[:, None, s:e, None], x[..., s:e, :], 0.0))
    else:
        torch.where(mask[:, None, s:e, None], x[..., s:e, :], x.new_zeros(()), out=out)
    return out.mul_(scale) if scale != 1.0 else out


def _token_block(q: Tensor, mask: Tensor | None, s: int, e: int, scale: float, norms: bool = True) -> Tensor:
    """[s q_j, 1, -|s q_j|^2 / 2] for the tokens j in s:e (padded ones: [0, 1, 0]): (b, h, e - s, d + 2), the right
    factor of P's block (see `_augment`). Without `norms`, [s q_j, 1] (b, h, e - s, d + 1), what the backward reads."""
    b, h, _, d = q.shape
    block = q.new_empty(b, h, e - s, d + 1 + norms)
    x = _gather_tokens(block[..., :d], q, mask, s, e, scale)
    block[..., d] = 1.0
    if norms:
        block[..., d + 1] = (x * x).sum(-1).mul_(-0.5)
    return block


def _landmark_matrix(L_aug: Tensor, landmarks: Tensor, empty: Tensor, diagonal: float) -> Tensor:
    """A = exp(-||l_i - l_j||^2 / 2) (b, h, m, m) from the landmarks and their left augmentation L_aug (the one P
    uses), with empty landmarks' rows and columns set to the identity's (exp underflows to 0 there, then 1 is added on
    the diagonal) and `diagonal` (a ridge) added to every A_ii."""
    A = _kernel_product(L_aug, _augment(landmarks, "right", empty))
    A.diagonal(dim1=-2, dim2=-1).add_(empty[..., 0].to(A.dtype) + diagonal)  # (b, 1, m) broadcast over heads
    return A


class _SoftProduct(torch.autograd.Function):
    """out = P^T (A^+ (P V)) with P = exp(-||l - s q||^2 / 2) (m x n), A = exp(-||l - l||^2 / 2) (m x m), s = scale.

    q, v (b, h, n, d) come unscaled and unmasked, in any layout (e.g. the (b, n, h, d) memory of a head split), and
    the output and input gradients are written in that same layout. P is built block by block over the tokens (one
    product, clamp, exp in place) and used while in cache; scaling and padding are applied per block. Only the blocks
    of P are kept for backward, besides q and v themselves (not copies of them) and the m x m and m x d matrices: the
    token blocks are gathered again. The backward touches each block of P twice (once for
    grad_Y, once for everything else: one product for both gradients of P, one in-place multiply) and never forms the
    gradient of the m x m inverse. Empty landmarks have all-zero rows in P and identity rows and columns in A (see
    `_augment`), so they carry nothing, without masking passes. A^+ is applied by Newton iterations (analytic inverse
    gradient) or a ridge Cholesky solve.
    """

    @staticmethod
    def forward(ctx, landmarks, q, v, mask, keep, inverse, iters, init, ridge, scale):
        b, h, m, _ = landmarks.shape
        chunks = _chunks(q.shape[-2], b * h * m, q.device)
        empty = ~keep  # (b, 1, m, 1)
        L_aug = _augment(landmarks, "left", empty)  # (b, h, m, d + 2)
        Ps, W = [], None
        for s, e in chunks:
            P = _kernel_product(L_aug, _token_block(q, mask, s, e, scale))  # (b, h, m, c)
            V = _gather_tokens(v.new_empty(*v.shape[:2], e - s, v.shape[-1]), v, mask, s, e)  # (b, h, c, d)
            PV = P @ V
            W = PV if W is None else W.add_(PV)  # (b, h, m, d)
            Ps.append(P)
        A = _landmark_matrix(L_aug, landmarks, empty, ridge if inverse == "solve" else 0.0)  # (b, h, m, m)
        if inverse == "newton" and not any(ctx.needs_input_grad[:3]):
            method, factors = None, ()
            Y = _newton_apply(A, W, iters, init, nonnegative=True)  # inference: half the products
        elif inverse == "newton":
            method, factors = "iterate", (_newton_iterate(A, iters, init, nonnegative=True),)  # Z ~ A^+ (m x m)
            Y = factors[0] @ W
        else:
            method, factors = "cholesky", (_ridge_cholesky(A, ridge, _linalg.cholesky),)
            Y = _linalg.cho_solve(factors[0], W)
        out = torch.empty_like(q)  # q's layout: a head split's (b, n, h, d) memory stays so, merging is free
        keep_tokens = None if mask is None else mask.to(Y.dtype)  # (b, n)
        for P, (s, e) in zip(Ps, chunks):
            _write_rows(out, P.transpose(-1, -2) @ Y, keep_tokens, s, e)  # (b, h, c, d)
        ctx.method, ctx.chunks, ctx.scale, ctx.n_factors = method, chunks, scale, len(factors)
        ctx.save_for_backward(landmarks, q, v, mask, keep_tokens, A, Y, *factors, *Ps)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        landmarks, q, v, mask, keep_tokens, A, Y, *blocks = ctx.saved_tensors
        factors, Ps = blocks[:ctx.n_factors], blocks[ctx.n_factors:]
        scale, chunks = ctx.scale, ctx.chunks
        b, h, m, d = landmarks.shape
        dv = Y.shape[-1]
        grad_Y = 0
        for P, (s, e) in zip(Ps, chunks):
            grad_Y = grad_Y + P @ _gather_tokens(Y.new_empty(b, h, e - s, dv), grad_out, mask, s, e)  # (b, h, m, d)
        if ctx.method == "iterate":
            grad_W = factors[0].transpose(-1, -2) @ grad_Y
        else:
            grad_W = _linalg.cho_solve(factors[0], grad_Y)  # A is symmetric
        Y_gW = torch.cat([Y, grad_W], -1)  # (b, h, m, 2d)
        L_one = _with_ones(landmarks)  # (b, h, m, d + 1)
        grad_q, grad_v = torch.empty_like(q), torch.empty_like(v)  # in q's and v's layouts
        acc = 0
        for P, (s, e) in _split_blocks(Ps, chunks, BACKWARD_SPLIT):  # P: (b, h, m, c)
            _write_rows(grad_v, P.transpose(-1, -2) @ grad_W, keep_tokens, s, e)
            # The block's tokens are gathered again, [grad_out, v] and then [s q, 1] as in forward: cheap next to the
            # products, and no more than one block's temporaries are held at a time.
            GV = Y.new_empty(b, h, e - s, 2 * dv)  # (b, h, c, 2d)
            _gather_tokens(GV[..., :dv], grad_out, mask, s, e)
            _gather_tokens(GV[..., dv:], v, mask, s, e)
            # dL/dP = Y grad_out^T + grad_W v^T as one product; then times P for the exponential
            G = (Y_gW @ GV.transpose(-1, -2)).mul_(P)  # (b, h, m, c)
            del GV
            Q = _token_block(q, mask, s, e, scale, norms=False)  # (b, h, c, d + 1)
            acc = acc + G @ Q  # (b, h, m, d + 1): [G s q, rowsum G]
            gy = G.transpose(-1, -2) @ L_one  # (b, h, c, d + 1): [G^T l, colsum G]
            del G
            grad_q[..., s:e, :] = gy[..., :-1].addcmul_(gy[..., -1:], Q[..., :d], value=-1).mul_(scale)
            del Q, gy
        # Through A: dL/dA = -grad_W Y^T (the analytic inverse gradient), times A for the exponential. As A's two
        # arguments are the same landmarks, both gradients of the kernel come from the symmetric S = G_A + G_A^T:
        # dL/dl = S l - rowsum(S) l. Diagonal entries (where the ridge and the empty landmarks' 1 sit) contribute
        # S_ii (l_i - l_i) = 0.
        S = (Y_gW @ torch.cat([grad_W, Y], -1).transpose(-1, -2)).mul_(A).neg_()  # (b, h, m, m)
        acc = acc + S @ L_one
        grad_L = torch.addcmul(acc[..., :-1], acc[..., -1:], landmarks, value=-1)
        return grad_L, grad_q, grad_v, None, None, None, None, None, None, None


def soft_product(landmarks: Tensor, q: Tensor, v: Tensor, mask: Tensor | None, landmark_mask: Tensor, scale: float,
                 options: SoftOptions) -> Tensor:
    """P^T (A^+ (P V)) (eq. 9), fused: the arguments and result of `soft_product_reference`, for inverse="newton"
    with the analytic gradient and inverse="solve"."""
    if options.inverse not in ("newton", "solve") or options.newton_grad != "analytic":
        raise ValueError(f"the fused product runs inverse='newton' or 'solve' with newton_grad='analytic', got "
                         f"inverse={options.inverse!r}, newton_grad={options.newton_grad!r}")
    keep = landmark_mask[:, None, :, None]  # (b, 1, m, 1)
    return _SoftProduct.apply(landmarks, q, v, mask, keep, options.inverse, options.iters, options.newton_init,
                              options.ridge, scale)
