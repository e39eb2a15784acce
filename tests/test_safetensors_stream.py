"""StreamingSafetensorsWriter: a safetensors file written piece by piece that safetensors reads."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, load_file

from distsparse.safetensors_stream import StreamingSafetensorsWriter

TENSORS = {
    "mask/emb.weight": torch.arange(37, dtype=torch.uint8),
    "f": torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(3, 4),
    "bf": torch.arange(5, dtype=torch.bfloat16),
    "empty": torch.empty(0, 3, dtype=torch.int64),
    "flags": torch.tensor([True, False, True]),
}


def _specs():
    return [(name, t.dtype, tuple(t.shape)) for name, t in TENSORS.items()]


def _write(pieces: int = 3, metadata=None, final=None) -> bytes:
    f = io.BytesIO()
    w = StreamingSafetensorsWriter(f, _specs(), metadata or {"sha": "0" * 64, "format": "x"})
    for name, t in TENSORS.items():
        for chunk in torch.tensor_split(t.reshape(-1), pieces):
            w.write(name, chunk)
    w.close(final or {"sha": w.sha256("mask/emb.weight"), "format": "x"})
    return f.getvalue()


def test_a_file_streamed_in_pieces_loads_with_safetensors_like_the_tensors_written(tmp_path):
    blob = _write(pieces=4)
    path = tmp_path / "s.safetensors"
    path.write_bytes(blob)
    loaded = load_file(path)
    assert set(loaded) == set(TENSORS)
    for name, t in TENSORS.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "x"
        assert torch.equal(f.get_slice("mask/emb.weight")[5:9], TENSORS["mask/emb.weight"][5:9])
    assert torch.equal(load(blob)["f"], TENSORS["f"])
    assert int.from_bytes(blob[:8], "little") % 8 == 0


def test_the_sha256_is_that_of_the_tensor_bytes_and_lands_in_the_header(tmp_path):
    import hashlib

    blob = _write()
    path = tmp_path / "s.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["sha"] == hashlib.sha256(TENSORS["mask/emb.weight"].numpy().tobytes()).hexdigest()


def test_the_bytes_do_not_depend_on_how_the_tensors_were_cut_into_pieces():
    assert _write(pieces=1) == _write(pieces=5) == _write(pieces=5)


def test_the_header_is_json_with_sorted_keys_padded_with_spaces():
    blob = _write()
    n = int.from_bytes(blob[:8], "little")
    header = blob[8:8 + n]
    text = header.rstrip(b" ")
    import json

    parsed = json.loads(text)
    assert text == json.dumps(parsed, sort_keys=True, separators=(",", ":")).encode()
    assert header[len(text):] == b" " * (n - len(text))


def test_close_refuses_while_a_tensor_is_incomplete():
    f = io.BytesIO()
    w = StreamingSafetensorsWriter(f, _specs(), {})
    w.write("mask/emb.weight", TENSORS["mask/emb.weight"][:10])
    with pytest.raises(ValueError, match=r"incomplete tensors 'mask/emb.weight' \(10 of 37 bytes\)"):
        w.close({})
    with pytest.raises(ValueError, match="incomplete"):
        w.sha256("mask/emb.weight")


def test_close_refuses_a_header_larger_than_the_space_reserved():
    f = io.BytesIO()
    specs = [("a", torch.uint8, (2,))]
    w = StreamingSafetensorsWriter(f, specs, {"sha": "0"})
    w.write("a", torch.ones(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="final safetensors header needs .* reserved"):
        w.close({"sha": "0" * 64})
    # header_slack reserves room for it
    f = io.BytesIO()
    w = StreamingSafetensorsWriter(f, specs, {"sha": "0"}, header_slack=64)
    w.write("a", torch.ones(2, dtype=torch.uint8))
    w.close({"sha": "0" * 64})
    assert load(f.getvalue())["a"].tolist() == [1, 1]


def test_writes_out_of_order_overflowing_or_of_another_dtype_are_refused():
    f = io.BytesIO()
    w = StreamingSafetensorsWriter(f, _specs(), {})
    with pytest.raises(ValueError, match="out of order.*expects 'mask/emb.weight'"):
        w.write("f", TENSORS["f"])
    with pytest.raises(ValueError, match="overflows"):
        w.write("mask/emb.weight", torch.zeros(38, dtype=torch.uint8))
    with pytest.raises(TypeError, match="got a chunk of torch.int64"):
        w.write("mask/emb.weight", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(KeyError, match="not in the writer's specs"):
        w.write("nope", torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="appears twice"):
        StreamingSafetensorsWriter(io.BytesIO(), [("a", torch.uint8, (1,))] * 2, {})


def test_a_real_file_written_through_the_writer_is_memory_mappable(tmp_path):
    path = tmp_path / "real.safetensors"
    big = torch.arange(1 << 16, dtype=torch.int32)
    with open(path, "wb") as f:
        w = StreamingSafetensorsWriter(f, [("big", torch.int32, (1 << 16,))], {"n": "1"})
        for chunk in big.split(1000):
            w.write("big", chunk)
        w.close({"n": "2"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"n": "2"}
        assert torch.equal(f.get_slice("big")[1000:3000], big[1000:3000])
    assert path.stat().st_size == 8 + w.header_size + w.data_size
