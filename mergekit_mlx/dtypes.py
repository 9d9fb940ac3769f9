"""The one table of tensor dtypes: safetensors code, MLX dtype, bytes per element, config name, GGUF type.

Every other module asks this table (through the functions below) instead of keeping its own dict;
adding a dtype is one row. A row whose MLX dtype is None (FP8) can be described by a header but is
never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class DType:
    code: str  # safetensors header code: "BF16"
    itemsize: int  # bytes per element
    mlx: mx.Dtype | None  # None where MLX has no such dtype: never loaded
    name: str  # the name a config's torch_dtype and a recipe's dtype use: "bfloat16"
    gguf: int | None = None  # GGML tensor type id (gguf.GGMLQuantizationType), where GGUF stores it as is
    weight: bool = False  # a floating dtype weights are stored and merged in (half, bfloat, single)


TABLE: tuple[DType, ...] = (
    DType("F32", 4, mx.float32, "float32", gguf=0, weight=True),
    DType("F16", 2, mx.float16, "float16", gguf=1, weight=True),
    DType("BF16", 2, mx.bfloat16, "bfloat16", gguf=30, weight=True),
    DType("F64", 8, mx.float64, "float64", gguf=28),
    DType("I64", 8, mx.int64, "int64", gguf=27),
    DType("I32", 4, mx.int32, "int32", gguf=26),
    DType("I16", 2, mx.int16, "int16", gguf=25),
    DType("I8", 1, mx.int8, "int8", gguf=24),
    DType("U64", 8, mx.uint64, "uint64"),
    DType("U32", 4, mx.uint32, "uint32"),
    DType("U16", 2, mx.uint16, "uint16"),
    DType("U8", 1, mx.uint8, "uint8"),
    DType("BOOL", 1, mx.bool_, "bool"),
    DType("F8_E4M3", 1, None, "float8_e4m3fn"),
    DType("F8_E5M2", 1, None, "float8_e5m2"),
)
BY_CODE: dict[str, DType] = {d.code: d for d in TABLE}
BY_MLX: dict[mx.Dtype, DType] = {d.mlx: d for d in TABLE if d.mlx is not None}
BY_NAME: dict[str, DType] = {d.name: d for d in TABLE}

# the dtypes a recipe's `dtype`/`out_dtype` may name: every floating dtype MLX computes in
FLOAT_NAMES: tuple[str, ...] = tuple(d.name for d in TABLE if d.mlx is not None and mx.issubdtype(d.mlx, mx.floating))
# the dtypes weights are stored in: `convert --out-dtype` choices, the dtypes of quantization scales
WEIGHT_NAMES: tuple[str, ...] = tuple(d.name for d in TABLE if d.weight)
WEIGHT_CODES: tuple[str, ...] = tuple(d.code for d in TABLE if d.weight)


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code (KeyError for an unknown code)."""
    return BY_CODE[code].itemsize


def mlx_dtype(code: str) -> mx.Dtype | None:
    """The MLX dtype a safetensors code loads as, or None where MLX has none (FP8)."""
    return BY_CODE[code].mlx


def named(name: str) -> mx.Dtype | None:
    """The MLX dtype of a config/recipe dtype name ("bfloat16"), or None for a name not in the table."""
    d = BY_NAME.get(name)
    return d.mlx if d is not None else None


def safetensors_code(dtype: mx.Dtype) -> str:
    """The safetensors code of an MLX dtype (KeyError for one safetensors cannot hold)."""
    return BY_MLX[dtype].code


def set_config_dtype(config: dict, dtype: mx.Dtype) -> None:
    """Name the weights' dtype in a config under the key its style uses: transformers 5 writes `dtype`,
    transformers 4 `torch_dtype` (a config with both keeps both)."""
    if "dtype" in config:
        config["dtype"] = torch_dtype_name(dtype)
    if "torch_dtype" in config or "dtype" not in config:
        config["torch_dtype"] = torch_dtype_name(dtype)


def torch_dtype_name(dtype: mx.Dtype) -> str:
    """The name config.json's torch_dtype uses for an MLX dtype."""
    d = BY_MLX.get(dtype)
    return d.name if d is not None else str(dtype).split(".")[-1]


def weight_dtype(code: str) -> mx.Dtype | None:
    """The MLX dtype of a weight dtype code (BF16, F16, F32), else None."""
    d = BY_CODE.get(code)
    return d.mlx if d is not None and d.weight else None


def is_weight(dtype: mx.Dtype) -> bool:
    """Whether an MLX dtype is one weights are stored in (bfloat16, float16, float32)."""
    d = BY_MLX.get(dtype)
    return d is not None and d.weight


def declared_weight_code(config: dict, default: str = "BF16") -> str:
    """The code of a config's torch_dtype when it names a weight dtype, else `default`."""
    d = BY_NAME.get(str(config.get("torch_dtype", "")))
    return d.code if d is not None and d.weight else default
