"""`full_pieces`: a flat range of a rank's tensor-parallel slice, as rectangles of the full
tensor, checked element by element against cutting the full tensor by hand."""

import itertools

import pytest
import torch

from dist_llm.parallel.tensor import TensorParallel
from dist_llm.parallel.weights import full_pieces


@pytest.mark.parametrize(
    ("shape", "tp_dim", "tp_size", "padded_rows"),
    [((7, 5), None, 1, 7), ((8, 6), 0, 2, 8), ((6, 8), 1, 2, 6), ((10, 4), 0, 4, 12), ((9,), None, 1, 9)],
    ids=["whole", "rows-split", "columns-split", "vocab-padded", "1d"],
)
def test_every_element_of_a_fragment_lands_where_it_is_in_the_full_tensor(
    shape, tp_dim, tp_size, padded_rows
):
    full = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    padding = -torch.ones(padded_rows - shape[0], *shape[1:])  # the vocabulary's padding rows: -1
    padded = torch.cat([full, padding])
    for rank in range(tp_size):
        local = padded if tp_dim is None else padded.chunk(tp_size, dim=tp_dim)[rank]
        param = torch.empty_like(local)
        if tp_dim is not None:
            param.tp_dim = tp_dim
        for start, end in itertools.combinations(range(local.numel() + 1), 2):
            fragment = local.flatten()[start:end]
            pieces = full_pieces(param, TensorParallel(rank, tp_size), shape, start, end - start)
            assert len(pieces) <= 3
            for offsets, sizes, lo, hi in pieces:
                region = full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))]
                assert torch.equal(region, fragment[lo:hi].view(sizes)), (rank, start, end, offsets)
            # every element but the padding is in exactly one piece
            assert sum(hi - lo for *_, lo, hi in pieces) == int((fragment >= 0).sum())
