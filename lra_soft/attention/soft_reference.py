"""SOFT as the paper writes it (Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity", NeurIPS 2021), in
plain PyTorch: the exact reference that the fused product (`soft_fused`) and the module (`soft`) are tested against.

With Q = K (one shared projection, Section 3.1) and the Gaussian kernel S_ij = exp(-||q_i - q_j||^2 / (2 sqrt(d)))
(eq. 5), the n x n attention matrix is replaced by its Nystrom approximation through m bottleneck tokens (landmarks) Q~
(eq. 9):

    S^ = exp(Q - K~) A^+ exp(Q~ - K),   A = exp(Q~ - K~) (m x m),   P = exp(Q~ - K) (m x n)

and the output S^ V is computed right to left as P^T (A^+ (P V)), so no n x n matrix is ever formed. A^+ is the
Moore-Penrose inverse, by Newton-Raphson iterations A_{k+1} = 2 A_k - A_k A A_k (eq. 10, Algorithm 2).

The file reads in the order of Algorithm 1: the options, the kernel (eqs. 5, 8), the inverse (Algorithm 2, eq. 10),
the bottleneck tokens Q~ = f_s(Q) (Section 3.2), the product P^T (A^+ (P V)) (eq. 9) and `soft_attention_reference`,
which differentiates all of it with plain autograd.

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
- `newton_inverse` differentiates A^+ analytically, d(A^-1) = -A^-1 dA A^-1 at the final iterate (as the authors'
  2022 code does); `newton_inverse_unrolled`, which the reference product uses, differentiates through every
  iteration (exact for the truncated iteration, memory O(iters m^2)).
- Distances, kernels and the inverse run in float32 (float64 for float64 inputs), outside autocast; squared distances
  are clamped at 0. The kernel is one matrix product of augmented vectors [x, -|x|^2/2, 1] . [y, 1, -|y|^2/2] followed
  by one in-place exponential, with a hand-written backward that keeps only the kernel matrix.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from lra_soft.attention._common import zero_padding

SAMPLING = ("avgpool", "conv", "random", "first")
INVERSE = ("newton", "solve", "pinv")
NEWTON_INIT = ("paper", "spectral")
NEWTON_GRAD = ("analytic", "unrolled")


# --- the options: declared once, here ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SoftOptions:
    """SOFT's options with their defaults (the paper's LRA setting) and their checks. `soft_attention`,
    `soft_attention_reference` and `SoftAttention` take them as keywords (see `takes_soft_options`), and the registry's
    `attention_options("soft")`, the benchmark specs, the protocol and the README table's test read them from there."""

    sampling: str = "avgpool"         # Q~ = f_s(Q): window means (Section 4.5), "conv" (learned), "random", "first"
    #                                   ("random": new draws in training; SoftAttention in eval mode draws by seed 0)
    window: int = 4                   # tokens per landmark, m = ceil(n / window) (Section 4.5: window 4)
    num_landmarks: int | None = None  # a fixed m instead: each sequence's valid tokens cut into m segments
    inverse: str = "newton"           # A^+: "newton" (Algorithm 2), "solve" (Cholesky of A + ridge I) or "pinv"
    iters: int = 20                   # Newton-Raphson iterations (Section 4.4: converged within 20)
    newton_init: str = "paper"        # alpha of A_0 = alpha A: "paper" (Section 3.2) or "spectral" (power iteration)
    newton_grad: str = "analytic"     # backward of A^+: the analytic inverse gradient, or "unrolled" iterations
    ridge: float = 1e-6               # added to A's diagonal by inverse="solve"

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise ValueError(f"unknown sampling {self.sampling!r}; choose from {list(SAMPLING)}")
        if self.inverse not in INVERSE:
            raise ValueError(f"unknown inverse {self.inverse!r}; choose from {list(INVERSE)}")
        if self.newton_init not in NEWTON_INIT:
            raise ValueError(f"unknown newton_init {self.newton_init!r}; choose from {list(NEWTON_INIT)}")
        if self.newton_grad not in NEWTON_GRAD:
            raise ValueError(f"unknown newton_grad {self.newton_grad!r}; choose from {list(NEWTON_GRAD)}")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window must be a positive integer, got {self.window!r}")
        if self.num_landmarks is not None and not (isinstance(self.num_landmarks, int) and self.num_landmarks >= 1):
            raise ValueError(f"num_landmarks must be a positive integer or None, got {self.num_landmarks!r}")
        if not (isinstance(self.iters, int) and self.iters >= 0):
            raise ValueError(f"iters must be a non-negative integer, got {self.iters!r}")


def takes_soft_options(fn):
    """Give `fn(..., **options)` a signature that lists SoftOptions' fields as keyword-only parameters with their
    defaults: what `inspect.signature`, `help()` and the registry's `attention_options` read. The values are checked
    when `fn` builds `SoftOptions(**options)`."""
    signature = inspect.signature(fn)
    kept = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    options = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(SoftOptions)]
    fn.__signature__ = signature.replace(parameters=kept + options)
    return fn


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


