"""What each baseline keeps, checked against hand-computed expectations."""

import pytest
import torch
import torch.nn.functional as F

from tokenprune.reducers._ops import grid_shape, resolve_budget
from tokenprune.reducers.baselines import AvgPool, RandomPrune, UniformSample, uniform_indices
from tokenprune.types import VisualTokens


def raster_tokens(grid, d=3):
    n = grid[0] * grid[1]
    return VisualTokens(torch.arange(n * d, dtype=torch.float32).reshape(1, n, d), grid)


def test_budget_from_keep_or_ratio():
    assert resolve_budget(576, 144, None) == 144
    assert resolve_budget(576, None, 0.25) == 144
    assert resolve_budget(576, 1000, None) == 576
    with pytest.raises(ValueError, match="exactly one"):
        resolve_budget(576, 10, 0.5)
    with pytest.raises(ValueError, match="ratio"):
        resolve_budget(576, None, 1.5)


def test_grid_shape_follows_aspect_and_budget():
    assert grid_shape(144, (24, 24)) == (12, 12)
    assert grid_shape(64, (24, 24)) == (8, 8)
    assert grid_shape(48, (6, 8)) == (6, 8)
    assert grid_shape(12, (6, 8)) == (3, 4)
    rows, cols = grid_shape(50, (24, 24))
    assert rows * cols == 49


def test_uniform_exact_budget_on_cell_centres():
    index = uniform_indices(144, (24, 24))
    expected = torch.tensor([r * 24 + c for r in range(1, 24, 2) for c in range(1, 24, 2)])
    assert torch.equal(index, expected)
    odd = uniform_indices(50, (24, 24))
    assert odd.numel() == 50 and odd.unique().numel() == 50
    out = UniformSample(keep=50)(raster_tokens((24, 24)))
    assert out.lengths.tolist() == [50]


def test_pool_matches_average_of_cells():
    t = raster_tokens((4, 4), d=2)
    out = AvgPool(keep=4)(t)
    plane = t.features[0].T.reshape(2, 4, 4)
    expected = F.avg_pool2d(plane, 2).flatten(1).T
    assert torch.equal(out.features[0], expected)
    assert out.index[0].tolist() == [5, 7, 13, 15]  # the cell-centre patches


def test_random_is_seeded_sorted_and_seed_dependent():
    t = raster_tokens((24, 24))
    a, b, c = (
        RandomPrune(keep=100, seed=0)(t),
        RandomPrune(keep=100, seed=0)(t),
        RandomPrune(keep=100, seed=1)(t),
    )
    assert torch.equal(a.index, b.index) and not torch.equal(a.index, c.index)
    assert torch.equal(a.index[0], a.index[0].sort().values)
