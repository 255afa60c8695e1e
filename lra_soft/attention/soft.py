"""SOFT: softmax-free attention with linear complexity (Lu et al., "SOFT: Softmax-free Transformer with Linear
Complexity", NeurIPS 2021).

With Q = K (one shared projection) and the Gaussian kernel S_ij = exp(-||q_i - q_j||^2 / (2 sqrt(d))) (eq. 5), the
n x n attention matrix is replaced by its Nystrom approximation through m bottleneck tokens (landmarks) Q~ (eq. 9):

    S^ = exp(Q - K~) A^+ exp(Q~ - K),   A = exp(Q~ - K~) (m x m),   P = exp(Q~ - K) (m x n)

and the output S^ V is computed right to left as P^T (A^+ (P V)), so no n x n matrix is ever formed. A^+ is the
Moore-Penrose inverse, by Newton-Raphson iterations A_{k+1} = 2 A_k - A_k A A_k (eq. 10, Algorithm 2).

Shapes: b batch, h heads, n tokens, m landmarks, d head dim. Choices this implementation makes, and why:
- Landmarks (Section 3.2 / 4.4 "Token sampling"): 1D average pooling with window = stride (the paper's LRA setting,
  Section 4.5: window 4, so m = ceil(n / 4)) is the default; `conv`, `random` and `first` ("biased") are options;
  `num_landmarks` cuts each sequence's own valid length into m segments instead (m fixed, cost linear in n).
- Padding: padded tokens are left out of the landmark means, of the keys and of the values; a landmark with no valid
  token is removed from A by replacing its row and column with the identity's, which leaves the valid block's inverse
  (and its Newton iterates) unchanged. Outputs at valid positions therefore do not depend on the padding.
- The Newton initialisation follows the paper (Section 3.2): alpha = 2 beta^i / ||A||_1^2, beta = 0.5, with the
  smallest i <= 10 such that ||I - alpha A A||_1 <= 1.01 (the tolerance of the authors' code), chosen per matrix,
  never shared across the batch; alpha is scaled by 1 - 2^-10 so that i = 0 cannot sit exactly on the boundary of
  convergence (see `newton_alpha`). `newton_init="spectral"` scales alpha by a power-iteration estimate of the largest
  eigenvalue instead, which converges several iterations sooner.
- The backward pass of the inverse uses the analytic gradient of the inverse, d(A^-1) = -A^-1 dA A^-1, evaluated at
  the final iterate (as the authors' 2022 code does), instead of keeping 20 iterates for autograd; because the output
  only needs A^+ W with W = P V (m x d), it costs two m x m x d products. `newton_grad="unrolled"` differentiates
  through the iterations instead (exact for the truncated iteration, memory O(iters m^2)).
- Distances, kernels and the inverse run in float32 (float64 for float64 inputs), outside autocast; squared distances
  are clamped at 0. The kernel is one matrix product of augmented vectors [x, -|x|^2/2, 1] . [y, 1, -|y|^2/2] followed
  by one in-place exponential, with a hand-written backward that keeps only the kernel matrix.
- Speed: the n x m work runs in token blocks that stay in cache, where padding and the d^-1/4 scale are
  applied too, so no masked or scaled copy of q, v or their gradients is made, and the output keeps the head split's
  memory layout (merging heads is free). Empty landmarks get exactly-zero kernel rows from the augmented vectors
  instead of masking passes over m x m matrices. `inverse="solve"` factors A + ridge I with a blocked Cholesky
  (`_linalg`, CPU); without gradients, Newton applies Algorithm 2 to W in product form (`_newton_apply`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lra_soft.attention import _linalg
from lra_soft.attention._common import check_mask, merge_heads, split_heads, zero_padding
from lra_soft.dropout import Dropout

SAMPLING = ("avgpool", "conv", "random", "first")
INVERSE = ("newton", "solve", "pinv")
NEWTON_INIT = ("paper", "spectral")
NEWTON_GRAD = ("analytic", "unrolled")
CHUNK_ELEMENTS, MIN_CHUNK = 1 << 22, 256  # CPU blocking of the m x n kernel work (see _chunks)


# --- the Gaussian kernel exp(-||x - y||^2 / 2) on pre-scaled vectors (eqs. 5, 8) --------------------------------------

def _augment(x: Tensor, last: str, empty: Tensor | None = None) -> Tensor:
    """[x, -|x|^2/2, 1] ("left") or [x, 1, -|x|^2/2] ("right"): their product is x.y - |x|^2/2 - |y|^2/2.

    Rows where `empty` (broadcastable to (..., rows, 1)) is True get a hugely negative -|x|^2/2, so that their kernel
    entries exp(min(0, .)) underflow to exactly 0 without a separate masking pass over the product."""
    half = -0.5 * (x * x).sum(-1, keepdim=True)
    if empty is not None:
        half = half.masked_fill(empty, torch.finfo(x.dtype).min / 4)  # twice this is still finite: no inf, no NaN
    ones = torch.ones_like(half)
    return torch.cat([x, half, ones] if last == "left" else [x, ones, half], dim=-1)


def _kernel_product(left: Tensor, right: Tensor) -> Tensor:
    """exp(min(0, left . right)) (..., m, n) for augmented left (..., m, d + 2) and right (..., n, d + 2) vectors: one
    product, one in-place clamp and exponential."""
    return (left @ right.transpose(-1, -2)).clamp_(max=0.0).exp_()


def _with_ones(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)  # (..., d + 1): G @ [x, 1] = [G x, rowsum G]


def _kernel_backward(G: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of sum(G * K) w.r.t. x (..., m, d) and y (..., n, d) given G = dL/dK * K (..., m, n)."""
    gx = G @ _with_ones(y)  # (..., m, d + 1): [G y, rowsum G]
    gy = G.transpose(-1, -2) @ _with_ones(x)  # [G^T x, colsum G]
    grad_x = torch.addcmul(gx[..., :-1], gx[..., -1:], x, value=-1)
    grad_y = torch.addcmul(gy[..., :-1], gy[..., -1:], y, value=-1)
    return grad_x, grad_y