def _paper_candidates(A: Tensor) -> tuple[Tensor, Tensor]:
    """alpha0 = 2 (1 - 2^-10) / ||A||_1^2 (..., 1, 1) and the factors beta^i, i = 0..10, of Section 3.2's search."""
    norm1 = A.abs().sum(-2).amax(-1)[..., None, None]  # (..., 1, 1) max column abs-sum
    # lambda_max <= ||A||_1 with equality for constant row sums (every 2 x 2 kernel matrix, identical landmarks);
    # there alpha = 2 / ||A||_1^2 puts alpha lambda_max^2 exactly at 2, where the iteration stalls or diverges. The
    # factor 1 - 2^-10 keeps it strictly inside the region of convergence and changes nothing else.
    alpha0 = 2.0 * (1 - 2.0 ** -10) / norm1.clamp_min(torch.finfo(A.dtype).tiny) ** 2
    return alpha0, 0.5 ** torch.arange(11, dtype=A.dtype, device=A.device)  # (11,)


def _paper_alpha(A: Tensor, diag: Tensor, colsum: Tensor) -> Tensor:
    """The "paper" alpha of a nonnegative A from the diagonal and the column sums (..., m) of A A: as A A >= 0
    entrywise, column j of |I - a A A| sums to |1 - a c_jj| + a (colsum_j - c_jj), O(m) per candidate."""
    alpha0, betas = _paper_candidates(A)
    a = alpha0[..., 0] * betas  # (..., 11)
    resid = ((1 - a[..., :, None] * diag[..., None, :]).abs()
             + a[..., :, None] * (colsum - diag)[..., None, :]).amax(-1)  # (..., 11)
    return _first_good(alpha0, betas, resid)


def _first_good(alpha0: Tensor, betas: Tensor, resid: Tensor) -> Tensor:
    """alpha0 beta^i for the smallest i with ||I - alpha A A||_1 = resid[..., i] <= 1.01 (i = 10 if none is)."""
    ok = resid <= 1.01
    first = torch.where(ok.any(-1), ok.int().argmax(-1), torch.full_like(ok[..., 0], 10, dtype=torch.long))
    return alpha0 * betas[first][..., None, None]


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
    A2 = A @ A
    if nonnegative if nonnegative is not None else bool((A >= 0).all()):
        return _paper_alpha(A, A2.diagonal(dim1=-2, dim2=-1), A2.sum(-2)), A2
    alpha0, betas = _paper_candidates(A)
    eye = _eye_like(A)
    resid = torch.stack([(eye - alpha0 * b * A2).abs().sum(-2).amax(-1) for b in betas], dim=-1)
    return _first_good(alpha0, betas, resid), A2


def newton_alpha_symmetric(A: Tensor, init: str = "paper") -> Tensor:
    """`newton_alpha` of a symmetric A (..., m, m) with nonnegative entries (a kernel matrix) without forming A A.

    By symmetry, diag(A A)_j = sum_i A_ij^2 and the column sums of A A are A (A 1), which is all the "paper" search
    reads: O(m^2) instead of an m x m product. Equal to `newton_alpha(A, init, nonnegative=True)[0]` up to the
    rounding of those sums."""
    if init != "paper":
        return newton_alpha(A, init, nonnegative=True)[0]
    diag = (A * A).sum(-2)  # (..., m)
    colsum = (A @ A.sum(-1, keepdim=True))[..., 0]  # (..., m): A (A 1)
    return _paper_alpha(A, diag, colsum)


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


