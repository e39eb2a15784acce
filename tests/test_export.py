"""save_sparse_data / load_sparse_data (issue 9 item 7): the masked data comes back bit for
bit, the file is block-sparse and compact, and a damaged file is refused naming the group."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from distsparse import CheckpointError, DataNormSparsifier
from distsparse.checkpoint import CheckpointNotFoundError
from distsparse.export import load_sparse_data, save_sparse_data
from distsparse.masks import as_matrix

_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def _sparsifier(dtype: torch.dtype) -> tuple[DataNormSparsifier, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    data = {
        "table": torch.randn(37, 22, generator=g),            # partial blocks on both edges
        "nd": torch.randn(3, 5, 9, generator=g),              # N-D: blocks on the (15, 9) view
        "vector": torch.randn(41, generator=g),               # 1-D: one row
        "few_zeros": torch.randn(16, 12, generator=g),        # zeros_per_block < block size
        "empty": torch.randn(0, 8, generator=g),
    }
    data = {n: t.to(dtype) for n, t in data.items()}
    data["table"][0, :4] = -0.0                               # kept -0.0 must come back as -0.0
    data["table"][5, 5] = -0.0
    sp = DataNormSparsifier(sparsity_level=0.6, sparse_block_shape=(2, 4))
    sp.add_data("table", torch.nn.Parameter(data["table"]))
    sp.add_data("nd", torch.nn.Parameter(data["nd"]), sparse_block_shape=(4, 2))
    sp.add_data("vector", torch.nn.Parameter(data["vector"]), sparse_block_shape=(1, 8))
    sp.add_data("few_zeros", torch.nn.Parameter(data["few_zeros"]), sparse_block_shape=(2, 2), zeros_per_block=2)
    sp.add_data("empty", torch.nn.Parameter(data["empty"]))
    sp.step()
    return sp, data


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_loaded_tensors_are_bit_exact_to_the_masked_data(tmp_path, dtype):
    sp, _ = _sparsifier(dtype)
    path = tmp_path / "sparse.safetensors"
    save_sparse_data(path, sp)
    loaded = load_sparse_data(path)
    assert sorted(loaded) == sorted(sp.data_groups)
    for name, tensor in loaded.items():
        expected = sp.get_data(name, return_original=False)
        assert tensor.dtype == dtype and tensor.shape == expected.shape, name
        assert torch.equal(_bits(tensor), _bits(expected)), name
    # -0.0 where the mask keeps it, +0.0 where it prunes.
    table_mask = sp.get_mask("table")
    signs = torch.signbit(loaded["table"].float())
    assert bool(signs[table_mask & (sp.get_data("table") == 0)].all())
    assert not bool(signs[~table_mask].any())


def test_only_blocks_holding_something_are_stored(tmp_path):
    sp, _ = _sparsifier(torch.float32)
    path = tmp_path / "s.safetensors"
    save_sparse_data(path, sp, names=["table", "few_zeros"])
    raw = st_load(path.read_bytes())
    for name, block in (("table", (2, 4)), ("few_zeros", (2, 2))):
        masked = as_matrix(sp.get_data(name, return_original=False))
        rows, cols = masked.shape
        n_br, n_bc = -(-rows // block[0]), -(-cols // block[1])
        padded = torch.zeros(n_br * block[0], n_bc * block[1])
        padded[:rows, :cols] = masked
        nonzero = _bits(padded).ne(0).view(n_br, block[0], n_bc, block[1]).any(3).any(1)
        assert raw[f"values/{name}"].shape == (int(nonzero.sum()), *block)
        assert raw[f"blocks/{name}"].numel() == (n_br * n_bc + 7) // 8
    # 60% of (2, 4) blocks pruned whole: about 40% of the values are stored.
    assert raw["values/table"].numel() < 0.5 * 40 * 24


def test_names_select_groups_and_unknown_names_are_refused(tmp_path):
    sp, _ = _sparsifier(torch.float32)
    path = tmp_path / "s.safetensors"
    save_sparse_data(path, sp, names="vector")
    assert list(load_sparse_data(path)) == ["vector"]
    with pytest.raises(ValueError, match="'nope' does not exist"):
        save_sparse_data(tmp_path / "t.safetensors", sp, names=["vector", "nope"])
    assert not (tmp_path / "t.safetensors").exists()


def test_the_file_is_versioned_checksummed_and_pickle_free(tmp_path):
    sp, _ = _sparsifier(torch.float32)
    path = tmp_path / "s.safetensors"
    save_sparse_data(path, sp)
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    assert meta["format"] == "distsparse.sparse_data" and meta["format_version"] == "1"
    state = json.loads(meta["state"])
    assert state["groups"]["table"] == {"shape": [37, 22], "dtype": "float32", "block_shape": [2, 4],
                                        "grid": [19, 6], "stored_blocks": state["groups"]["table"]["stored_blocks"]}
    assert set(state["checksums"]) == {f"{kind}/{g}" for kind in ("blocks", "values") for g in sp.data_groups}
    assert os.listdir(tmp_path) == ["s.safetensors"]
    source = Path(sys.modules["distsparse.export"].__file__).read_text()
    assert "import pickle" not in source and "torch.load" not in source


def test_device_argument_places_the_tensors(tmp_path):
    sp, _ = _sparsifier(torch.float32)
    save_sparse_data(tmp_path / "s.safetensors", sp)
    loaded = load_sparse_data(tmp_path / "s.safetensors", device="meta")
    assert all(t.device.type == "meta" for t in loaded.values())


def _damaged_variants(blob: bytes) -> list[tuple[str, bytes, str]]:
    n = int.from_bytes(blob[:8], "little")
    out = [("empty", b"", "empty"), ("truncated", blob[:-3], "truncated"), ("trailing", blob + b"x", "trailing"),
           ("short", blob[:5], "too short")]
    header = blob[8 : 8 + n]
    for pos in range(8 + n, len(blob), max(1, (len(blob) - 8 - n) // 60)):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x10
        out.append((f"data byte {pos}", bytes(damaged), r"group '.+': tensor '(values|blocks)/.+' does not match"))
    for pos in range(8, 8 + n, max(1, n // 80)):
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        out.append((f"header byte {pos}", bytes(damaged), ""))
    edited = header.replace(b'"stored_blocks\\":', b'"stored_blocks\\":1', 1)
    out.append(("edited state", blob[:8] + edited[: n] + blob[8 + n :], "checksum|JSON|damaged"))
    return out


def test_every_damaged_file_is_refused_naming_the_file(tmp_path):
    sp, _ = _sparsifier(torch.float32)
    good = tmp_path / "good.safetensors"
    save_sparse_data(good, sp, names=["table", "nd"])
    blob = good.read_bytes()
    unclear, accepted = [], []
    for i, (what, data, pattern) in enumerate(_damaged_variants(blob)):
        bad = tmp_path / f"bad{i}.safetensors"
        bad.write_bytes(data)
        try:
            load_sparse_data(bad)
        except CheckpointError as exc:
            if str(bad) not in str(exc) or (pattern and not re.search(pattern, str(exc))):
                unclear.append(f"{what}: {exc}")
        else:
            accepted.append(what)
        bad.unlink()
    assert not accepted, accepted
    assert not unclear, "\n".join(unclear[:5])


def test_well_formed_but_inconsistent_files_are_refused_naming_the_group(tmp_path):
    from distsparse.export import _BY_NAME, _ST_DTYPES, FORMAT, FORMAT_VERSION, _tensor_digest  # noqa: F401
    from safetensors.torch import save as st_save
    import hashlib

    sp, _ = _sparsifier(torch.float32)
    good = tmp_path / "good.safetensors"
    save_sparse_data(good, sp, names=["table"])
    blob = good.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n])["__metadata__"]
    tensors = dict(st_load(blob))

    def rewrite(edit_tensors=None, edit_state=None) -> Path:
        t = {k: v.clone() for k, v in tensors.items()}
        state = json.loads(meta["state"])
        if edit_tensors:
            edit_tensors(t)
        if edit_state:
            edit_state(state)
        state["checksums"] = {k: _tensor_digest(v) for k, v in t.items()}
        text = json.dumps(state, sort_keys=True)
        path = tmp_path / "edited.safetensors"
        path.write_bytes(st_save(t, metadata={**meta, "state": text,
                                              "json_sha256": hashlib.sha256(text.encode()).hexdigest()}))
        return path

    def flip_bitmap(t):
        t["blocks/table"][0] ^= 0x80

    def nonzero_padding(t):
        t["values/table"][-1, -1, -1] = 1.0  # the (37, 22) table's last block pads rows and columns

    cases = [
        (flip_bitmap, None, "group 'table': the block bitmap marks"),
        (None, lambda s: s["groups"]["table"].update(shape=[36, 22]), "group 'table': grid"),
        (None, lambda s: s["groups"]["table"].update(dtype="float16"), "group 'table': tensor 'values/table' is F32"),
        (None, lambda s: s["groups"]["table"].update(stored_blocks=1), "group 'table': tensor 'values/table'"),
        (lambda t: t.pop("values/table"), None, "missing: \\['values/table'\\]"),
    ]
    blocks = 19 * 6  # the (37, 22) table in (2, 4) blocks
    assert int(tensors["blocks/table"][-1]) & (0x80 >> ((blocks - 1) % 8)), "the last (partial) block is stored"
    cases.append((nonzero_padding, None, "group 'table': values outside the data's shape"))
    for edit_tensors, edit_state, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern):
            load_sparse_data(rewrite(edit_tensors, edit_state))


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="nothing.safetensors"):
        load_sparse_data(tmp_path / "nothing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a distsparse sparse data file"):
        load_sparse_data(tmp_path / "model.safetensors")


def test_groups_sharded_in_rectangles_export_as_pieces_and_load_whole(tmp_path):
    from distsparse.distributed.rects import RectShards

    table = torch.randn(12, 8, generator=torch.Generator().manual_seed(3))
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    sp.add_data("rows", RectShards((12, 8), [((0, 0), table[:5].clone()), ((5, 0), table[5:].clone())]))
    sp.add_data("plain", torch.nn.Parameter(table.clone()))
    sp.step()
    save_sparse_data(tmp_path / "out.safetensors", sp)
    loaded = load_sparse_data(tmp_path / "out.safetensors")
    masked = sp.get_data("rows", return_original=False)
    whole = torch.cat([t for _, t in masked.local_shards()])
    assert torch.equal(loaded["rows"], whole)
    assert torch.equal(loaded["plain"], sp.get_data("plain", return_original=False))
    assert len(list(tmp_path.iterdir())) == 2  # the index and one part (this process holds every piece)


def _handmade_file(path: Path, shape: list[int], block: list[int], stored: torch.Tensor, values: torch.Tensor) -> Path:
    """A well-formed, correctly checksummed sparse-data file with the given block layout."""
    import hashlib

    from safetensors.torch import save as st_save

    from distsparse.export import FORMAT, FORMAT_VERSION, _tensor_digest
    from distsparse.masks import pack_bits

    tensors = {"blocks/t": pack_bits(stored), "values/t": values}
    state = {"groups": {"t": {"shape": shape, "dtype": "float32", "block_shape": block,
                              "grid": list(stored.shape), "stored_blocks": int(values.shape[0])}},
             "checksums": {k: _tensor_digest(v) for k, v in tensors.items()},
             "sparsifier": {"class": "DataNormSparsifier", "step_count": 0}}
    text = json.dumps(state, sort_keys=True)
    path.write_bytes(st_save(tensors, metadata={"format": FORMAT, "format_version": FORMAT_VERSION, "state": text,
                                                "json_sha256": hashlib.sha256(text.encode()).hexdigest()}))
    return path


def test_a_small_file_declaring_huge_blocks_loads_into_the_datas_own_shape(tmp_path):
    # A 1x1 table in (2**24, 2**24) blocks: decoding through the padded block grid would
    # allocate 2**50 bytes. The file is a few hundred bytes and describes one +0.0.
    path = _handmade_file(tmp_path / "huge.safetensors", [1, 1], [2**24, 2**24],
                          torch.zeros(1, 1, dtype=torch.bool), torch.zeros(0, 2**24, 2**24))
    assert path.stat().st_size < 1000
    loaded = load_sparse_data(path)["t"]
    assert loaded.shape == (1, 1) and _bits(loaded).eq(0).all()


def test_a_stored_block_larger_than_the_data_is_cropped_and_its_outside_must_be_zero(tmp_path):
    values = torch.zeros(1, 300, 200)
    values[0, 1, :3] = torch.tensor([1.0, -0.0, 2.5])
    path = _handmade_file(tmp_path / "big.safetensors", [2, 3], [300, 200], torch.ones(1, 1, dtype=torch.bool), values)
    loaded = load_sparse_data(path)["t"]
    assert torch.equal(_bits(loaded), _bits(values[0, :2, :3]))
    values[0, 2, 0] = 7.0  # outside the (2, 3) data
    bad = _handmade_file(tmp_path / "bad.safetensors", [2, 3], [300, 200], torch.ones(1, 1, dtype=torch.bool), values)
    with pytest.raises(CheckpointError, match="group 't': values outside the data's shape are not \\+0.0"):
        load_sparse_data(bad)


def test_blocks_larger_than_the_data_are_written_at_the_datas_size(tmp_path):
    # The encoder used to pad a (3, 5) table to its (2**24, 2**24) block: 2**50 bytes.
    table = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(2**24, 2))
    sp.add_data("t", torch.nn.Parameter(table.clone()))
    path = tmp_path / "s.safetensors"
    save_sparse_data(path, sp)
    blob = path.read_bytes()
    state = json.loads(json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])["__metadata__"]["state"])
    assert state["groups"]["t"]["block_shape"] == [3, 2] and state["groups"]["t"]["grid"] == [1, 3]
    assert st_load(blob)["values/t"].shape == (3, 3, 2)
    assert torch.equal(load_sparse_data(path)["t"], table)


def test_decoding_matches_the_masked_data_for_every_edge_layout(tmp_path):
    g = torch.Generator().manual_seed(5)
    for shape, block in [((7, 9), (2, 4)), ((8, 8), (2, 4)), ((1, 9), (1, 4)), ((5, 3), (4, 8)), ((9,), (1, 4)),
                         ((2, 3, 5), (3, 2)), ((0, 5), (2, 2)), ((6, 1), (4, 1))]:
        sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=block)
        sp.add_data("t", torch.nn.Parameter(torch.randn(shape, generator=g)))
        sp.step()
        save_sparse_data(tmp_path / "s.safetensors", sp)
        loaded = load_sparse_data(tmp_path / "s.safetensors")["t"]
        assert torch.equal(_bits(loaded), _bits(sp.get_data("t", return_original=False))), (shape, block)


_DETERMINISTIC_SAVE = """
import sys, torch
from distsparse import DataNormSparsifier
from distsparse.export import save_sparse_data
g = torch.Generator().manual_seed(0)
sp = DataNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
for name, shape in (("b.weight", (8, 8)), ("a", (4, 12)), ("é", (3,))):
    sp.add_data(name, torch.nn.Parameter(torch.randn(shape, generator=g)))
sp.step()
save_sparse_data(sys.argv[1], sp)
"""


def test_identical_content_gives_byte_identical_files_within_and_across_processes(tmp_path):
    import subprocess

    sp, _ = _sparsifier(torch.float32)
    save_sparse_data(tmp_path / "one.safetensors", sp)
    save_sparse_data(tmp_path / "two.safetensors", sp)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    blobs = []
    for i in range(3):  # safetensors' metadata map had a random order in every process
        out = tmp_path / f"run{i}.safetensors"
        subprocess.run([sys.executable, "-c", _DETERMINISTIC_SAVE, str(out)], check=True, env=env, timeout=300)
        blobs.append(out.read_bytes())
        assert sorted(load_sparse_data(out)) == ["a", "b.weight", "é"]
    assert blobs[0] == blobs[1] == blobs[2]
