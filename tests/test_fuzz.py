"""Fuzzing the readers of untrusted files: safetensors headers, index files and GGUF files.

The property, for each reader: whatever the bytes, it either reads them or raises ModelError —
never another exception, a hang or a huge allocation — and what it reads is what MLX then loads.
Bounded for CI: a fixed, derandomized set of examples per target (MERGEKIT_FUZZ_EXAMPLES=5000
runs a longer, random campaign), a time limit per example (SIGALRM) and a cap on the Python and
numpy heap per example (tracemalloc). Every finding is kept below as an explicit regression test.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_mlx import dtypes
from mergekit_mlx.errors import ModelError
from mergekit_mlx.formats import open_model
from mergekit_mlx.formats.files import read_config
from mergekit_mlx.formats.safetensors import read_safetensors_header, safetensors_files

EXAMPLES = int(os.environ.get("MERGEKIT_FUZZ_EXAMPLES", "250"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=EXAMPLES <= 1000,  # CI runs the same examples every time; long campaigns explore
    deadline=None,  # the per-example limit below is a hard one, not hypothesis' soft deadline
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SECONDS_PER_EXAMPLE = 5
HEAP_PER_EXAMPLE = 64 << 20


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the reader hides it."""


@contextmanager
def bounded():
    """Fail on an example that runs past SECONDS_PER_EXAMPLE or allocates more than HEAP_PER_EXAMPLE."""

    def alarm(signum, frame):
        raise Hang(f"reader still running after {SECONDS_PER_EXAMPLE} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_EXAMPLE)
    tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < HEAP_PER_EXAMPLE, f"reader allocated {peak / 1e6:.0f} MB"


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# ---------------- safetensors headers ----------------


def safetensors_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def valid_safetensors() -> bytes:
    a = np.arange(6, dtype=np.float32).tobytes()
    b = np.arange(4, dtype=np.float16).tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
        "c": {"dtype": "I8", "shape": [0], "data_offsets": [32, 32]},
    }
    return safetensors_bytes(header, a + b)


def check_safetensors_file(path: Path) -> None:
    """The reader's verdict on one file, and when it accepts the file, MLX's agreement."""
    try:
        infos, _ = read_safetensors_header(path)
    except ModelError:
        return
    arrays = mx.load(str(path))  # must not raise: the header was accepted
    assert set(arrays) == set(infos)
    for name, info in infos.items():
        assert tuple(arrays[name].shape) == info.shape, name
        if dtypes.mlx_dtype(info.dtype) is not None:
            assert arrays[name].dtype == dtypes.mlx_dtype(info.dtype), name
        mx.eval(arrays[name])


numbers = st.one_of(
    st.integers(-4, 64),
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, 2**64 - 1, 2**64]),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(list(dtypes.BY_CODE)), st.sampled_from(["F33", "", "f32"]), numbers),
        "shape": st.one_of(st.lists(numbers, max_size=4), st.lists(st.integers(0, 8), max_size=3), numbers),
        "data_offsets": st.one_of(
            st.lists(numbers, max_size=3), st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list), numbers
        ),
    },
    optional={"extra": numbers},
)
headers = st.one_of(
    st.dictionaries(st.text(max_size=6), entries, max_size=4),
    st.dictionaries(st.text(max_size=6), st.one_of(entries, numbers, st.lists(numbers)), max_size=3).map(
        lambda d: dict(d, __metadata__={"format": "pt"})
    ),
    st.lists(numbers, max_size=3),
    numbers,
)


