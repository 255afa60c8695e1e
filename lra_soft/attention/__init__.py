"""The attention registry: one dict, one constructor, one ``forward(x, mask=None)`` for every variant.

Every variant is built as ``cls(dim, heads, *, max_len, dropout=0.0, **options)`` and called as ``attn(x, mask)`` with
``x`` of shape (b, n, dim) and ``mask`` a bool (b, n) tensor, True = real token; it returns (b, n, dim).
"""
from __future__ import annotations

import inspect

from torch import nn

from lra_soft.attention.gaussian import GaussianAttention
from lra_soft.attention.linformer import LinformerAttention
from lra_soft.attention.nystrom import NystromAttention
from lra_soft.attention.performer import PerformerAttention
from lra_soft.attention.reformer import ReformerAttention
from lra_soft.attention.soft import SoftAttention
from lra_soft.attention.softmax import SoftmaxAttention

ATTENTION: dict[str, type[nn.Module]] = {
    "softmax": SoftmaxAttention,
    "soft": SoftAttention,
    "gaussian": GaussianAttention,
    "linformer": LinformerAttention,
    "performer": PerformerAttention,
    "nystrom": NystromAttention,
    "reformer": ReformerAttention,
}

# Time and memory of one call in the sequence length n (per head, for a fixed head dim), as `cli.py attentions` lists
# them; the letters are each variant's options (SOFT's m is n / window with sampling=avgpool, else num_landmarks).
COST: dict[str, str] = {
    "softmax": "O(n^2)",
    "soft": "O(n m), m = n/window or num_landmarks",
    "gaussian": "O(n^2)",
    "linformer": "O(n k)",
    "performer": "O(n num_features)",
    "nystrom": "O(n num_landmarks)",
    "reformer": "O(n_hashes n (bucket_size + log n))",
}


def attention_options(name: str) -> dict[str, object]:
    """The options a variant accepts, with their defaults (everything after ``dropout`` in its constructor)."""
    params = inspect.signature(_lookup(name).__init__).parameters
    skip = {"self", "dim", "heads", "max_len", "dropout"}
    return {k: p.default for k, p in params.items() if k not in skip and p.kind is p.KEYWORD_ONLY}


def build_attention(name: str, dim: int, heads: int, *, max_len: int, dropout: float = 0.0, **options) -> nn.Module:
    """Build a registered attention; unknown names and options fail at once and list the choices."""
    cls = _lookup(name)
    unknown = sorted(set(options) - set(attention_options(name)))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for attention {name!r}; valid options: "
                         f"{attention_options(name)}")
    return cls(dim, heads, max_len=max_len, dropout=dropout, **options)


def _lookup(name: str) -> type[nn.Module]:
    if name not in ATTENTION:
        raise ValueError(f"unknown attention {name!r}; choose from {sorted(ATTENTION)}")
    return ATTENTION[name]