def _token_landmarks(q: Tensor, mask: Tensor | None, sampling: str, window: int, num_landmarks: int | None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """`random` (drawn from `generator`, else the global RNG) or `first` (biased) valid tokens as landmarks:
    m = num_landmarks, or ceil(valid length / window)."""
    b, h, n, d = q.shape
    valid = torch.ones(b, n, dtype=torch.bool, device=q.device) if mask is None else mask
    length = valid.sum(-1, keepdim=True)  # (b, 1)
    m = num_landmarks if num_landmarks is not None else math.ceil(n / window)
    m_own = length if num_landmarks is not None else -(-length // window)  # landmarks this sequence may use
    if sampling == "random":
        score = torch.rand(b, n, device=q.device, generator=generator)
    else:
        score = -valid.long().cumsum(-1).to(torch.float32)  # earlier valid tokens score higher
    score = score.masked_fill(~valid, float("-inf"))
    top, index = score.topk(min(m, n), dim=-1)  # (b, m')
    keep = torch.isfinite(top) & (torch.arange(top.shape[-1], device=q.device) < m_own.clamp(max=m))
    landmarks = q.gather(2, index[:, None, :, None].expand(b, h, index.shape[-1], d))
    return landmarks, keep


def sample_landmarks(q: Tensor, mask: Tensor | None = None, *, sampling: str = "avgpool", window: int = 4,
                     num_landmarks: int | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Bottleneck tokens Q~ (b, h, m, d) of q (b, h, n, d) and their validity (b, m); `random` draws from `generator`
    (on q's device) when given. `conv` needs learned weights and lives in `SoftAttention`."""
    if sampling == "avgpool":
        return _segment_means(q, mask, window, num_landmarks)
    if sampling in ("random", "first"):
        return _token_landmarks(q, mask, sampling, window, num_landmarks, generator)
    if sampling == "conv":
        raise ValueError("sampling='conv' uses learned weights: use SoftAttention, or pass landmarks= yourself")
    raise ValueError(f"unknown sampling {sampling!r}; choose from {list(SAMPLING)}")


# --- SOFT (Algorithm 1, eq. 9) ----------------------------------------------------------------------------------------

def soft_product_reference(landmarks: Tensor, q: Tensor, v: Tensor, mask: Tensor | None, landmark_mask: Tensor,
                           scale: float, options: SoftOptions) -> Tensor:
    """P^T (A^+ (P V)) (eq. 9) with plain autograd: A^+ by torch.linalg.pinv, by a Cholesky solve of A + ridge I, or
    by Algorithm 2 differentiated through every iteration (`newton_grad` is not read).

    landmarks (b, h, m, d) already scaled by `scale`, empty ones zero; q, v (b, h, n, d) unscaled, float32 or
    float64; mask (b, n) and landmark_mask (b, m) bool, True = real. Returns (b, h, n, d), rows of padded tokens zero.
    """
    keep = landmark_mask[:, None, :, None]  # (b, 1, m, 1)
    q = zero_padding(q, mask) * scale
    v = zero_padding(v, mask)  # padded values contribute nothing to P V
    # A = exp(Q~ - K~) (m x m); an empty landmark becomes an identity row/column, which leaves the valid
    # block's inverse (and every Newton iterate of it) unchanged.
    A = gaussian_kernel(landmarks, landmarks)  # (b, h, m, m)
    A = torch.where(keep & keep.transpose(-1, -2), A, _eye_like(A))
    P = gaussian_kernel(landmarks, q)  # (b, h, m, n); columns of padded keys meet v = 0 below
    W = (P @ v) * keep  # (b, h, m, d); empty landmarks carry nothing
    if options.inverse == "newton":
        Y = newton_inverse_unrolled(A, options.iters, options.newton_init) @ W
    elif options.inverse == "solve":
        Y = torch.cholesky_solve(W, _ridge_cholesky(A + options.ridge * _eye_like(A), options.ridge))
    else:
        Y = torch.linalg.pinv(A, hermitian=True) @ W
    return zero_padding(P.transpose(-1, -2) @ Y, mask)  # (b, h, n, d)


def soft_attention_with(product, q: Tensor, v: Tensor, mask: Tensor | None, landmarks: Tensor | None,
                        landmark_mask: Tensor | None, options: SoftOptions) -> Tensor:
    """Algorithm 1 around `product` (`soft_product_reference` or the fused `soft_fused.soft_product`, which take the
    same arguments): check the inputs, sample the bottleneck tokens (unless given), scale by d^-1/4 and run `product`
    in float32 (float64 for float64 inputs) outside autocast. Returns q's dtype."""
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
            landmarks, landmark_mask = sample_landmarks(q, mask, sampling=options.sampling, window=options.window,
                                                        num_landmarks=options.num_landmarks)
        else:
            landmarks = landmarks.to(dtype)
            if landmark_mask is None:
                landmark_mask = torch.ones(landmarks.shape[0], landmarks.shape[2], dtype=torch.bool,
                                           device=q.device)
        keep = landmark_mask[:, None, :, None]  # (b, 1, m, 1)
        landmarks = landmarks.masked_fill(~keep, 0.0) * scale  # (b, h, m, d); empty ones may hold padding values
        out = product(landmarks, q, v, mask, landmark_mask, scale, options)
        return out.to(out_dtype)


@takes_soft_options
def soft_attention_reference(q: Tensor, v: Tensor, mask: Tensor | None = None, *, landmarks: Tensor | None = None,
                             landmark_mask: Tensor | None = None, **options) -> Tensor:
    """SOFT attention P^T (A^+ (P V)) (eq. 9) on q, v of shape (b, h, n, d), with K = Q, by plain autograd throughout:
    the exact reference of `soft_attention` (same arguments; see there). With inverse="newton" the gradient runs
    through every iteration whatever `newton_grad` says."""
    return soft_attention_with(soft_product_reference, q, v, mask, landmarks, landmark_mask, SoftOptions(**options))
