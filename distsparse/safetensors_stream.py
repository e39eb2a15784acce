"""A safetensors file written tensor piece by tensor piece, so the writer never holds all
the tensors (nor even one whole tensor) in memory.

safetensors' own ``save`` wants every tensor at once. A checkpoint of a sharded table is
written by a process that receives the table's rows rank by rank; this writer appends each
piece as it arrives, hashes it on the way (``sha256``), and writes the header last into
space reserved at the start of the file. The layout is exactly safetensors' (8-byte
little-endian header length, JSON header padded with spaces to a multiple of 8, then the
tensors' bytes back to back), so ``safetensors.safe_open`` / ``safetensors.torch.load_file``
read the result, memory-mapped.

The bytes are deterministic: the header is JSON with sorted keys and fixed separators, the
tensors lie in the order of ``specs``, and the reserved header is padded with spaces.

Typical use, where the final metadata holds checksums only known at the end::

    specs = [("mask/emb", torch.uint8, (n,))]
    with open(tmp, "wb") as f:
        w = StreamingSafetensorsWriter(f, specs, {"sha": "0" * 64})   # placeholder, same length
        for piece in pieces:
            w.write("mask/emb", piece)
        w.close({"sha": w.sha256("mask/emb")})
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import BinaryIO

import torch

__all__ = ["StreamingSafetensorsWriter", "safetensors_dtype"]

# safetensors' dtype names (safetensors/torch.py `_TYPES`, inverted); little-endian bytes.
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# safetensors' MAX_HEADER_SIZE: readers refuse bigger headers.
_MAX_HEADER = 100_000_000


def safetensors_dtype(dtype: torch.dtype) -> str:
    """safetensors' name of ``dtype`` (``torch.uint8`` → ``"U8"``); ``TypeError`` if it has none."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} cannot be stored in a safetensors file") from None


