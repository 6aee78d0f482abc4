"""A small, fast reader for the GGUF container: metadata, tensor table and raw tensor bytes.

`gguf.GGUFReader` builds one numpy view per element of every metadata array, which takes
seconds on a 49k-token vocabulary and its merges; start-up time is benchmarked, so the
header is walked here with `struct` over a memory map instead. The `gguf` package still
supplies the type tables and the dequantization kernels (see `GGUFFile.dequantize`).
Only the header is read when the file is opened; tensor bytes are paged in on demand.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and has not been written for years
DEFAULT_ALIGNMENT = 32  # used when general.alignment is absent (the GGUF spec's default)

# Fixed-width scalar types: struct format, numpy dtype (little-endian files only).
_SCALARS: dict[int, tuple[str, np.dtype]] = {
    GGUFValueType.UINT8: ("<B", np.dtype("<u1")),
    GGUFValueType.INT8: ("<b", np.dtype("<i1")),
    GGUFValueType.UINT16: ("<H", np.dtype("<u2")),
    GGUFValueType.INT16: ("<h", np.dtype("<i2")),
    GGUFValueType.UINT32: ("<I", np.dtype("<u4")),
    GGUFValueType.INT32: ("<i", np.dtype("<i4")),
    GGUFValueType.FLOAT32: ("<f", np.dtype("<f4")),
    GGUFValueType.BOOL: ("<?", np.dtype("?")),
    GGUFValueType.UINT64: ("<Q", np.dtype("<u8")),
    GGUFValueType.INT64: ("<q", np.dtype("<i8")),
    GGUFValueType.FLOAT64: ("<d", np.dtype("<f8")),
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lives in the file and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # torch order, outermost first (GGUF lists dims innermost first)
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked sequential reads over the mapped header."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, nbytes: int) -> None:
        if nbytes < 0 or self.pos + nbytes > len(self.buf):
            raise ValueError(f"GGUF file {self.path} is truncated or corrupt (wanted {nbytes} "
                             f"bytes at offset {self.pos}, file has {len(self.buf)})")

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        self.need(length)
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"GGUF file {self.path} holds a string that is not UTF-8 "
                             f"at offset {self.pos - length}") from exc

    def value(self, value_type: int) -> Any:
        if value_type in _SCALARS:
            return self.scalar(_SCALARS[value_type][0])
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            return self.array()
        raise ValueError(f"GGUF file {self.path} has unknown metadata value type {value_type} "
                         f"at offset {self.pos}")

    def array(self) -> Any:
        item_type = self.scalar("<I")
        count = self.scalar("<Q")
        if item_type in _SCALARS:
            dtype = _SCALARS[item_type][1]
            self.need(count * dtype.itemsize)
            # Copy out of the map so the caller's array does not pin the file mapping.
            values = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos += count * dtype.itemsize
            return values
        # Every string costs at least its 8-byte length, so a corrupt huge count fails fast
        # here instead of looping for minutes.
        self.need(count * 8)
        return [self.value(item_type) for _ in range(count)]


class GGUFFile:
    """A parsed GGUF header plus lazy access to tensor data.

    Raises ValueError naming the file when it is not a readable little-endian GGUF v2/v3
    file, or when a tensor's type is unknown or its data would lie past the end of the file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: mmap of an empty file
            raise ValueError(f"cannot read GGUF file {self.path}: {exc}") from exc
        cursor = _Cursor(self._map, self.path)
        cursor.need(4)
        if self._map[:4] != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (bad magic bytes {self._map[:4]!r})")
        cursor.pos = 4
        self.version: int = cursor.scalar("<I")
        if self.version not in SUPPORTED_VERSIONS:
            if self.version & 0xFFFF == 0:
                raise ValueError(f"GGUF file {self.path} is big-endian, which is not supported")
            raise ValueError(f"GGUF file {self.path} has version {self.version}; "
                             f"supported versions are {SUPPORTED_VERSIONS}")
        tensor_count = cursor.scalar("<Q")
        kv_count = cursor.scalar("<Q")

        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.scalar("<I"))

        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(tensor_count):
            name = cursor.string()
            n_dims = cursor.scalar("<I")
            cursor.need(8 * n_dims)
            dims = struct.unpack_from(f"<{n_dims}Q", self._map, cursor.pos)
            cursor.pos += 8 * n_dims
            raw_type = cursor.scalar("<I")
            rel_offset = cursor.scalar("<Q")
            infos.append((name, tuple(reversed(dims)), raw_type, rel_offset))

        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"GGUF file {self.path} has invalid general.alignment {alignment}")
        data_start = -(-cursor.pos // alignment) * alignment  # round up to the alignment

        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, raw_type, rel_offset in infos:
            self.tensors[name] = self._tensor_info(name, shape, raw_type, data_start + rel_offset)

    def _tensor_info(self, name: str, shape: tuple[int, ...], raw_type: int,
                     offset: int) -> GGUFTensorInfo:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError as exc:
            raise ValueError(f"GGUF file {self.path}: tensor {name!r} has unknown "
                             f"ggml type {raw_type}") from exc
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        inner = shape[-1] if shape else 1
        if inner % block_size:
            raise ValueError(f"GGUF file {self.path}: tensor {name!r} row length {inner} is not "
                             f"a multiple of the {qtype.name} block size {block_size}")
        nbytes = int(np.prod(shape, dtype=np.int64)) // block_size * type_size
        if name in self.tensors:
            raise ValueError(f"GGUF file {self.path} holds tensor {name!r} twice")
        if offset + nbytes > len(self._map):
            raise ValueError(f"GGUF file {self.path} is truncated: tensor {name!r} needs bytes "
                             f"{offset}..{offset + nbytes}, the file has {len(self._map)}")
        return GGUFTensorInfo(name, shape, qtype, offset, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name`, shape (*shape[:-1], bytes_per_row), read-only."""
        info = self.tensors[name]
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        rows = info.shape[:-1] if info.shape else ()
        return data.reshape(*rows, -1)

    def dequantize(self, name: str) -> np.ndarray:
        """Tensor `name` decoded to a writable float32 array in torch shape order."""
        info = self.tensors[name]
        try:
            values = dequantize(self.raw(name), info.qtype)
        except NotImplementedError as exc:
            raise ValueError(f"GGUF file {self.path}: tensor {name!r} uses {info.qtype.name}, "
                             f"which the gguf package cannot dequantize") from exc
        values = values.reshape(info.shape)
        if values.dtype != np.float32 or not values.flags.writeable:
            # F32 tensors come back as views of the read-only map; torch wants owned memory.
            values = values.astype(np.float32, copy=True)
        return values
