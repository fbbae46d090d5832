"""A GGUF file's tensors, read without its metadata.

gguf-py's GGUFReader parses every metadata value into numpy views, one item at a time: the
default model's tokenizer (49,152 tokens and 48,900 merges, stored as metadata arrays) took 5.6 s
of an 8 s start, for values the weights never need (the tokenizer comes from the converted folder).
Here the metadata is skipped (string arrays by their lengths, other arrays by count x size), and
only the tensor infos and `general.alignment` are read. The tensors come out as gguf-py's do
(same dims, type and data views), so the loader and gguf-py's `dequantize` take them unchanged;
tests/test_loader.py checks them against GGUFReader's, tensor by tensor. Format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little-endian files only).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

# Fixed-size metadata value types: bytes per item.
_SIZES = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
          GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
          GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
# Tensor types stored as plain numbers (every other type is blocks of bytes).
_PLAIN = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


@dataclass
class GGUFTensor:
    name: str
    shape: np.ndarray  # GGUF's dims, fastest-varying first (gguf-py's ReaderTensor.shape)
    tensor_type: GGMLQuantizationType
    data: np.ndarray  # a read-only view of the file: numbers, or [rows..., bytes per row] of blocks


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        vals = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return vals if len(vals) > 1 else vals[0]

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def skip_value(self, vtype: int) -> None:
        if vtype == GGUFValueType.STRING:
            n = self.take("Q")  # (not `self.pos += self.take(...)`: that adds to the position before the take)
            self.pos += n
        elif vtype == GGUFValueType.ARRAY:
            itype, count = self.take("I"), self.take("Q")
            if itype in _SIZES:
                self.pos += _SIZES[GGUFValueType(itype)] * count
            else:
                for _ in range(count):
                    self.skip_value(itype)
        elif vtype in _SIZES:
            self.pos += _SIZES[GGUFValueType(vtype)]
        else:
            raise ValueError(f"{self.path.name}: unknown GGUF metadata value type {vtype} at byte {self.pos}")


def read_gguf_tensors(path: Path) -> list[GGUFTensor]:
    """The tensors of the GGUF at `path`, as views of the file (memory-mapped, read-only)."""
    path = Path(path)
    data = np.memmap(path, mode="r")
    c = _Cursor(memoryview(data), path)
    if c.take("I") != GGUF_MAGIC:
        raise ValueError(f"{path.name}: not a GGUF file (bad magic)")
    version = c.take("I")
    if version not in (2, 3):
        raise ValueError(f"{path.name}: GGUF version {version} (big-endian files are not read); versions 2 and 3 are")
    n_tensors, n_kv = c.take("Q"), c.take("Q")
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key, vtype = c.string(), c.take("I")
        if key == "general.alignment" and vtype == GGUFValueType.UINT32:
            alignment = c.take("I")
            if alignment == 0 or alignment & (alignment - 1):
                raise ValueError(f"{path.name}: general.alignment {alignment} is not a power of two")
        else:
            c.skip_value(vtype)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.take("I")
        dims = [c.take("Q") for _ in range(n_dims)]
        infos.append((name, dims, GGMLQuantizationType(c.take("I")), c.take("Q")))
    start = -(-c.pos // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, kind, offset in infos:
        if name in seen:
            raise ValueError(f"{path.name}: tensor {name} appears twice")
        seen.add(name)
        n = int(np.prod(dims))
        shape = tuple(reversed(dims))
        if kind in _PLAIN:
            dtype, count = _PLAIN[kind], n
        else:
            block, size = GGML_QUANT_SIZES[kind]
            dtype, count, shape = np.uint8, n * size // block, quant_shape_to_byte_shape(shape, kind)
        nbytes = count * np.dtype(dtype).itemsize
        if start + offset + nbytes > len(data):
            raise ValueError(f"{path.name}: tensor {name} runs past the end of the file (truncated?)")
        arr = data[start + offset : start + offset + nbytes].view(dtype).reshape(shape)
        tensors.append(GGUFTensor(name, np.array(dims, dtype=np.uint64), kind, arr))
    return tensors
