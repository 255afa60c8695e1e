"""SOFT's product out = P^T (A^+ (P V)) (eq. 9 of Lu et al., NeurIPS 2021) fused for the CPU, with a hand-written
backward. It computes what `soft_reference.soft_product_reference` computes, takes the same arguments, and is tested
against it (outputs and gradients, float64, padding masks: tests/test_soft_fused.py, tests/test_soft_newton.py).

What it does differently, for speed:
- The n x m work runs in token blocks that stay in cache (`_chunks`), where padding and the d^-1/4 scale are applied
  too, so no masked or scaled copy of q, v or their gradients is made, and the output keeps the head split's memory
  layout (merging heads is free). Empty landmarks get exactly-zero kernel rows from the augmented vectors (see
  `soft_reference._augment`) instead of masking passes over m x m matrices.
- The backward pass of the inverse uses the analytic gradient of the inverse, d(A^-1) = -A^-1 dA A^-1, evaluated at
  the final iterate (as the authors' 2022 code does), instead of keeping 20 iterates for autograd; because the output
  only needs A^+ W with W = P V (m x d), it costs two m x m x d products, and the m x m gradient is never formed.
- Newton on CPU for m >= 256 (the paper's LRA setting, window 4, from n = 1024) does not run the 2 T m x m products
  of Algorithm 2 (eq. 10): every iterate is a polynomial in the symmetric A, so A_T = V diag(p) V^T with
  A = V diag(lam) V^T and p Algorithm 2's scalar recursion on each eigenvalue (`_newton_spectrum`): the same A_T,
  converged or not, from one float64 eigendecomposition, applied to the thin W and grad_Y. Forward+backward at batch
  8, 2 heads, head dim 32, side by side in one process on the idle 2-core Xeon: n = 4096 (m = 1024) 1540 ms against
  3960 ms iterated, 3.15x SDPA's time against 8.11x; n = 2048 2.11x against 4.40x; n = 1024 1.72x against 2.58x
  (under load from another job, n = 4096: 6.36x against 9.41x). The 16 decompositions at m = 1024 take 1.15 s,
  the 40 products 3.6 s. Inference (no gradients) takes this path too: 1305 ms against 2141 ms for the product form
  at n = 4096, 217 against 322 ms at 2048. Float32 A_T W on realistic landmark matrices (window-4 means of
  unit-scale q, d 32, n = 1024 to 4096) against float64 Algorithm 2: 0.7-1.2e-7 relative, against 0.9-1.3e-6 for
  float32 Algorithm 2 (a float32 decomposition would give 0.5-1.8e-5); the float32 outputs and q / v gradients of
  the whole product: at most 5.7e-7 on this path, 8.1e-7 iterated.
- Only the blocks of P are kept for backward besides q and v themselves (not copies) and m x m / m x d matrices:
  the token blocks are gathered again in backward, which works on halves of the blocks. At m = 64, n = 16384 (batch
  8, 2 heads, head dim 32) that took the forward+backward peak from 1.25x SDPA's (364 MiB) to 0.94x (274 MiB; SDPA
  291 MiB), at 0.96-0.98x the CPU time (one thread, side by side).
- `inverse="solve"` factors A + ridge I with a blocked Cholesky (`_linalg`, CPU); without gradients and below
  m = 256 (or off the CPU), Newton applies Algorithm 2 to W in product form (`_newton_apply`).

Shapes: b batch, h heads, n tokens, c tokens of one block, m landmarks, d head dim.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from lra_soft.attention import _linalg
from lra_soft.attention.soft_reference import (SoftOptions, _augment, _kernel_product, _newton_iterate,
                                               _ridge_cholesky, _with_ones, newton_alpha, newton_alpha_symmetric)

CHUNK_ELEMENTS, MIN_CHUNK = 1 << 22, 256  # CPU blocking of the m x n kernel work (see _chunks)
BACKWARD_SPLIT = 2  # the backward works on halves of those blocks (see _split_blocks)
SPECTRAL_MIN_LANDMARKS = 256  # CPU, m from here on: Newton's A_T from one eigendecomposition (see _spectral)
EIGH_PER_THREAD = True  # that decomposition one matrix per thread, each single-threaded (see _eigh)


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


def _observed() -> bool:
    """Whether a dispatch mode (FlopCounterMode) or the profiler watches this thread. Both are private torch
    functions, so a torch without them counts as unobserved rather than failing."""
    try:
        from torch.utils._python_dispatch import is_in_torch_dispatch_mode
        return bool(is_in_torch_dispatch_mode() or torch._C._autograd._profiler_enabled())
    except (ImportError, AttributeError):
        return False


def _eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (..., m) and orthonormal eigenvectors (..., m, m) of the symmetric A (its lower triangle is read),
    in float64, one matrix at a time on each of torch's intra-op threads, each decomposition single-threaded.

    Float64, because a float32 decomposition is exact only for a matrix eps ||A|| away, and the small eigenvalues of a
    Gaussian kernel matrix turn that into relative errors of about eps ||A|| / lambda where A_T ~ 1 / lambda is
    largest: float32 A_T W came out 5-20x less accurate than float32 Algorithm 2, float64 10-14x more accurate
    (module docstring). One matrix per thread, because LAPACK's eigensolver reduces A to tridiagonal form with
    matrix-vector products, thousands of short parallel regions per matrix, and on a CPU shared with other work each
    of them waits for a descheduled thread: measured under load, 16 float64 matrices of 1024 x 1024 took 3.3-76 s on
    LAPACK's two threads, 2.24 s on one and 2.30-2.46 s this way (16 float32 ones of 256 x 256: 25.6 s on two threads,
    52 ms on one). Independent single-threaded decompositions have no such waits, and on the idle machine they were
    as fast as LAPACK's two threads (module docstring). Under a dispatch mode or the profiler, which would not see
    other threads, the same decompositions run one after the other in the calling thread (so the benchmark's FLOPs
    are exact, and its peak memory lacks the second thread's temporaries, about 4 m^2 float64 entries). While
    compiling, or with EIGH_PER_THREAD off, torch.linalg.eigh runs as torch threads it."""
    if torch.compiler.is_compiling() or not EIGH_PER_THREAD:
        return torch.linalg.eigh(A.to(torch.float64))
    m = A.shape[-1]
    A3 = A.reshape(-1, m, m)
    lam = A3.new_empty(A3.shape[:-1], dtype=torch.float64)  # (B, m)
    V = A3.new_empty(A3.shape, dtype=torch.float64).transpose(-1, -2)  # (B, m, m) column-major, as LAPACK writes it
    threads = torch.get_num_threads()

    def decompose(indices: range) -> None:
        torch.set_num_threads(1)  # this thread's OpenMP and MKL settings; restored below for threads started later
        try:
            for i in indices:
                w, U = torch.linalg.eigh(A3[i].to(torch.float64))
                lam[i], V[i] = w, U
        finally:
            torch.set_num_threads(threads)

    # FlopCounterMode (a dispatch mode) and the profiler see only their own thread: run the same loop in this one
    observed = _observed()
    workers = 1 if observed else min(threads, A3.shape[0])
    share = -(-A3.shape[0] // workers)
    parts = [range(i, min(i + share, A3.shape[0])) for i in range(0, A3.shape[0], share)]
    if len(parts) == 1:
        decompose(parts[0])
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            list(pool.map(decompose, parts))  # list(): re-raises a worker's exception here
    return lam.view(A.shape[:-1]), V.view(A.shape)


def _newton_spectrum(A: Tensor, iters: int, init: str) -> tuple[Tensor, Tensor]:
    """Algorithm 2's A_T (eq. 10, T = iters) as V diag(p) V^T, from one eigendecomposition A = V diag(lam) V^T.

    Every iterate is a polynomial in A (A_0 = alpha A, and A_{k+1} = 2 A_k - A_k A A_k keeps it one), so A_T has A's
    eigenvectors, and on each eigenvalue the iteration is the scalar one: a_0 = alpha lam, a_{k+1} = 2 a_k -
    a_k lam a_k (in closed form 1 - lam a_T = (1 - alpha lam^2)^(2^T), so A_T = alpha A sum_{j < 2^T} E^j with
    E = I - alpha A^2). Running that recursion on the eigenvalues is Algorithm 2 itself, converged or not, with the
    same alpha and the same T: O(m T) work instead of 2 T products of m x m matrices (the decomposition took as
    long as 13 of them at m = 1024; module docstring). alpha is the paper's rule without forming A A
    (`newton_alpha_symmetric`). Returns V (..., m, m) and p (..., m), float64 (see `_eigh`)."""
    with torch.no_grad():
        alpha = newton_alpha_symmetric(A, init)  # (..., 1, 1), in A's dtype as Algorithm 2 computes it
        lam, V = _eigh(A)  # (..., m), (..., m, m)
        p = alpha[..., 0].to(lam.dtype) * lam  # A_0 = alpha A
        for _ in range(iters):
            p = p * (2 - lam * p)  # A_{k+1} = A_k (2I - A A_k), on each eigenvalue
        return V, p


def _spectral_apply(V: Tensor, p: Tensor, X: Tensor) -> Tensor:
    """V diag(p) V^T X for X (..., m, d): two thin products in V's dtype, returned in X's."""
    return (V @ (p[..., None] * (V.transpose(-1, -2) @ X.to(V.dtype)))).to(X.dtype)


def _spectral(A: Tensor) -> bool:
    """Whether Newton takes A_T from `_newton_spectrum`, in training and inference: on CPU for m >= 256
    (SPECTRAL_MIN_LANDMARKS). On the idle 2-core machine, 16 matrices: the decompositions (`_eigh`) took 10.5 / 23.3
    / 32.6 / 162 ms at m = 128 / 192 / 256 / 512, training's 40 products 6.3 / 31.9 / 57.8 / 409 ms; inference's 21
    (`_newton_apply`) cost about half of those, as much as the decomposition at m = 256. On GPUs batched eigensolvers
    are slow next to matrix products (not measured: there was no GPU), so the iteration stays."""
    return A.device.type == "cpu" and A.shape[-1] >= SPECTRAL_MIN_LANDMARKS


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
    gradient; their spectral form for large m on CPU) or a ridge Cholesky solve.
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
        if inverse == "newton" and _spectral(A):
            method, factors = "spectrum", _newton_spectrum(A, iters, init)  # A_T = V diag(p) V^T
            Y = _spectral_apply(*factors, W)
        elif inverse == "newton" and not any(ctx.needs_input_grad[:3]):
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
        if ctx.method == "spectrum":
            grad_W = _spectral_apply(*factors, grad_Y)  # A_T is symmetric
        elif ctx.method == "iterate":
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
