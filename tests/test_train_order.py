"""The data order: a pure function of (seed, epoch); N processes see the same global batches as one process."""
import math

import pytest

from lra_soft.train import batch_order


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("items", [24, 27, 32])
def test_global_batches_do_not_depend_on_world_size(world, items):
    batch = 8
    per_rank = [batch_order(items, batch, seed=5, epoch=3, rank=r, world=world) for r in range(world)]
    assert all(len(b) == math.ceil(items / world) // (batch // world) for b in per_rank)
    single = batch_order(items, batch, seed=5, epoch=3, rank=0, world=1)
    if items % world == 0:  # otherwise DistributedSampler pads with repeats, as it must
        for k in range(items // batch):
            assert sorted(i for r in range(world) for i in per_rank[r][k]) == sorted(single[k])
    assert batch_order(items, batch, seed=5, epoch=3, rank=0, world=world) == per_rank[0]  # deterministic
    assert batch_order(items, batch, seed=5, epoch=4, rank=0, world=world) != per_rank[0]  # reshuffled every epoch