@FUZZ
@given(header=headers, data=st.binary(max_size=96), length=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_fuzz_structured_safetensors_headers(work, header, data, length):
    path = work / "structured.safetensors"
    path.write_bytes(safetensors_bytes(header, data, length))
    with bounded():
        check_safetensors_file(path)


def mutate(blob: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    for kind, at, payload in edits:
        at %= len(blob) + 1
        if kind == "overwrite":
            blob = blob[:at] + payload + blob[at + len(payload) :]
        elif kind == "insert":
            blob = blob[:at] + payload + blob[at:]
        elif kind == "truncate":
            blob = blob[:at]
        elif kind == "flip" and at < len(blob):
            blob = blob[:at] + bytes([blob[at] ^ (payload[0] if payload else 0xFF)]) + blob[at + 1 :]
    return blob


edit_lists = st.lists(
    st.tuples(
        st.sampled_from(["overwrite", "insert", "truncate", "flip"]), st.integers(0, 400), st.binary(min_size=1, max_size=8)
    ),
    min_size=1,
    max_size=4,
)


@FUZZ
@given(edits=edit_lists)
def test_fuzz_mutated_safetensors_files(work, edits):
    path = work / "mutated.safetensors"
    path.write_bytes(mutate(valid_safetensors(), edits))
    with bounded():
        check_safetensors_file(path)


@FUZZ
@given(blob=st.binary(max_size=256))
def test_fuzz_garbage_as_a_model_directory(work, blob):
    """Random bytes as a model's only weight file, read end to end through open_model and load."""
    model = work / "garbage-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}))
    (model / "model.safetensors").write_bytes(blob)
    with bounded():
        try:
            source = open_model(model)
        except ModelError:
            return
        for name in source.tensor_names():
            try:
                mx.eval(source.load(name))
            except ModelError:
                pass


# ---------------- index files ----------------


@pytest.fixture(scope="module")
def indexed(work) -> Path:
    """A model directory with two real shards, a subfolder, and a symlink to a file outside it."""
    model = work / "indexed"
    (model / "sub").mkdir(parents=True)
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (model / name).write_bytes(valid_safetensors())
    (model / "sub" / "x.safetensors").write_bytes(valid_safetensors())
    (work / "outside.safetensors").write_bytes(valid_safetensors())
    (model / "link.safetensors").symlink_to(work / "outside.safetensors")
    return model


file_names = st.one_of(
    st.sampled_from(
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "link.safetensors",
            "missing.safetensors",
            "../outside.safetensors",
            "sub/x.safetensors",
            "sub",
            "/etc/passwd",
            "",
            ".",
            "..",
            "x\0y",
            "\\x",
            "a" * 300,
        ]
    ),
    st.text(max_size=12),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=3), max_size=2),
)
indexes = st.one_of(
    st.fixed_dictionaries(
        {"weight_map": st.dictionaries(st.text(max_size=8), file_names, max_size=5)},
        optional={"metadata": st.dictionaries(st.text(max_size=4), numbers, max_size=2)},
    ),
    st.fixed_dictionaries({"weight_map": st.one_of(numbers, st.lists(file_names, max_size=3))}),
    st.lists(numbers, max_size=3),
    numbers,
)


def check_index(model: Path) -> None:
    try:
        files = safetensors_files(model)
    except ModelError:
        return
    for f in files:
        assert f.resolve().parent == model.resolve(), f"{f} resolves outside the model directory"


@FUZZ
@given(index=indexes)
def test_fuzz_structured_index_files(indexed, index):
    (indexed / "model.safetensors.index.json").write_text(json.dumps(index))
    with bounded():
        check_index(indexed)


@FUZZ
@given(blob=st.binary(max_size=200))
def test_fuzz_garbage_index_and_config_files(indexed, blob):
    (indexed / "model.safetensors.index.json").write_bytes(blob)
    (indexed / "config.json").write_bytes(blob)
    with bounded():
        check_index(indexed)
        try:
            assert isinstance(read_config(indexed), dict)
        except ModelError:
            pass


# ---------------- GGUF files ----------------

H, V, I = 32, 16, 64
GGUF_TENSORS = {  # GGUF name -> Hugging Face shape (rows, columns) and stored type
    "token_embd.weight": ((V, H), gguf.GGMLQuantizationType.Q8_0),
    "output_norm.weight": ((H,), gguf.GGMLQuantizationType.F32),
    "output.weight": ((V, H), gguf.GGMLQuantizationType.F16),
    "blk.0.attn_norm.weight": ((H,), gguf.GGMLQuantizationType.F32),
    "blk.0.attn_q.weight": ((H, H), gguf.GGMLQuantizationType.F32),
    "blk.0.attn_k.weight": ((H, H), gguf.GGMLQuantizationType.F32),
    "blk.0.ffn_up.weight": ((I, H), gguf.GGMLQuantizationType.F16),
}


