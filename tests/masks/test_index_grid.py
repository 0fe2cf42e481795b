"""index_grid makes the b, h, q_idx, kv_idx grids a mod is evaluated on; ranges are made on the
device (torch.arange) rather than copied from the host: the values must be those of the range."""
import pytest
import torch

from flex_flash_infer.core.mask_eval import INDEX_DTYPE, index_grid

RANGES = [range(4), range(3, 11), range(0, 10, 3), range(9, 0, -4), range(0), range(5, 3), range(-3, 2)]


@pytest.mark.parametrize("r", RANGES, ids=str)
def test_ranges_give_their_values_in_the_index_dtype(r):
    b, h, q, kv = index_grid(r, r, r, r, "cpu")
    for grid, dim in ((b, 0), (h, 1), (q, 2), (kv, 3)):
        assert grid.dtype == INDEX_DTYPE and grid.dim() == 4
        assert grid.shape[dim] == len(r) and grid.numel() == len(r)
        assert grid.flatten().tolist() == list(r)


def test_lists_and_tensors_still_pass_as_they_are():
    keys = torch.tensor([7, 2, 9])
    b, h, q, kv = index_grid([0, 2], (1,), [5], keys, "cpu")
    assert b.flatten().tolist() == [0, 2] and h.flatten().tolist() == [1] and q.flatten().tolist() == [5]
    assert kv.flatten().tolist() == [7, 2, 9] and kv.dtype == INDEX_DTYPE
