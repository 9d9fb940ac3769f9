"""What every format shares: a reader is a `ModelSource`, a writer is a `Writer`.

A `ModelSource` is one input model, whatever its format, seen as the unquantized Hugging Face model
it encodes: its config, the names, shapes and dtypes of its tensors (from headers alone, checked
when it is opened), and one tensor loaded as an `mx.array` only when asked.

A `Writer` is told up front every tensor it will get (`OutputTensor`: name, shape, dtype — the plan
knows them), so it can lay out shards, a GGUF header or a quantization config before any data
exists. Tensors then arrive in plan order through `add`, and `finish` writes what closes the output.
The directory a writer fills is a temporary one: the output lifecycle renames it into place only
after `finish`. What the lifecycle may do with an output (resume it, check its size, read it back,
put the tokenizer beside it) is said by the writer's class attributes, never by its format's name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Set
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .. import dtypes
from ..errors import ModelError
from ..names import layer_index
from .files import TOKENIZER_FILES, check_side_files

DEFAULT_SHARD_BYTES = 5 * 1000**3


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code ("BF16", "F32", ...) of the tensor as loaded
    file: Path | None = None  # the file that holds it
    offset: int | None = None  # where its bytes start in that file, when stored there as they load

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.itemsize(self.dtype)


class ModelSource:
    """One input model. Subclasses implement `load`; headers are read at construction."""

    format = "hf"
    parallel_reads = False  # True where several threads may call load() side by side

    def __init__(self, path: Path, config: dict, infos: dict[str, TensorInfo]):
        self.path = path
        self.config = config
        self._infos = infos
        # checked now, when the model is opened, so a hostile side file stops the run before any output
        self.side_files: dict[str, Path] = check_side_files(path) if path.is_dir() else {}

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def has(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelError(f"{self.path}: has no tensor {name!r}") from None

    def load(self, name: str) -> mx.array:
        raise NotImplementedError  # every concrete source overrides this

    def release(self) -> None:
        """Forget what was opened for reading (lazy arrays that would keep their data once evaluated)."""

    def input_paths(self) -> list[Path]:
        """What this input reads besides its tensors' files: an output may be none of these (nor hold
        them), and a resumed merge proves the regular files among them unchanged. A reader that wraps
        another input (an adapter over its base) adds its own."""
        return [self.path]

    @property
    def tokenizer_dir(self) -> Path | None:
        """The model directory when it holds tokenizer files (all of them checked by `check_side_files`)."""
        return self.path if any(f in self.side_files for f in TOKENIZER_FILES) else None

    @property
    def num_layers(self) -> int:
        return num_layers(self.config, self.tensor_names(), self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


# how a reader that wraps another model (BitDelta's base) opens it: the dispatcher, handed down
Opener = Callable[[Path], ModelSource]


def num_layers(config: dict, names: list[str], where: Path) -> int:
    """The decoder layers a model has: its config's count, else one past the highest layer index."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        for cfg in (config, text):
            n = cfg.get(key)
            if isinstance(n, int) and not isinstance(n, bool):
                if n < 1:
                    raise ModelError(f"{where}: config.json says {key} is {n}; a model needs at least one layer")
                return n
    found = [i for i in map(layer_index, names) if i is not None]
    if found:
        return max(found) + 1
    raise ModelError(f"{where}: config has no num_hidden_layers and no tensor names with layer indices")


def strip_quantization(config: dict) -> dict:
    """The config of the dequantized model: a copy, minus the quantization blocks."""
    out = copy.deepcopy(config)
    out.pop("quantization", None)
    out.pop("quantization_config", None)
    return out


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size


@dataclass(frozen=True)
class WriteOptions:
    """The settings of a writer besides its tensors and config; each format uses those that apply."""

    max_shard_bytes: int = DEFAULT_SHARD_BYTES  # sharded formats
    group_size: int | None = None  # MLX-quantized formats; None: the format's default
    tokenizer_dir: Path | None = None  # formats that hold the tokenizer (`holds_tokenizer`)
    skip_shards: Set[str] = frozenset()  # resumable formats: shard files already complete on disk


class Writer:
    """One output format's writer. Constructed as `cls(out_dir, tensors, config, out_format, options)`."""

    out_formats: tuple[str, ...] = ()  # the --out-format names this writer writes
    resumable = False  # shard files finished are kept by `--resume` (`files`, `written`, `checksums`)
    single_file = False  # writes one file, `file_name`; an output path with its suffix names that file
    file_name = ""
    holds_tokenizer = False  # embeds the tokenizer of `options.tokenizer_dir` in its own file
    copies_tokenizer = False  # a directory the input's tokenizer files are copied into, beside the weights
    known_size = False  # writes exactly the planned tensors' bytes, so free space can be checked up front
    verifiable = False  # a safetensors directory holding exactly the planned tensors, read back before commit
    # `add` also takes a DeviceTensor: an output still in GPU memory, which it copies to host memory
    # piece by piece while writing (kernels/gpu_writes.py); the others get MLX arrays only
    takes_device_tensors = False

    def wants(self, name: str) -> bool:
        """False for a tensor the output already holds (a resumed run need not compute it)."""
        return True

    def add(self, name: str, array: mx.array) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError
