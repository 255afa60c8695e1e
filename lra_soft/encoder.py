"""The 2-layer LRA encoder of the SOFT paper's Table 6 (Section 4.5: "We follow the configurations of [39], with 2
layers, 64 and 128 hidden dimension respectively, and 2 attention heads"), i.e. the Nystromformer PyTorch harness:

    token + learned position embeddings (N(0, 0.02)) -> dropout
    -> depth x pre-norm block:  x = x + Attn(LN(x), mask);  x = x + MLP(LN(x))
       (MLP: Linear-GELU-Dropout-Linear-Dropout)
    -> final LayerNorm, padded rows zeroed -> pooling -> head (Linear-ReLU-Linear)

Any registered attention fits (``lra_soft.attention.build_attention``); each applies dropout to its own output, as the
harness's ``dropout(Attn(...))`` does. With ``attention_fp32`` the attention runs outside autocast in float32, as the
harness's does under fp16 AMP (there only the core is float32; the projections are too here). Pooling: "mean"
averages over real tokens; "mean_padded" is the harness's ``mean(dim=1)`` over all positions (sum / padded length,
so the padded length scales the logits; docs/pitfalls.md, #14);
"cls" prepends a learned CLS vector and reads it out. Retrieval (``pair=True``) encodes both documents with the same
weights and classifies ``[x1, x2, x1*x2, x1-x2]`` (the harness's SCHeadDual).

Shapes: b batch, n tokens, c model width (``dim``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lra_soft.attention import build_attention
from lra_soft.config import EncoderConfig
from lra_soft.dropout import Dropout
from lra_soft.mlp import MLP

POOLINGS = ("mean", "mean_padded", "cls")


def pool(x: Tensor, mask: Tensor, mode: str) -> Tensor:
    """(b, n, c) with padded rows already zero -> (b, c)."""
    if mode == "mean":
        return x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)
    if mode == "mean_padded":
        return x.mean(1)
    if mode == "cls":
        return x[:, 0]
    raise ValueError(f"unknown pooling {mode!r}; choose from {POOLINGS}")


class Block(nn.Module):
    """Pre-norm transformer block around any registered attention."""

    def __init__(self, cfg: EncoderConfig, max_len: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = build_attention(cfg.attention, cfg.dim, cfg.heads, max_len=max_len, dropout=cfg.dropout,
                                    **cfg.attention_options)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim, cfg.dropout)
        self.attention_fp32 = cfg.attention_fp32

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        if self.attention_fp32:  # the harness: attention in float32 even under fp16 autocast
            with torch.autocast(x.device.type, enabled=False):
                x = x + self.attn(self.norm1(x).float(), mask)
        else:
            x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))  # (b, n, c)


class Encoder(nn.Module):
    """Token ids (b, n) and a bool mask (b, n), True = real token -> pooled features (b, c)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {cfg.pooling!r}; choose from {POOLINGS}")
        self.cfg = cfg
        self.extra = 1 if cfg.pooling == "cls" else 0  # the CLS vector takes one position
        self.tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.positions = nn.Embedding(cfg.max_len + self.extra, cfg.dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if self.extra else None
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, cfg.max_len + self.extra) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        for emb in (self.tokens, self.positions):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        b, n = ids.shape
        if n > self.cfg.max_len:
            raise ValueError(f"input has {n} tokens but the encoder was built for max_len={self.cfg.max_len}; "
                             "pass a larger --max-len or truncate the data")
        if ids.max() >= self.cfg.vocab_size or ids.min() < 0:
            raise ValueError(f"token ids span [{int(ids.min())}, {int(ids.max())}] but vocab_size is "
                             f"{self.cfg.vocab_size}; the data and the model config disagree")
        x = self.tokens(ids)  # (b, n, c)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, 1, -1).to(x.dtype), x], dim=1)  # (b, 1 + n, c)
            mask = torch.cat([mask.new_ones(b, 1), mask], dim=1)
        x = self.drop(x + self.positions(torch.arange(x.shape[1], device=ids.device)))
        # An unpadded batch (Image's and Pathfinder's, whose sequences have one length) reaches the attentions without
        # a mask: each reads None as "all tokens real" and skips its masking passes, the same result faster
        # (docs/benchmarks.md). Checked on CPU only: elsewhere the check would be a device sync every forward, and
        # under torch.compile a graph break, so there the mask always goes through (the same result).
        padded = x.device.type != "cpu" or torch.compiler.is_compiling() or not bool(mask.all())
        for block in self.blocks:
            x = block(x, mask if padded else None)
        x = self.norm(x)  # (b, n, c)
        if padded:
            x = x * mask[..., None].to(x.dtype)  # padded rows zero before pooling
        return pool(x, mask, self.cfg.pooling)  # (b, c)


class LRAClassifier(nn.Module):
    """Encoder + classification head; with ``cfg.pair`` one shared encoder for two documents (retrieval)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        width = 4 * cfg.dim if cfg.pair else cfg.dim
        self.head = nn.Sequential(nn.Linear(width, cfg.mlp_dim), nn.ReLU(), nn.Linear(cfg.mlp_dim, cfg.num_classes))

    def forward(self, input_ids: Tensor, mask: Tensor, input_ids2: Tensor | None = None,
                mask2: Tensor | None = None) -> Tensor:
        x = self.encoder(input_ids, mask)  # (b, c)
        if self.cfg.pair:
            if input_ids2 is None or mask2 is None:
                raise ValueError("a pair model (retrieval) needs input_ids2 and mask2 for the second document")
            x2 = self.encoder(input_ids2, mask2)
            x = torch.cat([x, x2, x * x2, x - x2], dim=-1)  # (b, 4c)
        return self.head(x)  # (b, classes)


def build_model(cfg: EncoderConfig) -> LRAClassifier:
    return LRAClassifier(cfg)
