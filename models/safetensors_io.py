"""Reading safetensors files tensor by tensor.

A small reader of our own: it needs no torch, understands bf16 through ml_dtypes, and
never holds more than the tensor being read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 << 20


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed."""


class SafetensorsFile:
    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SafetensorsError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise SafetensorsError(f"{path}: header length {header_len} is out of range")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise SafetensorsError(f"{path}: header is not JSON ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = {}
        for name, entry in header.items():
            dtype = _DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise SafetensorsError(
                    f"{path}: tensor {name} has unsupported dtype {entry.get('dtype')}"
                )
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if end - begin != nbytes or begin < 0 or self._data_start + end > size:
                raise SafetensorsError(f"{path}: tensor {name} has inconsistent offsets")
            self._entries[name] = (np.dtype(dtype), shape, begin)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def read_transposed(self, name: str, dtype, rows_per_read: int = 1024) -> np.ndarray:
        """The 2-D tensor transposed and cast, built block by block: peak memory is the
        result plus one block, not twice the tensor."""
        src_dtype, shape, begin = self._entries[name]
        rows, cols = shape
        out = np.empty((cols, rows), dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            for start in range(0, rows, rows_per_read):
                n = min(rows_per_read, rows - start)
                block = np.fromfile(f, dtype=src_dtype, count=n * cols)
                if block.size != n * cols:
                    raise SafetensorsError(f"{self.path}: tensor {name} is truncated")
                out[:, start : start + n] = block.reshape(n, cols).T
        return out

    def read(self, name: str) -> np.ndarray:
        """A fresh array holding just this tensor.

        Plain reads rather than a memory map: mapped pages stay in the process's resident
        set for as long as the map lives, so converting through a map would hold the
        whole model by the end.
        """
        dtype, shape, begin = self._entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            data = np.fromfile(f, dtype=dtype, count=count)
        if data.size != count:
            raise SafetensorsError(f"{self.path}: tensor {name} is truncated")
        return data.reshape(shape)


class SafetensorsCheckpoint:
    """All tensors of a Hugging Face model directory (single file or sharded with index)."""

    def __init__(self, model_dir: str):
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        single = os.path.join(model_dir, "model.safetensors")
        self._where: dict[str, SafetensorsFile] = {}
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SafetensorsError(f"{index_path}: no weight_map")
            files: dict[str, SafetensorsFile] = {}
            for name, fname in weight_map.items():
                if os.path.basename(fname) != fname:
                    raise SafetensorsError(
                        f"{index_path}: shard name {fname!r} is not a plain file name"
                    )
                if fname not in files:
                    fpath = os.path.join(model_dir, fname)
                    if not os.path.exists(fpath):
                        raise SafetensorsError(f"{index_path}: shard {fname} is missing")
                    files[fname] = SafetensorsFile(fpath)
                if name not in files[fname].names():
                    raise SafetensorsError(f"{index_path}: {name} is not in shard {fname}")
                self._where[name] = files[fname]
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._where = {name: f for name in f.names()}
        else:
            raise SafetensorsError(
                f"no model.safetensors or model.safetensors.index.json in {model_dir}"
            )

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def read_transposed(self, name: str, dtype) -> np.ndarray:
        return self._where[name].read_transposed(name, dtype)

    def describe(self, name: str) -> str:
        return name

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)