def valid_gguf(path: Path) -> bytes:
    """A small llama GGUF as the gguf package writes it: metadata, a vocabulary, three tensor types."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([1] * V)
    rng = np.random.default_rng(0)
    for name, (shape, qtype) in GGUF_TENSORS.items():
        values = rng.normal(size=shape).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, values)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, values.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def gguf_blob(work) -> bytes:
    blob = valid_gguf(work / "valid.gguf")
    model = open_model(work / "valid.gguf")  # the seed file itself reads cleanly
    assert len(model.tensor_names()) == len(GGUF_TENSORS)
    return blob


def check_gguf_file(path: Path) -> None:
    try:
        model = open_model(path)
    except ModelError:
        return
    assert isinstance(model.config, dict)
    try:
        model.tokenizer_dir  # noqa: B018 - rebuilt from the metadata when the GGUF is a tokenizer source
    except ModelError:
        pass
    for name in model.tensor_names():
        try:
            array = model.load(name)
        except ModelError:
            continue
        assert tuple(array.shape) == model.info(name).shape, name
        mx.eval(array)


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["overwrite", "insert", "truncate", "flip"]),
            st.integers(0, 1200),
            st.one_of(
                st.binary(min_size=1, max_size=8),
                st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n)),
                st.integers(0, 2**32 - 1).map(lambda n: struct.pack("<I", n)),
            ),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_mutated_gguf_files(work, gguf_blob, edits):
    path = work / "mutated.gguf"
    path.write_bytes(mutate(gguf_blob, edits))
    with bounded():
        check_gguf_file(path)


def gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


gguf_scalars = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12])
gguf_values = st.one_of(
    st.tuples(gguf_scalars, st.binary(min_size=0, max_size=8)).map(lambda t: struct.pack("<I", t[0]) + t[1]),
    st.binary(max_size=12).map(lambda b: struct.pack("<I", 8) + gguf_string(b)),
    st.tuples(
        st.sampled_from([0, 4, 8, 9, 99]), st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1)), st.binary(max_size=24)
    ).map(lambda t: struct.pack("<IIQ", 9, t[0], t[1]) + t[2]),
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=8)).map(lambda t: struct.pack("<I", t[0]) + t[1]),
)
gguf_keys = st.one_of(
    st.sampled_from(
        [
            b"general.architecture",
            b"llama.block_count",
            b"llama.embedding_length",
            b"llama.attention.head_count",
            b"general.alignment",
            b"tokenizer.ggml.tokens",
        ]
    ),
    st.binary(max_size=6),
)
gguf_tensor_infos = st.tuples(
    st.sampled_from([b"token_embd.weight", b"output_norm.weight", b"blk.0.attn_q.weight", b"x"]),
    st.one_of(st.lists(st.integers(0, 64), max_size=4), st.lists(st.integers(0, 2**64 - 1), max_size=5)),
    st.one_of(st.sampled_from([0, 1, 8, 30]), st.integers(0, 2**32 - 1)),
    st.one_of(st.integers(0, 256), st.integers(0, 2**64 - 1)),
).map(
    lambda t: (
        gguf_string(t[0])
        + struct.pack("<I", len(t[1]))
        + b"".join(struct.pack("<Q", d) for d in t[1])
        + struct.pack("<IQ", t[2], t[3])
    )
)


@FUZZ
@given(
    version=st.sampled_from([2, 3, 3, 3, 1, 2**24]),
    kvs=st.lists(st.tuples(gguf_keys, gguf_values), max_size=5),
    infos=st.lists(gguf_tensor_infos, max_size=3),
    counts=st.one_of(
        st.none(),
        st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
        st.tuples(st.integers(0, 6), st.integers(0, 8)),
    ),
    data=st.binary(max_size=300),
)
def test_fuzz_structured_gguf_headers(work, version, kvs, infos, counts, data):
    n_tensors, n_kv = counts or (len(infos), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)
    head += b"".join(gguf_string(k) + v for k, v in kvs) + b"".join(infos)
    path = work / "structured.gguf"
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    with bounded():
        check_gguf_file(path)


# ---------------- regressions: each finding of the fuzzers, kept as a named case ----------------


def refused(path: Path, reader, match: str) -> None:
    with bounded(), pytest.raises(ModelError, match=match):
        reader(path)


@pytest.mark.parametrize(
    "header, match",
    [
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # was RecursionError
        (
            b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
            "not valid JSON",
        ),  # int too long: ValueError
        (b'{"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype"),  # unhashable list: TypeError
        (
            b'{"__metadata__": {"n": 1}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            "__metadata__",
        ),  # MLX load failed
        (
            b'{"__metadata__": [], "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            "__metadata__",
        ),  # accepted as empty
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": Infinity}}', "not valid JSON"),  # MLX load failed
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'.encode("utf-16"), "not valid JSON"),  # read as UTF-16
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            "appears twice",
        ),  # the last entry silently won
        (
            b'{"a": {"dtype": "F32", "shape": [' + b",".join([b"1000000000"] * 200_000) + b'], "data_offsets": [0, 4]}}',
            "more bytes than the file holds",
        ),  # quadratic big-integer product
    ],
    ids=[
        "deep-json",
        "long-int",
        "dtype-list",
        "metadata-int",
        "metadata-list",
        "infinity",
        "utf-16",
        "duplicate-key",
        "many-dims",
    ],
)
def test_regression_safetensors_header(work, header, match):
    path = work / "regression.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 4))
    refused(path, read_safetensors_header, match)


@pytest.mark.parametrize(
    "content, match",
    [
        ("[1, 2]", "non-empty 'weight_map'"),  # was AttributeError
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # was RecursionError
        (json.dumps({"weight_map": {"a": "x\0y.safetensors"}}), "must be a file name"),  # was ValueError (embedded null byte)
        (json.dumps({"weight_map": {"a": "x" * 5000}}), "must be a file name"),  # was OSError (file name too long)
        (json.dumps({"weight_map": {"a": "link.safetensors"}}), "outside the model directory"),  # a symlink out was followed
    ],
    ids=["list", "deep-json", "nul-byte", "long-name", "symlink-out"],
)
def test_regression_index_file(indexed, content, match):
    (indexed / "model.safetensors.index.json").write_text(content)
    refused(indexed, safetensors_files, match)


def test_regression_index_or_config_that_is_a_directory(work):
    model = work / "dirs"
    (model / "model.safetensors.index.json").mkdir(parents=True)
    (model / "config.json").mkdir()
    refused(model, safetensors_files, "cannot read the index")  # was IsADirectoryError
    refused(model, read_config, "cannot read config.json")


def gguf_file(work: Path, kvs: bytes, n_kv: int, infos: bytes = b"", n_tensors: int = 0, data: bytes = b"") -> Path:
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + infos
    path = work / "regression.gguf"
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


def gguf_kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key.encode()) + struct.pack("<I", vtype) + payload


ARCH = gguf_kv("general.architecture", 8, gguf_string(b"llama"))
LLAMA = ARCH + b"".join(
    gguf_kv(f"llama.{k}", 4, struct.pack("<I", v))
    for k, v in [("block_count", 1), ("embedding_length", 8), ("attention.head_count", 2)]
)


def test_regression_gguf_array_count_past_the_end_of_the_file(work):
    # the gguf package looped (and allocated) once per claimed item: 2**60 items never ended
    path = gguf_file(work, ARCH + gguf_kv("x", 9, struct.pack("<IQ", 0, 2**60)), 2)
    refused(path, open_model, "claims an array of 1152921504606846976 items")


@pytest.mark.parametrize(
    "arch, match",
    [
        (
            gguf_kv("general.architecture", 9, struct.pack("<IQII", 4, 2, 1, 2)),
            "architecture \\[1, 2\\] is not supported",
        ),  # TypeError
        (
            gguf_kv("general.architecture", 8, gguf_string(b"\xff\xfe")),
            "'general.architecture' cannot be read",
        ),  # UnicodeDecodeError
    ],
    ids=["array", "not-utf8"],
)
def test_regression_gguf_architecture_of_the_wrong_type(work, arch, match):
    refused(gguf_file(work, arch, 1), open_model, match)


def test_regression_gguf_metadata_of_the_wrong_type(work):
    path = gguf_file(work, LLAMA + gguf_kv("llama.attention.layer_norm_rms_epsilon", 8, gguf_string(b"tiny")), 5)
    refused(path, open_model, "metadata is malformed")  # was ValueError from float('tiny')


def test_regression_gguf_overlapping_tensors(work):
    info = b"".join(gguf_string(n) + struct.pack("<IQQIQ", 2, 8, 4, 0, 0) for n in (b"token_embd.weight", b"output.weight"))
    path = gguf_file(work, LLAMA, 4, info, 2, b"\0" * 128)
    refused(path, open_model, "overlap")  # two tensors sharing bytes were accepted


def test_regression_gguf_heads_that_do_not_divide_the_q_rows(work):
    # the rotary un-permutation on load raised ValueError from a reshape (found by a one-bit flip)
    kvs = ARCH + b"".join(
        gguf_kv(f"llama.{k}", 4, struct.pack("<I", v))
        for k, v in [("block_count", 1), ("embedding_length", 8), ("attention.head_count", 3)]
    )
    info = gguf_string(b"blk.0.attn_q.weight") + struct.pack("<IQQIQ", 2, 8, 8, 0, 0)
    path = gguf_file(work, kvs, 4, info, 1, b"\0" * 256)
    refused(path, open_model, "'model.layers.0.self_attn.q_proj.weight' has 8 rows, which 3 heads")
