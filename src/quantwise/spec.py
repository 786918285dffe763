"""Formats, granularities and QuantSpec: *what* a tensor is quantized to (no math here).

| format    | kind  | bits | range (qmin, qmax)   | narrow range |
|-----------|-------|------|----------------------|--------------|
| int8      | int   | 8    | -128 .. 127          | -127 .. 127  |
| uint8     | int   | 8    | 0 .. 255             | 0 .. 254     |
| int4      | int   | 4    | -8 .. 7              | -7 .. 7      |
| uint4     | int   | 4    | 0 .. 15              | 0 .. 14      |
| fp8_e4m3  | float | 8    | +-448, saturating    |              |
| fp8_e5m2  | float | 8    | +-57344, saturating  |              |
| fp16/bf16 | float | 16   | cast                 |              |
| fp32      | float | 32   | left as is           |              |
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

import torch

from quantwise.errors import ConfigError


class Format(str, Enum):
    INT8 = "int8"
    UINT8 = "uint8"
    INT4 = "int4"
    UINT4 = "uint4"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E5M2 = "fp8_e5m2"
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"

    @classmethod
    def parse(cls, value: "str | Format") -> "Format":
        if isinstance(value, Format):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            valid = ", ".join(f.value for f in cls)
            raise ConfigError(f"unknown format {value!r}; valid formats: {valid}") from None

    @property
    def is_integer(self) -> bool:
        return self in (Format.INT8, Format.UINT8, Format.INT4, Format.UINT4)

    @property
    def is_signed(self) -> bool:
        return self not in (Format.UINT8, Format.UINT4)

    @property
    def bits(self) -> int:
        return {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4, "fp8_e4m3": 8, "fp8_e5m2": 8,
                "fp16": 16, "bf16": 16, "fp32": 32}[self.value]

    @property
    def float_max(self) -> float:
        """Largest finite magnitude of a float format (fp8 saturates there)."""
        return {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp16": 65504.0,
                "bf16": torch.finfo(torch.bfloat16).max, "fp32": torch.finfo(torch.float32).max}[self.value]

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype integer codes (or casts) are held in; int4 codes sit in int8 until packed."""
        return {"int8": torch.int8, "uint8": torch.uint8, "int4": torch.int8, "uint4": torch.uint8,
                "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2,
                "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.value]


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_tensor"}


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along `axis` (0 = output channels of Linear/Conv weights)."""

    axis: int = 0

    def __post_init__(self) -> None:
        _check_int(self.axis, "per_channel axis")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_channel", "axis": self.axis}


@dataclass(frozen=True)
class PerToken:
    """One scale per row of an activation (all dims but the last), computed at run time."""

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_token"}


@dataclass(frozen=True)
class PerGroup:
    """One scale per block of `size` consecutive elements along the last (input) dimension."""

    size: int = 128

    def __post_init__(self) -> None:
        _check_int(self.size, "group size")
        if self.size < 1:
            raise ConfigError(f"group size must be positive, got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_group", "size": self.size}


def _check_int(value: Any, what: str) -> None:
    """An integer (not a bool, a float or a string from a hand-edited file): ConfigError."""
    try:
        ok = not isinstance(value, bool) and operator.index(value) is not None  # numpy ints too
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"{what} must be an integer, got {value!r}")


Granularity = Union[PerTensor, PerChannel, PerToken, PerGroup]
_GRANULARITIES = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_token": PerToken,
                  "per_group": PerGroup}


def granularity_from(value: "Granularity | dict | str") -> Granularity:
    """Parse `"per_tensor"`, `{"type": "per_group", "size": 32}` or a Granularity object."""
    if isinstance(value, (PerTensor, PerChannel, PerToken, PerGroup)):
        return value
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or "type" not in value:
        raise ConfigError(f"granularity must be a name or a dict with 'type', got {value!r}")
    kind = value["type"]
    if not isinstance(kind, str) or kind not in _GRANULARITIES:
        raise ConfigError(f"unknown granularity {kind!r}; valid: {', '.join(_GRANULARITIES)}")
    args = {k: v for k, v in value.items() if k != "type"}
    try:
        return _GRANULARITIES[kind](**args)
    except TypeError as exc:
        raise ConfigError(f"bad arguments for granularity {kind!r}: {args} ({exc})") from None


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: format, symmetric or affine, narrow range, granularity."""

    format: Format = Format.INT8
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = field(default_factory=PerTensor)

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", Format.parse(self.format))
        object.__setattr__(self, "granularity", granularity_from(self.granularity))

    @property
    def qmin(self) -> int:
        if not self.format.is_integer:
            raise ConfigError(f"{self.format.value} has no integer range")
        if self.format.is_signed:
            low = -(2 ** (self.format.bits - 1))
            return low + 1 if self.narrow_range else low
        return 0

    @property
    def qmax(self) -> int:
        if not self.format.is_integer:
            raise ConfigError(f"{self.format.value} has no integer range")
        if self.format.is_signed:
            return 2 ** (self.format.bits - 1) - 1
        high = 2**self.format.bits - 1
        return high - 1 if self.narrow_range else high

    def to_dict(self) -> dict[str, Any]:
        # narrow_range only when set: a saved model's metadata repeats this per layer
        return {"format": self.format.value, "symmetric": self.symmetric,
                **({"narrow_range": True} if self.narrow_range else {}),
                "granularity": self.granularity.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantSpec":
        if not isinstance(data, dict):
            raise ConfigError(f"a quantization spec must be a mapping (format, symmetric, "
                              f"narrow_range, granularity), got {data!r}")
        allowed = {"format", "symmetric", "narrow_range", "granularity"}
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"unknown spec keys {sorted(unknown, key=str)}; valid keys: {sorted(allowed)}")
        for key in ("symmetric", "narrow_range"):  # "no" or 0 from a file would be truthy / falsy
            if key in data and not isinstance(data[key], bool):
                raise ConfigError(f"spec {key} must be true or false, got {data[key]!r}")
        return cls(**data)