class _GaussianKernel(torch.autograd.Function):
    """K = exp(-||x - y||^2 / 2) for x (..., m, d), y (..., n, d), keeping only K, x and y for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        kernel = _kernel_product(_augment(x, "left"), _augment(y, "right"))
        ctx.save_for_backward(x, y, kernel)
        return kernel

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, y, kernel = ctx.saved_tensors
        return _kernel_backward(grad * kernel, x, y)  # d/d(logit) of the exponential is K


def gaussian_kernel(x: Tensor, y: Tensor) -> Tensor:
    """exp(-||x_i - y_j||^2 / 2) for already scaled x (..., m, d), y (..., n, d); returns (..., m, n)."""
    return _GaussianKernel.apply(x, y)


# --- Newton-Raphson Moore-Penrose inverse (Algorithm 2, eq. 10) -------------------------------------------------------

def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def newton_alpha(A: Tensor, init: str = "paper", nonnegative: bool | None = None) -> tuple[Tensor, Tensor | None]:
    """The initial scale alpha (..., 1, 1) of A_0 = alpha A, per matrix, and A @ A when it was computed on the way.

    "paper": alpha = 2 beta^i / ||A||_1^2 with beta = 0.5 and the smallest i in 0..10 such that
    ||I - alpha A A||_1 <= 1.01 (Section 3.2; the tolerance and the 10 halvings of the authors' code).
    "spectral": alpha = 1 / (1.1 lambda)^2 with lambda a 12-step power-iteration estimate of the largest
    eigenvalue of the symmetric PSD matrix A, so that alpha A^2 has spectrum in (0, ~1].
    nonnegative: whether every entry of A is >= 0 (kernel matrices are), which makes the "paper" search O(m) per
    candidate; None checks (a device sync).
    """
    if init not in NEWTON_INIT:
        raise ValueError(f"unknown newton_init {init!r}; choose from {list(NEWTON_INIT)}")
    if init == "spectral":
        u = torch.ones_like(A[..., :1])  # (..., m, 1): the Perron vector of a positive matrix is positive
        for _ in range(12):
            u = A @ u
            u = u / u.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)
        lam = (u * (A @ u)).sum(-2, keepdim=True).clamp_min(torch.finfo(A.dtype).tiny)  # Rayleigh quotient
        return 1.0 / (1.1 * lam) ** 2, None
    norm1 = A.abs().sum(-2).amax(-1)[..., None, None]  # (..., 1, 1) max column abs-sum
    A2 = A @ A
    # lambda_max <= ||A||_1 with equality for constant row sums (every 2 x 2 kernel matrix, identical landmarks);
    # there alpha = 2 / ||A||_1^2 puts alpha lambda_max^2 exactly at 2, where the iteration stalls or diverges. The
    # factor 1 - 2^-10 keeps it strictly inside the region of convergence and changes nothing else.
    alpha0 = 2.0 * (1 - 2.0 ** -10) / norm1.clamp_min(torch.finfo(A.dtype).tiny) ** 2
    betas = 0.5 ** torch.arange(11, dtype=A.dtype, device=A.device)  # (11,)
    if nonnegative if nonnegative is not None else bool((A >= 0).all()):
        # A A >= 0 entrywise, so column j of |I - a A A| sums to |1 - a c_jj| + a (colsum_j - c_jj): O(m) per candidate.
        diag, colsum = A2.diagonal(dim1=-2, dim2=-1), A2.sum(-2)  # (..., m)
        a = alpha0[..., 0] * betas  # (..., 11)
        resid = ((1 - a[..., :, None] * diag[..., None, :]).abs()
                 + a[..., :, None] * (colsum - diag)[..., None, :]).amax(-1)  # (..., 11)
    else:
        eye = _eye_like(A)
        resid = torch.stack([(eye - alpha0 * b * A2).abs().sum(-2).amax(-1) for b in betas], dim=-1)
    ok = resid <= 1.01
    first = torch.where(ok.any(-1), ok.int().argmax(-1), torch.full_like(ok[..., 0], 10, dtype=torch.long))
    return alpha0 * betas[first][..., None, None], A2


def _newton_iterate(A: Tensor, iters: int, init: str, nonnegative: bool | None = None) -> Tensor:
    """A_T of Algorithm 2 without autograd; A_{k+1} = 2 A_k - A_k (A A_k) as one fused product per step."""
    with torch.no_grad():
        alpha, A2 = newton_alpha(A, init, nonnegative)
        Z = alpha * A
        for k in range(iters):
            AZ = alpha * A2 if (k == 0 and A2 is not None) else A @ Z  # reuse A A from the initialisation
            m = Z.shape[-1]
            Z = torch.baddbmm(Z.reshape(-1, m, m), Z.reshape(-1, m, m), AZ.reshape(-1, m, m), beta=2.0,
                              alpha=-1.0).view_as(Z)
        return Z


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


class _NewtonInverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A: Tensor, iters: int, init: str) -> Tensor:
        Z = _newton_iterate(A, iters, init)
        ctx.save_for_backward(Z)
        return Z

    @staticmethod
    def backward(ctx, grad: Tensor):
        (Z,) = ctx.saved_tensors
        Zt = Z.transpose(-1, -2)
        return -(Zt @ grad @ Zt), None, None  # d(A^-1) = -A^-1 dA A^-1


def newton_inverse(A: Tensor, iters: int = 20, init: str = "paper") -> Tensor:
    """Moore-Penrose inverse of A (..., m, m) by Algorithm 2, with the analytic inverse gradient in backward."""
    _check_square(A)
    return _NewtonInverse.apply(A, iters, init)


def newton_inverse_unrolled(A: Tensor, iters: int = 20, init: str = "paper") -> Tensor:
    """Algorithm 2 with autograd through every iteration: the exact gradient of the truncated iteration."""
    _check_square(A)
    alpha, _ = newton_alpha(A.detach(), init)
    Z = alpha * A
    for _ in range(iters):
        Z = 2 * Z - Z @ (A @ Z)
    return Z


def _ridge_cholesky(A: Tensor, ridge: float, cholesky=torch.linalg.cholesky_ex) -> Tensor:
    """Cholesky factor of A (..., m, m), a PSD matrix whose diagonal already holds `ridge`, by `cholesky` (torch's
    on the reference path, `_linalg.cholesky` on the fused one). Float32 rounding can make a near-singular A slightly
    indefinite, so the ridge grows 100-fold (at most three times) for the matrices whose factorisation fails."""
    factor, info = cholesky(A)
    if torch.compiler.is_compiling():  # no data-dependent retry inside a compiled graph; a failure shows up as NaN
        return factor
    for attempt in range(1, 4):
        if not bool(info.any()):
            return factor
        extra = (info != 0).to(A.dtype)[..., None, None] * (ridge * 100 ** attempt - ridge)  # (..., 1, 1)
        factor, info = cholesky(A + extra * _eye_like(A))
    if bool(info.any()):
        raise FloatingPointError(f"Cholesky of the landmark matrix failed even with ridge {ridge * 100 ** 3:g}; "
                                 "are there NaN or inf values in the input?")
    return factor


def _check_square(A: Tensor) -> None:
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"expected square matrices (..., m, m), got shape {tuple(A.shape)}")


# --- bottleneck tokens (Section 3.2, "Sampling"; Section 4.4, "Token sampling") ---------------------------------------

def _segment_means(q: Tensor, mask: Tensor | None, window: int, num_landmarks: int | None) -> tuple[Tensor, Tensor]:
    """Masked means of q (b, h, n, d) over windows of `window` positions, or over `num_landmarks` equal segments of
    each sequence's own valid tokens. Returns landmarks (b, h, m, d) and their validity (b, m)."""
    b, h, n, d = q.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    if num_landmarks is not None and mask is None and n % num_landmarks == 0:
        window, num_landmarks = n // num_landmarks, None  # equal contiguous segments: the same as pooling
    if num_landmarks is None:
        m = math.ceil(n / window)
        q = F.pad(zero_padding(q, mask), (0, 0, 0, m * window - n))
        sums = q.view(b, h, m, window, d).sum(3)  # (b, h, m, d)
        counts = F.pad(valid, (0, m * window - n)).view(b, m, window).sum(-1)  # (b, m)
    else:
        m = num_landmarks
        rank = valid.long().cumsum(-1) - 1  # position among the valid tokens
        length = valid.sum(-1, keepdim=True).clamp_min(1)
        segment = torch.where(valid, rank * m // length, m)  # (b, n); padded tokens go to a discarded bin m
        index = segment[:, None, :, None].expand(b, h, n, d)
        sums = q.new_zeros(b, h, m + 1, d).scatter_add_(2, index, q)[:, :, :m]
        counts = valid.new_zeros(b, m + 1, dtype=torch.long).scatter_add_(1, segment, valid.long())[:, :m]
    landmarks = sums / counts.clamp_min(1)[:, None, :, None].to(q.dtype)
    return landmarks, counts > 0


def _token_landmarks(q: Tensor, mask: Tensor | None, sampling: str, window: int,
                     num_landmarks: int | None) -> tuple[Tensor, Tensor]:
    """`random` or `first` (biased) valid tokens as landmarks: m = num_landmarks, or ceil(valid length / window)."""
    b, h, n, d = q.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    length = valid.sum(-1, keepdim=True)  # (b, 1)
    m = num_landmarks if num_landmarks is not None else math.ceil(n / window)
    m_own = length if num_landmarks is not None else -(-length // window)  # landmarks this sequence may use
    if sampling == "random":
        score = torch.rand(b, n, device=q.device)
    else:
        score = -valid.long().cumsum(-1).to(torch.float32)  # earlier valid tokens score higher
    score = score.masked_fill(~valid, float("-inf"))
    top, index = score.topk(min(m, n), dim=-1)  # (b, m')
    keep = torch.isfinite(top) & (torch.arange(top.shape[-1], device=q.device) < m_own.clamp(max=m))
    landmarks = q.gather(2, index[:, None, :, None].expand(b, h, index.shape[-1], d))
    return landmarks, keep


def sample_landmarks(q: Tensor, mask: Tensor | None = None, *, sampling: str = "avgpool", window: int = 4,
                     num_landmarks: int | None = None) -> tuple[Tensor, Tensor]:
    """Bottleneck tokens Q~ (b, h, m, d) of q (b, h, n, d) and their validity (b, m). `conv` needs learned weights and
    lives in `SoftAttention`."""
    if sampling == "avgpool":
        return _segment_means(q, mask, window, num_landmarks)
    if sampling in ("random", "first"):
        return _token_landmarks(q, mask, sampling, window, num_landmarks)
    if sampling == "conv":
        raise ValueError("sampling='conv' uses learned weights: use SoftAttention, or pass landmarks= yourself")
    raise ValueError(f"unknown sampling {sampling!r}; choose from {list(SAMPLING)}")


# --- the Nystrom product P^T (A^+ (P V)) with a hand-written backward -------------------------------------------------

def _chunks(n: int, rows: int, device: torch.device) -> list[tuple[int, int]]:
    """Token ranges for the m x n work: on CPU, blocks of about 2^22 kernel entries (16 MB), so that each block of P
    is built, exponentiated, used and (in backward) multiplied while it is still in the last-level cache; one block on
    GPUs. (A sweep of 2^18..2^22 and no blocking, with the allocator tuned, at batch 32 / n 2048 / m 64, at n 4096 and
    16384 / m 64, and at n 4096 / m 1024: 2^22 was the fastest or within 3% of it everywhere.)"""
    size = n if device.type != "cpu" else max(MIN_CHUNK, CHUNK_ELEMENTS // max(rows, 1))
    return [(s, min(s + size, n)) for s in range(0, n, size)]


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


def _token_block(q: Tensor, mask: Tensor | None, s: int, e: int, scale: float) -> Tensor:
    """[s q_j, 1, -|s q_j|^2 / 2] for the tokens j in s:e (padded ones: [0, 1, 0]): (b, h, e - s, d + 2), the right
    factor of P's block (see `_augment`); its first d + 1 columns are also the [q, 1] of the backward."""
    b, h, _, d = q.shape
    block = q.new_empty(b, h, e - s, d + 2)
    x = _gather_tokens(block[..., :d], q, mask, s, e, scale)
    block[..., d] = 1.0
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
    product, clamp, exp in place) and used while in cache; scaling and padding are applied per block. The backward
    touches each block of P twice (once for grad_Y, once for everything else: one product for both gradients of P,
    one in-place multiply) and never forms the gradient of the m x m inverse. Empty landmarks have all-zero rows in
    P and identity rows and columns in A (see `_augment`), so they carry nothing, without masking passes. A^+ is
    applied by Newton iterations (analytic inverse gradient) or a ridge Cholesky solve.
    """

    @staticmethod
    def forward(ctx, landmarks, q, v, mask, keep, inverse, iters, init, ridge, scale):
        b, h, m, _ = landmarks.shape
        chunks = _chunks(q.shape[-2], b * h * m, q.device)
        empty = ~keep  # (b, 1, m, 1)
        L_aug = _augment(landmarks, "left", empty)  # (b, h, m, d + 2)
        Ps, Qs, Vs, W = [], [], [], None
        for s, e in chunks:
            Q = _token_block(q, mask, s, e, scale)  # (b, h, c, d + 2)
            P = _kernel_product(L_aug, Q)  # (b, h, m, c)
            V = _gather_tokens(v.new_empty(*v.shape[:2], e - s, v.shape[-1]), v, mask, s, e)  # (b, h, c, d)
            PV = P @ V
            W = PV if W is None else W.add_(PV)  # (b, h, m, d)
            Ps.append(P), Qs.append(Q), Vs.append(V)
        A = _landmark_matrix(L_aug, landmarks, empty, ridge if inverse == "solve" else 0.0)  # (b, h, m, m)
        if inverse == "newton" and not any(ctx.needs_input_grad[:3]):
            factor, Y = None, _newton_apply(A, W, iters, init, nonnegative=True)  # inference: half the products
        elif inverse == "newton":
            factor = _newton_iterate(A, iters, init, nonnegative=True)  # Z ~ A^+ (m x m)
            Y = factor @ W
        else:
            factor = _ridge_cholesky(A, ridge, _linalg.cholesky)
            Y = _linalg.cho_solve(factor, W)
        out = torch.empty_like(q)  # q's layout: a head split's (b, n, h, d) memory stays so, merging is free
        keep_tokens = None if mask is None else mask.to(Y.dtype)  # (b, n)
        for P, (s, e) in zip(Ps, chunks):
            _write_rows(out, P.transpose(-1, -2) @ Y, keep_tokens, s, e)  # (b, h, c, d)
        ctx.inverse, ctx.chunks, ctx.scale = inverse, chunks, scale
        ctx.save_for_backward(landmarks, mask, keep_tokens, A, factor, Y, *Ps, *Qs, *Vs)
        # the gradients take q's and v's layouts; data-free "meta" copies keep shape, strides and dtype, not memory
        ctx.layout = (torch.empty_like(q, device="meta"), torch.empty_like(v, device="meta"))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        landmarks, mask, keep_tokens, A, factor, Y, *blocks = ctx.saved_tensors
        scale, chunks = ctx.scale, ctx.chunks
        k = len(chunks)
        Ps, Qs, Vs = blocks[:k], blocks[k:2 * k], blocks[2 * k:]
        b, h, m, d = landmarks.shape
        dv = Y.shape[-1]
        GVs, grad_Y = [], 0  # GV: [grad_out, v] of a block's tokens, the right factor of dL/dP
        for P, V, (s, e) in zip(Ps, Vs, chunks):
            GV = Y.new_empty(b, h, e - s, 2 * dv)
            GV[..., dv:] = V
            grad_Y = grad_Y + P @ _gather_tokens(GV[..., :dv], grad_out, mask, s, e)  # (b, h, m, d)
            GVs.append(GV)
        if ctx.inverse == "newton":
            grad_W = factor.transpose(-1, -2) @ grad_Y
        else:
            grad_W = _linalg.cho_solve(factor, grad_Y)  # A is symmetric
        Y_gW = torch.cat([Y, grad_W], -1)  # (b, h, m, 2d)
        L_one = _with_ones(landmarks)  # (b, h, m, d + 1)
        grad_q = torch.empty_like(ctx.layout[0], device=Y.device)
        grad_v = torch.empty_like(ctx.layout[1], device=Y.device)
        acc = 0
        for P, Q, GV, (s, e) in zip(Ps, Qs, GVs, chunks):
            _write_rows(grad_v, P.transpose(-1, -2) @ grad_W, keep_tokens, s, e)
            # dL/dP = Y grad_out^T + grad_W v^T as one product; then times P for the exponential
            G = (Y_gW @ GV.transpose(-1, -2)).mul_(P)  # (b, h, m, c)
            acc = acc + G @ Q[..., :d + 1]  # (b, h, m, d + 1): [G s q, rowsum G]
            gy = G.transpose(-1, -2) @ L_one  # (b, h, c, d + 1): [G^T l, colsum G]
            grad_q[..., s:e, :] = torch.addcmul(gy[..., :-1], gy[..., -1:], Q[..., :d], value=-1).mul_(scale)
        # Through A: dL/dA = -grad_W Y^T (the analytic inverse gradient), times A for the exponential. As A's two
        # arguments are the same landmarks, both gradients of the kernel come from the symmetric S = G_A + G_A^T:
        # dL/dl = S l - rowsum(S) l. Diagonal entries (where the ridge and the empty landmarks' 1 sit) contribute
        # S_ii (l_i - l_i) = 0.
        S = (Y_gW @ torch.cat([grad_W, Y], -1).transpose(-1, -2)).mul_(A).neg_()  # (b, h, m, m)
        acc = acc + S @ L_one
        grad_L = torch.addcmul(acc[..., :-1], acc[..., -1:], landmarks, value=-1)
        return grad_L, grad_q, grad_v, None, None, None, None, None, None, None


# --- SOFT (Algorithm 1, eq. 9) ----------------------------------------------------------------------------------------

def _check_options(sampling, window, num_landmarks, inverse, iters, newton_init, newton_grad) -> None:
    if sampling not in SAMPLING:
        raise ValueError(f"unknown sampling {sampling!r}; choose from {list(SAMPLING)}")
    if inverse not in INVERSE:
        raise ValueError(f"unknown inverse {inverse!r}; choose from {list(INVERSE)}")
    if newton_init not in NEWTON_INIT:
        raise ValueError(f"unknown newton_init {newton_init!r}; choose from {list(NEWTON_INIT)}")
    if newton_grad not in NEWTON_GRAD:
        raise ValueError(f"unknown newton_grad {newton_grad!r}; choose from {list(NEWTON_GRAD)}")
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if num_landmarks is not None and not (isinstance(num_landmarks, int) and num_landmarks >= 1):
        raise ValueError(f"num_landmarks must be a positive integer or None, got {num_landmarks!r}")
    if not (isinstance(iters, int) and iters >= 0):
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")


def soft_attention(q: Tensor, v: Tensor, mask: Tensor | None = None, *, sampling: str = "avgpool", window: int = 4,
                   num_landmarks: int | None = None, inverse: str = "newton", iters: int = 20,
                   newton_init: str = "paper", newton_grad: str = "analytic", ridge: float = 1e-6,
                   landmarks: Tensor | None = None, landmark_mask: Tensor | None = None) -> Tensor:
    """SOFT attention P^T (A^+ (P V)) (eq. 9) on q, v of shape (b, h, n, d), with K = Q.

    mask: bool (b, n), True = real token. landmarks: optional bottleneck tokens (b, h, m, d) in q's space (e.g. from a
    2D strided convolution), with optional validity landmark_mask (b, m); when given, `sampling` is not used.
    inverse: "newton" (Algorithm 2, `iters` steps), "solve" (Cholesky of A + ridge I) or "pinv" (torch.linalg.pinv,
    the reference). Returns (b, h, n, d) in q's dtype; rows of padded tokens are zero.
    """
    _check_options(sampling, window, num_landmarks, inverse, iters, newton_init, newton_grad)
    if q.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"expected q, v of shape (b, h, n, d) with equal (b, h, n); got {tuple(q.shape)}, "
                         f"{tuple(v.shape)}")
    if mask is not None and (mask.shape != (q.shape[0], q.shape[2]) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool of shape (b, n) = {(q.shape[0], q.shape[2])}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    out_dtype = q.dtype
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        scale = q.shape[-1] ** -0.25  # exp(-||q - k||^2 / (2 sqrt(d))) = exp(-||s q - s k||^2 / 2), s = d^-1/4
        q, v = q.to(dtype), v.to(dtype)
        if landmarks is None:  # means are linear, so the landmarks of s q are s times those of q
            landmarks, landmark_mask = sample_landmarks(q, mask, sampling=sampling, window=window,
                                                        num_landmarks=num_landmarks)
        else:
            landmarks = landmarks.to(dtype)
            if landmark_mask is None:
                landmark_mask = torch.ones(landmarks.shape[0], landmarks.shape[2], dtype=torch.bool,
                                           device=q.device)
        keep = landmark_mask[:, None, :, None]  # (b, 1, m, 1)
        landmarks = landmarks.masked_fill(~keep, 0.0) * scale  # (b, h, m, d); empty ones may hold padding values

        if inverse in ("newton", "solve") and newton_grad == "analytic":
            out = _SoftProduct.apply(landmarks, q, v, mask, keep, inverse, iters, newton_init, ridge, scale)
        else:  # the reference paths: plain autograd through pinv, or through every Newton iteration
            q = zero_padding(q, mask) * scale
            v = zero_padding(v, mask)  # padded values contribute nothing to P V
            # A = exp(Q~ - K~) (m x m); an empty landmark becomes an identity row/column, which leaves the valid
            # block's inverse (and every Newton iterate of it) unchanged.
            A = gaussian_kernel(landmarks, landmarks)  # (b, h, m, m)
            A = torch.where(keep & keep.transpose(-1, -2), A, _eye_like(A))
            P = gaussian_kernel(landmarks, q)  # (b, h, m, n); columns of padded keys meet v = 0 below
            W = (P @ v) * keep  # (b, h, m, d); empty landmarks carry nothing
            if inverse == "newton":
                Y = newton_inverse_unrolled(A, iters, newton_init) @ W
            elif inverse == "solve":
                Y = torch.cholesky_solve(W, _ridge_cholesky(A + ridge * _eye_like(A), ridge))
            else:
                Y = torch.linalg.pinv(A, hermitian=True) @ W
            out = zero_padding(P.transpose(-1, -2) @ Y, mask)  # (b, h, n, d)
        return out.to(out_dtype)


class SoftAttention(nn.Module):
    """SOFT: Gaussian-kernel attention without softmax, Nystrom-approximated through m landmarks (linear in n)."""

    def __init__(self, dim: int, heads: int, *, max_len: int, dropout: float = 0.0, sampling: str = "avgpool",
                 window: int = 4, num_landmarks: int | None = None, inverse: str = "newton", iters: int = 20,
                 newton_init: str = "paper", newton_grad: str = "analytic", ridge: float = 1e-6):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        _check_options(sampling, window, num_landmarks, inverse, iters, newton_init, newton_grad)
        if sampling == "conv" and num_landmarks is not None:
            raise ValueError("sampling='conv' has a fixed kernel = stride = window; it cannot take num_landmarks")
        self.heads = heads
        self.options = dict(sampling=sampling, window=window, num_landmarks=num_landmarks, inverse=inverse,
                            iters=iters, newton_init=newton_init, newton_grad=newton_grad, ridge=ridge)
        self.W_q = nn.Linear(dim, dim)  # shared query/key projection: Q = K (Section 3.1)
        self.W_v = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, dim)
        head_dim = dim // heads
        # Learned landmarks: kernel = stride = window, no bias, shared by the heads (Section 4.4).
        self.conv = nn.Conv1d(head_dim, head_dim, window, stride=window, bias=False) if sampling == "conv" else None
        self.drop = Dropout(dropout)

    def conv_landmarks(self, q: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        b, h, n, d = q.shape
        w = self.options["window"]
        m = math.ceil(n / w)
        x = F.pad(zero_padding(q, mask), (0, 0, 0, m * w - n)).reshape(b * h, m * w, d).transpose(1, 2)
        landmarks = self.conv(x).transpose(1, 2).reshape(b, h, m, d)
        valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
        return landmarks, F.pad(valid, (0, m * w - n)).view(b, m, w).any(-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = check_mask(x, mask)
        q, v = split_heads(self.W_q(x), self.heads), split_heads(self.W_v(x), self.heads)  # (b, h, n, d)
        landmarks = landmark_mask = None
        if self.conv is not None:
            landmarks, landmark_mask = self.conv_landmarks(q, mask)
        out = soft_attention(q, v, mask, landmarks=landmarks, landmark_mask=landmark_mask, **self.options)
        return self.drop(self.ff(merge_heads(out.to(v.dtype))))
