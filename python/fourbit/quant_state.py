# SPDX-License-Identifier: Apache-2.0
"""QuantState: the metadata of a 4-bit tensor, with bitsandbytes' field names and serialized form.

A state built by fourbit's own ops is trusted. A state built by hand or read from a file is validated once, when it
is built (shapes, dtypes, devices, codebooks, and finite scale values); the ops afterwards check only metadata, so
they never synchronise with the device.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["QuantState", "QUANT_TYPES", "BLOCKSIZES"]

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# bitsandbytes writes dtypes as str(dtype) without the "torch." prefix.
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}

# Keys of QuantState.as_dict(); bitsandbytes' QuantState.valid_qs_keys.
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_VALUE_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_PACKED_PREFIX = "quant_state.bitsandbytes__"


def quant_map(name: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The float32 codebook ``name``: "nf4" or "fp4" (16 levels by code) or "dynamic" (the 256-value 8-bit map)."""
    table = torch.ops.fourbit.quant_map(name)
    return table if device is None else table.to(device)


def _fail(message: str) -> None:
    raise ValueError(message)


class QuantState:
    """Metadata of a blockwise-quantized tensor (bitsandbytes' ``QuantState`` fields).

    Attributes:
        absmax: float32 [blocks] scales, or uint8 [blocks] when double-quantized (then ``state2`` and ``offset``).
        shape: the original tensor's shape.
        code: the float32 codebook (16 levels for 4-bit, 256 for the nested 8-bit state).
        blocksize: elements per block.
        quant_type: "nf4" or "fp4" (None for the nested state).
        dtype: the original tensor's dtype (the default output dtype of dequantization).
        offset: float32 [] mean subtracted before double quantization, or None.
        state2: the nested QuantState (absmax float32, code = dynamic map, blocksize 256), or None.

    Building one validates it (``validate=False`` skips the checks that read values; fourbit's own ops use it).
    """

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
        *,
        validate: bool = True,
    ) -> None:
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.dtype = dtype
        self.offset = offset
        self.state2 = state2
        if validate:
            self.validate()

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    # ------------------------------------------------------------------ validation
    def validate(self) -> QuantState:
        """Checks every field against the others and the scale values for NaN/inf; raises ValueError/TypeError."""
        if self.quant_type is None:
            self._validate_nested_state()
            return self
        if self.quant_type not in QUANT_TYPES:
            _fail(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in BLOCKSIZES:
            _fail(f"blocksize must be a power of two in [32, 4096], got {self.blocksize!r}")
        if self.dtype not in _DTYPE_NAMES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.shape is None or any(d < 0 for d in self.shape):
            _fail(f"shape must be a tuple of non-negative sizes, got {self.shape!r}")
        if not isinstance(self.absmax, torch.Tensor):
            raise TypeError(f"absmax must be a tensor, got {type(self.absmax).__name__}")
        blocks = -(-math.prod(self.shape) // self.blocksize)
        if self.absmax.dim() != 1 or self.absmax.numel() != blocks:
            _fail(
                f"absmax must have {blocks} values (one per block of {self.blocksize} for shape "
                f"{tuple(self.shape)}), got shape {tuple(self.absmax.shape)}"
            )
        self._validate_code(quant_map(self.quant_type))
        device = self.absmax.device
        if self.nested != (self.offset is not None):
            _fail("a double-quantized state needs both state2 and offset, got " + ("state2" if self.nested else "offset"))
        if not self.nested:
            if self.absmax.dtype != torch.float32:
                raise TypeError(f"absmax must be float32, got {self.absmax.dtype} (uint8 absmax needs state2)")
            _check_finite(self.absmax, "absmax")
            return self
        if self.absmax.dtype != torch.uint8:
            raise TypeError(f"absmax must be uint8 under double quantization, got {self.absmax.dtype}")
        if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1 or self.offset.dtype != torch.float32:
            _fail(f"offset must be a float32 tensor with one value, got {self.offset!r}")
        _check_finite(self.offset, "offset")
        if not isinstance(self.state2, QuantState):
            raise TypeError(f"state2 must be a QuantState, got {type(self.state2).__name__}")
        self.state2._validate_nested_state()
        expected = -(-blocks // self.state2.blocksize)
        if self.state2.absmax.numel() != expected:
            _fail(
                f"nested_absmax must have {expected} values ({blocks} blocks / nested_blocksize "
                f"{self.state2.blocksize}), got {self.state2.absmax.numel()}"
            )
        for name, t in (("offset", self.offset), ("nested_absmax", self.state2.absmax), ("nested_code", self.state2.code)):
            if t.device != device:
                _fail(f"{name} is on {t.device} but absmax is on {device}")
        return self

    def _validate_code(self, expected: torch.Tensor) -> None:
        if not isinstance(self.code, torch.Tensor) or self.code.shape != expected.shape:
            shape = tuple(self.code.shape) if isinstance(self.code, torch.Tensor) else self.code
            _fail(f"code (quant_map) must be {expected.numel()} float32 values, got {shape!r}")
        if self.code.device != self.absmax.device:
            _fail(f"code is on {self.code.device} but absmax is on {self.absmax.device}")
        # The kernels use the built-in codebook of quant_type: a state carrying another table would decode wrongly.
        if self.quant_type is not None and not torch.equal(self.code.cpu().float(), expected):
            _fail(f"code (quant_map) is not the {self.quant_type} codebook: {self.code.tolist()}")

    def _validate_nested_state(self) -> None:
        if not isinstance(self.absmax, torch.Tensor) or self.absmax.dtype != torch.float32 or self.absmax.dim() != 1:
            _fail(f"nested_absmax must be a 1-D float32 tensor, got {self.absmax!r}")
        if (not isinstance(self.blocksize, int) or self.blocksize <= 0 or self.blocksize & (self.blocksize - 1)
                or self.blocksize > 1 << 62):  # the ops take a 64-bit integer
            _fail(f"nested_blocksize must be a positive power of two (at most 2**62), got {self.blocksize!r}")
        if not isinstance(self.code, torch.Tensor) or self.code.dtype != torch.float32 or self.code.shape != (256,):
            _fail(f"nested_quant_map must be 256 float32 values, got {self.code!r}")
        _check_finite(self.absmax, "nested_absmax")
        _check_finite(self.code, "nested_quant_map")

    # ------------------------------------------------------------------ serialization
    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes' dict form. ``packed=True`` gives the state-dict entries (keys relative to ``weight.``):
        tensors ``absmax``, ``quant_map`` [, ``nested_absmax``, ``nested_quant_map``] and a uint8 JSON blob
        ``quant_state.bitsandbytes__<quant_type>`` holding the other fields, byte for byte as bitsandbytes writes it.
        """
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _DTYPE_NAMES[self.dtype],
            "shape": tuple(self.shape),
        }
        if self.nested:
            d.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # A separate tensor: safetensors refuses two entries sharing storage.
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _DTYPE_NAMES[self.state2.dtype],
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        values = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        blob = json.dumps(values).encode("utf-8")
        out[_PACKED_PREFIX + self.quant_type] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return out

    @classmethod
    def from_dict(cls, qs_dict: Mapping[str, Any], device: torch.device | str | None = None) -> QuantState:
        """Reads ``as_dict()`` output (packed or not) as written by fourbit, bitsandbytes or transformers.

        Keys may carry a module prefix (``"model.layers.0.weight.absmax"``). Everything is validated; a malformed
        dict raises ValueError (or TypeError) naming the offending key, never a crash.
        """
        if not isinstance(qs_dict, Mapping):
            raise TypeError(f"qs_dict must be a mapping, got {type(qs_dict).__name__}")
        fields: dict[str, Any] = {}
        blobs = [k for k, v in qs_dict.items() if "quant_state" in str(k) and isinstance(v, torch.Tensor)]
        if len(blobs) > 1:
            _fail(f"qs_dict holds more than one packed quant_state entry: {blobs}")
        for key, value in qs_dict.items():
            if key in blobs:
                continue
            short = str(key).split(".")[-1]
            if short not in _TENSOR_KEYS + _VALUE_KEYS:
                _fail(f"unknown quant_state key {key!r}; expected keys among {_TENSOR_KEYS + _VALUE_KEYS}")
            fields[short] = value
        if blobs:
            key = blobs[0]
            suffix = str(key).split("bitsandbytes__")[-1]
            if suffix not in QUANT_TYPES:
                _fail(f"packed quant_state key {key!r} must end in bitsandbytes__nf4 or bitsandbytes__fp4")
            blob = qs_dict[key]
            if blob.dtype != torch.uint8 or blob.dim() != 1:
                _fail(f"{key} must be a 1-D uint8 tensor, got {blob.dtype} {tuple(blob.shape)}")
            try:
                values = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                _fail(f"{key} does not hold valid UTF-8 JSON: {e}")
            if not isinstance(values, dict):
                _fail(f"{key} must hold a JSON object, got {values!r}")
            for k in values:
                if k not in _VALUE_KEYS:
                    _fail(f"unknown field {k!r} in {key}; expected fields among {_VALUE_KEYS}")
            fields.update(values)
            if fields.get("quant_type") != suffix:
                _fail(f"{key} says quant_type {fields.get('quant_type')!r}, its key says {suffix!r}")
        return cls._from_fields(fields, device)

    @classmethod
    def _from_fields(cls, f: dict[str, Any], device) -> QuantState:
        for required in ("quant_type", "absmax", "blocksize", "dtype", "shape"):
            if required not in f:
                _fail(f"quant_state is missing {required!r}")
        for name in _TENSOR_KEYS:
            if name in f and not isinstance(f[name], torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(f[name]).__name__}")
        quant_type = f["quant_type"]
        if quant_type not in QUANT_TYPES:
            _fail(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        shape = f["shape"]
        if not isinstance(shape, (list, tuple, torch.Size)) or not all(_is_int(d) and d >= 0 for d in shape):
            _fail(f"shape must be a list of non-negative integers, got {shape!r}")
        blocksize = f["blocksize"]
        if not _is_int(blocksize):
            _fail(f"blocksize must be an integer, got {blocksize!r}")
        dtype = _parse_dtype(f["dtype"], "dtype")
        device = torch.device(device) if device is not None else f["absmax"].device
        code = f["quant_map"].to(device) if "quant_map" in f else quant_map(quant_type, device)
        nested_keys = [k for k in ("nested_absmax", "nested_blocksize", "nested_offset") if k in f]
        state2 = offset = None
        if nested_keys:
            missing = {"nested_absmax", "nested_blocksize", "nested_offset"} - set(nested_keys)
            if missing:
                _fail(f"double-quantized quant_state is missing {sorted(missing)}")
            nested_offset = f["nested_offset"]
            if not isinstance(nested_offset, (int, float)) or isinstance(nested_offset, bool):
                _fail(f"nested_offset must be a number, got {nested_offset!r}")
            # A JSON number can be any size: it must fit in float32 (NaN and inf are reported as non-finite below).
            try:
                too_large = math.isfinite(nested_offset) and abs(float(nested_offset)) > _FLOAT32_MAX
            except OverflowError:  # an integer beyond float64
                too_large = True
            if too_large:
                _fail(f"nested_offset must be a finite float32 number, got {_short_repr(nested_offset)}")
            if not _is_int(f["nested_blocksize"]):
                _fail(f"nested_blocksize must be an integer, got {f['nested_blocksize']!r}")
            nested_dtype = _parse_dtype(f.get("nested_dtype", "float32"), "nested_dtype")
            if nested_dtype != torch.float32:
                _fail(f"nested_dtype must be float32, got {f['nested_dtype']!r}")
            nested_code = f["nested_quant_map"].to(device) if "nested_quant_map" in f else quant_map("dynamic", device)
            state2 = cls(
                absmax=f["nested_absmax"].to(device),
                code=nested_code,
                blocksize=int(f["nested_blocksize"]),
                dtype=torch.float32,
                validate=False,
            )
            offset = torch.tensor(float(nested_offset), dtype=torch.float32, device=device)
        return cls(
            absmax=f["absmax"].to(device),
            shape=tuple(int(d) for d in shape),
            code=code,
            blocksize=int(blocksize),
            quant_type=quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    # ------------------------------------------------------------------ tensors and devices
    def op_args(self) -> tuple:
        """The scale tensors as fourbit's ops take them: (absmax, nested_absmax, nested_code, offset, nested_blocksize)."""
        if self.nested:
            return self.absmax, self.state2.absmax, self.state2.code, self.offset, self.state2.blocksize
        return self.absmax, None, None, None, 256

    def to(self, device: torch.device | str) -> QuantState:
        """Moves every tensor to ``device`` in place (as bitsandbytes does) and returns self."""
        self.absmax = self.absmax.to(device)
        self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        same_tensor = lambda a, b: (a is None and b is None) or (  # noqa: E731
            a is not None and b is not None and a.device == b.device and torch.equal(a, b)
        )
        return (
            self.shape == other.shape
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and self.dtype == other.dtype
            and same_tensor(self.absmax, other.absmax)
            and same_tensor(self.code, other.code)
            and same_tensor(self.offset, other.offset)
            and self.state2 == other.state2
        )

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        nested = f", nested(blocksize={self.state2.blocksize})" if self.nested else ""
        shape = tuple(self.shape) if self.shape is not None else None
        return (
            f"QuantState({self.quant_type}, shape={shape}, dtype={self.dtype}, blocksize={self.blocksize}"
            f"{nested}, device={self.absmax.device})"
        )


_FLOAT32_MAX = 3.4028234663852886e38


def _short_repr(v: object, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_dtype(value: Any, key: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in _DTYPE_NAMES:
            return value
    elif isinstance(value, str):
        name = value.removeprefix("torch.")
        if name in _DTYPES_BY_NAME:
            return _DTYPES_BY_NAME[name]
    _fail(f"{key} must be one of float32, float16, bfloat16, got {value!r}")


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = t[~torch.isfinite(t)].reshape(-1)[0].item()
        _fail(f"{name} holds a non-finite value ({bad}); the checkpoint is corrupt")
