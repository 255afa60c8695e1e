"""At initialisation, what the first attention layer does to the residual stream of the LRA encoder (Table 6's
2-layer harness, ``lra_soft.encoder``) on real ListOps examples: how large each attention's output is against its
input, how much of each token's own identity survives the first residual sum, and how much of the loss's gradient
reaches the token embeddings along that residual path.

    python scripts/init_scale.py data/cache/listops/raw --n 2048 \
        --attn softmax --attn nystrom --attn nystrom:conv_kernel=0 --attn soft:num_landmarks=64 --attn soft

Reads ``basic_test.tsv`` (the first ``--batch`` examples, padded to ``--n``), builds the encoder with each attention
at the same seed and prints, over the real tokens of the batch:

- ``|attn| / |x|``: the Frobenius norm of the first block's attention output over that of its input x (the token +
  position embeddings, N(0, 0.02) each). SOFT's kernel exp(-|q_i - q_j|^2 / (2 sqrt(d))) is not normalised, so
  each output sums about n kernel values; softmax-normalised attentions average their values instead.
- ``cos before / after``: the mean cosine similarity of each token's vector with the batch's mean vector, in x and in
  x + attn. Near 1 after the attention, every token holds about the same vector: the identity of a single position
  (ListOps' answer sits in its first token) is left as a small difference.
- ``|dL/dE|`` and ``residual path``: the norm of the gradient of the whole model's cross-entropy on the batch's labels
  (dropout off) with respect to the token embedding table E, and the part of it that flows along the first block's
  residual connection (the first attention's input detached). Through the attention every token's gradient is a
  sum over the sequence; the residual path is where each token's gradient is its own.
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from lra_soft.attention._common import split_heads
from lra_soft.attention.soft import SoftAttention, gaussian_kernel
from lra_soft.bench.specs import parse_specs
from lra_soft.config import EncoderConfig
from lra_soft.encoder import build_model
from tasks.listops import VOCAB, read_tsv


def batch(path: Path, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first `size` examples of a ListOps TSV, truncated to n tokens and zero-padded to n, and their labels."""
    ids = torch.zeros(size, n, dtype=torch.long)
    labels = torch.zeros(size, dtype=torch.long)
    for i, (_, seq, label) in enumerate(itertools.islice(read_tsv(path), size)):
        seq = torch.tensor(list(seq))[:n]
        ids[i, :len(seq)], labels[i] = seq, label
    return ids, ids != 0, labels  # (b, n), (b, n) with True = real token, (b,)


def mean_cosine(x: torch.Tensor) -> float:
    """(tokens, c) -> the mean cosine similarity of each row with the mean row."""
    return F.cosine_similarity(x, x.mean(0, keepdim=True).expand_as(x)).mean().item()


def model_at_init(spec, n: int, seed: int) -> torch.nn.Module:
    """The harness's ListOps classifier with this attention, in eval mode (no dropout), at this seed."""
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=len(VOCAB), max_len=n, attention=spec.name, attention_options=spec.options,
                        pooling="mean_padded", attention_fp32=True)
    return build_model(cfg).eval()


def effective_rank(A: torch.Tensor) -> torch.Tensor:
    """(..., m, m) symmetric positive semi-definite -> (sum lambda)^2 / sum lambda^2, between 1 and m."""
    eigenvalues = torch.linalg.eigvalsh(A.double()).clamp_min(0)  # (..., m)
    return eigenvalues.sum(-1) ** 2 / eigenvalues.pow(2).sum(-1)


def landmark_rank(attn: torch.nn.Module, h: torch.Tensor, mask: torch.Tensor) -> float | None:
    """The mean effective rank of SOFT's landmark kernel A over examples and heads, for the attention's input h
    (b, n, c); None for an attention without landmarks of SOFT's kind."""
    if not isinstance(attn, SoftAttention):
        return None
    q = split_heads(attn.W_q(h), attn.heads)  # (b, h, n, d)
    landmarks, keep = attn.landmarks(q, mask)  # (b, h, m, d), (b, m)
    scaled = landmarks * q.shape[-1] ** -0.25  # the kernel's exp(-|x - y|^2 / (2 sqrt(d)))
    ranks = [effective_rank(gaussian_kernel(L[:, k], L[:, k])) for L, k in zip(scaled, keep)]  # (h,) each
    return torch.cat(ranks).mean().item()


@torch.no_grad()
def first_block(spec, ids: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[float, float, float, float | None]:
    encoder = model_at_init(spec, ids.shape[1], seed).encoder
    block = encoder.blocks[0]
    x = encoder.tokens(ids) + encoder.positions(torch.arange(ids.shape[1]))  # (b, n, c)
    h = block.norm1(x)
    a = block.attn(h, mask)                                                  # (b, n, c)
    rank = landmark_rank(block.attn, h, mask)
    return (a[mask].norm() / x[mask].norm()).item(), mean_cosine(x[mask]), mean_cosine((x + a)[mask]), rank


def embedding_gradients(spec, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                        seed: int) -> tuple[float, float]:
    """|dL/dE| in full, and along the first block's residual path only (its attention's input detached)."""
    norms = []
    for residual_only in (False, True):
        model = model_at_init(spec, ids.shape[1], seed)
        if residual_only:  # the attention still runs on the same values; no gradient flows into E through it
            model.encoder.blocks[0].attn.register_forward_pre_hook(lambda _, args: (args[0].detach(), *args[1:]))
        F.cross_entropy(model(ids, mask), labels).backward()
        norms.append(model.encoder.tokens.weight.grad.norm().item())
    return norms[0], norms[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path, help="folder with basic_test.tsv (a generated cache keeps it in raw/)")
    parser.add_argument("--n", type=int, default=2048, help="padded length (the harness's 2048)")
    parser.add_argument("--batch", type=int, default=4, help="examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn", action="append", default=[], help="NAME[:key=value,...], repeatable")
    args = parser.parse_args()
    path = args.raw / "basic_test.tsv"
    if not path.is_file():
        parser.error(f"{path} does not exist: pass the folder of the ListOps TSVs (e.g. data/cache/listops/raw)")
    specs = parse_specs(args.attn or ["softmax", "nystrom", "soft:num_landmarks=64", "soft"])
    ids, mask, labels = batch(path, args.n, args.batch)
    print(f"n = {args.n}, {args.batch} test examples, {int(mask.sum())} real tokens, seed {args.seed}")
    width = max(len("attention"), *(len(spec.label) for spec in specs))
    print(f"{'attention':{width}s} {'|attn| / |x|':>12s} {'cos before':>10s} {'cos after':>10s} {'|dL/dE|':>9s} "
          f"{'residual path':>13s} {'landmark rank':>13s}")
    for spec in specs:
        ratio, before, after, rank = first_block(spec, ids, mask, args.seed)
        full, residual = embedding_gradients(spec, ids, mask, labels, args.seed)
        rank = "-" if rank is None else f"{rank:.2f}"
        print(f"{spec.label:{width}s} {ratio:12.2f} {before:10.3f} {after:10.3f} {full:9.2e} {residual:13.2e} "
              f"{rank:>13s}")


if __name__ == "__main__":
    main()
