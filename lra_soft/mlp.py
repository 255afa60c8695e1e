"""The transformer feed-forward block, Linear-GELU-Dropout-Linear-Dropout, shared by the LRA encoder and the SOFT
ImageNet backbones."""
from __future__ import annotations

from torch import nn

from lra_soft.dropout import Dropout


class MLP(nn.Sequential):
    """dim -> hidden -> dim. `drop_layer` is the dropout type: the project's fast CPU ``Dropout`` (the LRA encoder) or
    ``nn.Dropout`` (the ImageNet backbones). The Linears sit at indices 0 and 3, so checkpoints name them
    ``mlp.0.*`` and ``mlp.3.*``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, drop_layer: type[nn.Module] = Dropout):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), drop_layer(dropout), nn.Linear(hidden, dim),
                         drop_layer(dropout))
