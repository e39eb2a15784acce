"""The row-packed mask layout of DCP checkpoints (distsparse.dcp): dim-0 shards of a mask pack to
dim-0 shards of its packing (what lets DCP reshard FSDP2 masks), for empty, 1-D, 0-d and N-D
masks; the header refuses what is not a distsparse DCP header."""

import json

import pytest
import torch

from distsparse import CheckpointError
from distsparse.dcp import STATE_BYTES, _parse_header, _row_bytes, pack_rows, unpack_rows


@pytest.mark.parametrize("shape", [(5, 13), (0, 7), (3, 4, 5), (9,), (), (4, 0), (0,), (17, 64)])
def test_row_packing_round_trips_and_dim0_slices_pack_alike(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    packed = pack_rows(mask)
    assert packed.dtype == torch.uint8
    assert tuple(packed.shape) == ((shape[0] if shape else 1), _row_bytes(shape))
    assert torch.equal(unpack_rows(packed, shape), mask)
    if shape and shape[0] > 2:
        for start, stop in [(0, 1), (1, 3), (2, shape[0])]:
            assert torch.equal(pack_rows(mask[start:stop]), packed[start:stop])


def test_row_packing_is_most_significant_bit_first_with_each_row_padded():
    mask = torch.tensor([[True] + [False] * 8, [False] * 8 + [True]])
    assert pack_rows(mask).tolist() == [[0x80, 0x00], [0x00, 0x80]]


def _state(header) -> torch.Tensor:
    text = json.dumps(header).encode()
    out = torch.zeros(STATE_BYTES, dtype=torch.uint8)
    out[: len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    return out


@pytest.mark.parametrize("header, words", [
    ({"format": "other"}, "not a 'distsparse.dcp' header"),
    ({"format": "distsparse.dcp", "format_version": 99}, "format_version 99"),
    ({"format": "distsparse.dcp", "format_version": 1, "groups": {}}, "lacks 'sparsifier'"),
])
def test_a_foreign_or_damaged_header_raises_checkpoint_error(header, words):
    with pytest.raises(CheckpointError, match=words):
        _parse_header(_state(header), "DCP checkpoint")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        _parse_header(torch.full((8,), 0xFF, dtype=torch.uint8), "DCP checkpoint")


def test_dcp_state_is_a_dcp_stateful():
    from torch.distributed.checkpoint.stateful import Stateful

    import distsparse

    sp = distsparse.DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("t", torch.randn(8, 8))
    assert isinstance(distsparse.dcp_state(sp), Stateful)
    with pytest.raises(ValueError, match="another sparsifier"):
        distsparse.dcp_state(sp, distsparse.LinearScheduler(
            distsparse.DataNormSparsifier(sparsity_level=0.5), final_value=0.5, ramp_steps=2))