def _header_bytes(entries: dict[str, dict[str, object]], metadata: dict[str, str]) -> bytes:
    """The header JSON as safetensors writes it: sorted keys, no spaces."""
    header: dict[str, object] = dict(entries)
    header["__metadata__"] = dict(metadata)
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _check_metadata(metadata: dict[str, str], what: str) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise TypeError(f"{what} must be a dict of str to str (safetensors metadata)")


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensors arrive in contiguous pieces.

    ``specs`` lists ``(name, dtype, shape)`` in the order the tensors are written (and
    laid out in the file). ``metadata`` is a placeholder of the final metadata: the header
    written at :meth:`close` must not be larger than the header it gives (for example,
    placeholder checksums of the final length); ``header_slack`` reserves extra bytes.
    ``fileobj`` must be a seekable binary file positioned at its start; the writer does not
    close, flush to disk or fsync it (the caller owns the atomic-write protocol).
    """

    def __init__(self, fileobj: BinaryIO, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str], *, header_slack: int = 0) -> None:
        _check_metadata(metadata, "metadata")
        if not isinstance(header_slack, int) or header_slack < 0:
            raise ValueError(f"header_slack must be a non-negative int, got {header_slack!r}")
        self._file = fileobj
        self._order: list[str] = []
        self._entries: dict[str, dict[str, object]] = {}
        self._nbytes: dict[str, int] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        offset = 0
        for spec in specs:
            name, dtype, shape = spec
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"tensor name {name!r} is not allowed in a safetensors file")
            if name in self._entries:
                raise ValueError(f"tensor {name!r} appears twice in specs")
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                raise ValueError(f"tensor {name!r}: shape {shape!r} must be non-negative ints")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            self._entries[name] = {"dtype": safetensors_dtype(dtype), "shape": [int(s) for s in shape],
                                   "data_offsets": [offset, offset + nbytes]}
            self._order.append(name)
            self._nbytes[name] = nbytes
            self._dtypes[name] = dtype
            offset += nbytes
        reserved = len(_header_bytes(self._entries, metadata)) + header_slack
        self._reserved = reserved + (-reserved) % 8  # safetensors aligns the data start to 8 bytes
        if self._reserved > _MAX_HEADER:
            raise ValueError(f"the safetensors header needs {self._reserved} bytes, over safetensors' limit of "
                             f"{_MAX_HEADER}")
        self._hashes = {name: hashlib.sha256() for name in self._order}
        self._written = dict.fromkeys(self._order, 0)
        self._current = 0  # index in _order of the tensor being written
        self._skip_complete()
        self._closed = False
        self._file.write(b"\0" * (8 + self._reserved))  # the header goes here at close()

    def _skip_complete(self) -> None:
        while self._current < len(self._order) and \
                self._written[self._order[self._current]] == self._nbytes[self._order[self._current]]:
            self._current += 1

    def write(self, name: str, tensor_chunk: torch.Tensor) -> None:
        """Append the next bytes of tensor ``name`` (any shape; its elements in row-major
        order). Tensors are written whole, one after the other, in the order of ``specs``."""
        if self._closed:
            raise ValueError("the writer is closed")
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in the writer's specs")
        if self._written[name] == self._nbytes[name] and isinstance(tensor_chunk, torch.Tensor) \
                and tensor_chunk.numel() == 0 and tensor_chunk.dtype == self._dtypes[name]:
            return  # an empty piece of a complete (e.g. empty) tensor: nothing to append
        if self._current >= len(self._order) or self._order[self._current] != name:
            expected = self._order[self._current] if self._current < len(self._order) else None
            raise ValueError(f"tensor {name!r} is written out of order: the writer expects "
                             f"{'no more data' if expected is None else repr(expected)} now "
                             "(tensors are written in the order of specs)")
        if not isinstance(tensor_chunk, torch.Tensor) or tensor_chunk.dtype != self._dtypes[name]:
            got = tensor_chunk.dtype if isinstance(tensor_chunk, torch.Tensor) else type(tensor_chunk).__name__
            raise TypeError(f"tensor {name!r} is {self._dtypes[name]}, got a chunk of {got}")
        flat = tensor_chunk.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy() if flat.numel() else b""
        nbytes = len(data) if isinstance(data, bytes) else data.nbytes
        if self._written[name] + nbytes > self._nbytes[name]:
            raise ValueError(f"tensor {name!r}: the chunk of {nbytes} bytes overflows the tensor "
                             f"({self._written[name]} of {self._nbytes[name]} bytes written)")
        if nbytes:
            self._file.write(memoryview(data))
            self._hashes[name].update(memoryview(data))
            self._written[name] += nbytes
        self._skip_complete()

    def sha256(self, name: str) -> str:
        """Hex sha256 of tensor ``name``'s bytes, once all of them were written."""
        if name not in self._entries:
            raise KeyError(f"tensor {name!r} is not in the writer's specs")
        if self._written[name] != self._nbytes[name]:
            raise ValueError(f"tensor {name!r} is incomplete ({self._written[name]} of {self._nbytes[name]} bytes)")
        return self._hashes[name].hexdigest()

    def close(self, final_metadata: dict[str, str]) -> None:
        """Write the header with ``final_metadata`` into the reserved space. Raises if a
        tensor is incomplete or the header does not fit; the caller then discards the file."""
        if self._closed:
            raise ValueError("the writer is closed")
        _check_metadata(final_metadata, "final_metadata")
        incomplete = [f"{n!r} ({self._written[n]} of {self._nbytes[n]} bytes)"
                      for n in self._order if self._written[n] != self._nbytes[n]]
        if incomplete:
            raise ValueError(f"cannot close the safetensors file: incomplete tensors {', '.join(incomplete)}")
        header = _header_bytes(self._entries, final_metadata)
        if len(header) > self._reserved:
            raise ValueError(f"the final safetensors header needs {len(header)} bytes but {self._reserved} were "
                             "reserved (make the placeholder metadata as long as the final one, or pass "
                             "header_slack)")
        self._file.seek(0)
        self._file.write(self._reserved.to_bytes(8, "little"))
        self._file.write(header + b" " * (self._reserved - len(header)))
        self._file.seek(0, 2)
        self._closed = True

    @property
    def data_size(self) -> int:
        """Bytes of tensor data the finished file holds (after the header)."""
        return sum(self._nbytes.values())

    @property
    def header_size(self) -> int:
        """Bytes reserved for the JSON header (a multiple of 8)."""
        return self._reserved
