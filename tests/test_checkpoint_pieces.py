"""How a load writes a stored piece (a rank's rows or rectangle, bit-packed) into this rank's
part of a mask: any overlap of rows and columns, any bit alignment, straight into the target."""

from __future__ import annotations

import pytest
import torch

from distsparse.checkpoint import _copy_piece
from distsparse.masks import pack_bits


@pytest.mark.parametrize("rows, cols", [(7, 5), (16, 8), (9, 3), (1, 13), (40, 12), (3, 1)])
@pytest.mark.parametrize("chunk", [1 << 22, 16])
def test_every_overlap_of_a_piece_and_a_region_is_copied_bit_exact_and_nothing_else(rows, cols, chunk, monkeypatch):
    monkeypatch.setattr("distsparse.checkpoint._UNPACK_ELEMENTS", chunk)  # small: many chunks
    g = torch.Generator().manual_seed(rows * 100 + cols)
    whole = torch.rand(rows, cols, generator=g) > 0.5
    spans = sorted({(0, rows), (0, max(rows // 2, 1)), (rows // 2, rows), (min(1, rows - 1), rows)})
    col_spans = sorted({(0, cols), (0, max(cols // 2, 1)), (cols // 2, cols)})
    for (p0, p1), (pc0, pc1) in [(s, c) for s in spans for c in col_spans]:
        if p0 >= p1 or pc0 >= pc1:
            continue
        packed = pack_bits(whole[p0:p1, pc0:pc1])
        for (t0, t1), (tc0, tc1) in [(s, c) for s in spans for c in col_spans]:
            if t0 >= t1 or tc0 >= tc1:
                continue
            out = torch.zeros(t1 - t0, tc1 - tc0, dtype=torch.bool)
            _copy_piece(packed, (p0, pc0, p1 - p0, pc1 - pc0), (t0, tc0, t1 - t0, tc1 - tc0), out)
            expected = torch.zeros_like(out)
            r0, r1, c0, c1 = max(p0, t0), min(p1, t1), max(pc0, tc0), min(pc1, tc1)
            if r0 < r1 and c0 < c1:
                expected[r0 - t0 : r1 - t0, c0 - tc0 : c1 - tc0] = whole[r0:r1, c0:c1]
            assert torch.equal(out, expected), ((p0, p1, pc0, pc1), (t0, t1, tc0, tc1))


def test_a_load_writes_into_the_existing_mask_tensor_and_storage(tmp_path):
    from _checkpoint_util import EMB, build

    from distsparse import load_checkpoint, save_checkpoint

    sp, _, _ = build(steps=2)
    save_checkpoint(tmp_path / "c.safetensors", sp)
    other, _, _ = build(seed=3, steps=1, scheduler=False)
    mask = other.get_mask(EMB)
    pointer = mask.data_ptr()
    load_checkpoint(tmp_path / "c.safetensors", other)
    assert other.get_mask(EMB) is mask and mask.data_ptr() == pointer
    assert torch.equal(mask, sp.get_mask(EMB))
