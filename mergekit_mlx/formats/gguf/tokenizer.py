"""GGUF tokenizers both ways: GGUF metadata -> tokenizer.json, and a Hugging Face tokenizer -> GGUF metadata.

A GGUF input's tokenizer is rebuilt as tokenizer.json + tokenizer_config.json (exactly, when the
file kept its tokenizer.json under tokenizer.huggingface.json). A GGUF output embeds the tokenizer
of an input model directory the way llama.cpp's converter does, from a private copy of that
directory's checked tokenizer files (the `gguf` package follows symlinks).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import gguf

from ...errors import ModelError, RecipeError
from ..files import TOKENIZER_FILES, copy_side_files
from .layout import read_field

log = logging.getLogger(__name__)

# tokenizer.ggml.pre -> the pre-tokenizer split regex of the Hugging Face tokenizer it stands for
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS = {"llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}


# ---------------------------------------------------------------------------------------------
# tokenizer: GGUF metadata -> tokenizer.json


def write_tokenizer(reader: gguf.GGUFReader, out: Path, where: Path) -> bool:
    """Write tokenizer.json and tokenizer_config.json for the tokenizer the metadata describes.

    A tokenizer.json kept under tokenizer.huggingface.json is written back as it was. Otherwise the
    tokenizer is rebuilt from llama.cpp's vocabulary keys ("gpt2" byte-level BPE with merges, or
    "llama" SentencePiece BPE with scores). Returns False, with a warning, when neither is there.
    """
    from tokenizers import Tokenizer

    hf_json = read_field(reader, gguf.Keys.Tokenizer.HF_JSON)
    if hf_json is not None:
        tok = Tokenizer.from_str(hf_json)
        (out / "tokenizer.json").write_text(hf_json, encoding="utf-8")
    else:
        tok = rebuild_tokenizer(reader, where)
        if tok is None:
            return False
        tok.save(str(out / "tokenizer.json"))

    def special(name: str) -> str | None:
        tid = read_field(reader, f"tokenizer.ggml.{name}_token_id")
        return tok.id_to_token(tid) if isinstance(tid, int) else None

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special("bos"),
        "eos_token": special("eos"),
        "unk_token": special("unknown"),
        "pad_token": special("padding"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": read_field(reader, f"{read_field(reader, 'general.architecture')}.context_length", 2048),
        "chat_template": read_field(reader, "tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}, indent=2) + "\n")
    return True


def rebuild_tokenizer(reader: gguf.GGUFReader, where: Path):
    """A `tokenizers.Tokenizer` from llama.cpp's vocabulary keys, or None for other vocabularies."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = read_field(reader, "tokenizer.ggml.model")
    tokens = read_field(reader, "tokenizer.ggml.tokens") or []
    if kind not in ("gpt2", "llama") or not tokens:
        log.warning("%s: tokenizer %r is not rebuilt (supported: gpt2, llama); take it from another model", where, kind)
        return None
    types = read_field(reader, "tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in (read_field(reader, "tokenizer.ggml.merges") or [])]
        pre = read_field(reader, "tokenizer.ggml.pre", "default")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
        split = PRE_SPLITS.get(pre)
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), "isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
            if split
            else pre_tokenizers.ByteLevel(add_prefix_space=False)
        )
        tok.decoder = decoders.ByteLevel()
    else:
        scores = read_field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = read_field(reader, "tokenizer.ggml.unknown_token_id")
        add_prefix = bool(read_field(reader, "tokenizer.ggml.add_space_prefix", True))
        tok = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=sentencepiece_merges(tokens, scores, types),
                unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        space = [normalizers.Replace(" ", "\u2581")]
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if add_prefix else []) + space)
        tail = [decoders.Strip(" ", 1, 0)] if add_prefix else []
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + tail)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == gguf.TokenType.CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == gguf.TokenType.USER_DEFINED]
    )

    def special(name: str) -> str | None:
        tid = read_field(reader, f"tokenizer.ggml.{name}_token_id")
        return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else None

    bos, eos = special("bos"), special("eos")
    add_bos = bool(read_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(read_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
        specials = sorted({(t, vocab[t]) for t in ((bos,) if add_bos else ()) + ((eos,) if add_eos else ())})
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: a token with a higher score merges first.

    Every way to split a normal token into two vocabulary pieces is a merge, ranked by the
    token's score (SentencePiece BPE applies the best-scoring merge first).
    """
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED)}
    found = []
    for tok, i in vocab.items():
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                found.append((-scores[i], i, vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


# ---------------------------------------------------------------------------------------------
# tokenizer: Hugging Face directory -> GGUF metadata


def add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int) -> None:
    """Embed the tokenizer of an input model directory (see `_add_tokenizer`).

    The gguf package opens whatever names it looks for, following symlinks: it is given a private
    copy of the directory's checked tokenizer files (`files.copy_side_files`) instead.
    """
    with tempfile.TemporaryDirectory(prefix="mergekit-mlx-gguf-tokenizer-") as tmp:
        copy_side_files(tok_dir, Path(tmp), TOKENIZER_FILES + ("config.json",))
        _add_tokenizer(w, Path(tmp), vocab_size, tok_dir)


def _add_tokenizer(w: gguf.GGUFWriter, tok_dir: Path, vocab_size: int, shown: Path) -> None:
    """Embed the tokenizer of a Hugging Face directory the way llama.cpp's converter does for llama.

    The vocabulary goes in as llama.cpp reads it: "llama" (SentencePiece-style, with scores) for
    BPE with byte fallback or without merges (Llama 2, tokenizer.model files, character vocabularies),
    "gpt2" (byte-level, with merges) for the rest of BPE; merges over plain characters are respelled
    in the byte-level alphabet, which is the same tokenizer for ASCII text. The tokenizer.json itself is also kept, under the GGUF key
    tokenizer.huggingface.json, so readers rebuild it exactly.
    """
    tj_path = tok_dir / "tokenizer.json"
    tj = None
    if tj_path.is_file():
        try:
            text = tj_path.read_text(encoding="utf-8")
            tj = json.loads(text)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ModelError(f"{shown / tj_path.name}: not UTF-8 JSON ({e})") from None
        w.add_string(gguf.Keys.Tokenizer.HF_JSON, text)
    scores: list[float] | None = None
    merges = False
    if (tok_dir / "tokenizer.model").is_file() and _has_sentencepiece():
        vocab = gguf.vocab.SentencePieceVocab(tok_dir)
        tokens, all_scores, all_types = zip(*vocab.all_tokens())
        tokens, scores, types = [t.decode("utf-8") for t in tokens], list(all_scores), [int(t) for t in all_types]
        model, pre = "llama", "default"
    elif tj is not None and tj.get("model", {}).get("type") == "BPE":
        if tj["model"].get("byte_fallback") or not tj["model"].get("merges"):
            # llama.cpp's "gpt2" vocabulary must carry merges; a merge-less BPE is one token per piece
            tokens, scores, types, prefix = _sentencepiece_style_vocab(tj)
            model, pre = "llama", "default"
            w.add_add_space_prefix(prefix)
        elif (tj.get("decoder") or {}).get("type") == "ByteLevel":
            tokens, types = _byte_level_vocab(tj)
            model, pre, merges = "gpt2", _pre_tokenizer_name(tj), True
        else:
            tokens, types = _byte_level_vocab(tj, respell=True)
            model, pre = "gpt2", "default"
            w.add_token_merges(
                [" ".join(_respell(p) for p in (m.split(" ", 1) if isinstance(m, str) else m)) for m in tj["model"]["merges"]]
            )
    elif tj is not None:
        log.warning(
            "%s: a %s tokenizer has no llama.cpp vocabulary type; the GGUF keeps its tokenizer.json only",
            shown / tj_path.name,
            tj.get("model", {}).get("type"),
        )
        w.add_tokenizer_model("none")
        gguf.SpecialVocab(tok_dir, n_vocab=vocab_size or None).add_to_gguf(w, quiet=True)
        return
    else:
        raise RecipeError(f"{shown}: no tokenizer.json (or tokenizer.model) to embed in the GGUF output")
    if vocab_size > len(tokens):  # the embedding has rows no token names: llama.cpp pads the same way
        pad = range(len(tokens), vocab_size)
        tokens += [f"[PAD{i}]" for i in pad]
        types += [gguf.TokenType.UNUSED] * len(pad)
        if scores is not None:
            scores += [-1000.0] * len(pad)
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(tok_dir, load_merges=merges, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def _added(tj: dict) -> dict[int, dict]:
    return {a["id"]: a for a in tj.get("added_tokens", []) if isinstance(a, dict) and "id" in a}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest for code points from 256."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_ALPHABET = _bytes_to_unicode()


def _respell(text: str) -> str:
    """A string in the byte-level alphabet: each UTF-8 byte as its stand-in character."""
    return "".join(BYTE_ALPHABET[b] for b in text.encode("utf-8"))


def _byte_level_vocab(tj: dict, respell: bool = False) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types; with respell, model tokens move to the byte-level alphabet."""
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = _added(tj)
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(_respell(by_id[i]) if respell and i not in added else by_id[i])
        if i in added:
            special = added[i].get("special") or (by_id[i].startswith("<|") and by_id[i].endswith("|>"))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _sentencepiece_style_vocab(tj: dict) -> tuple[list[str], list[float], list[int], bool]:
    """A non-byte-level BPE tokenizer.json as a llama.cpp "llama" vocabulary.

    Spaces are spelled "\u2581" as SentencePiece does; a token's score ranks the merge that makes it
    (earlier merge, higher score), which is the order llama.cpp's tokenizer applies them in.
    Returns tokens, scores, types and whether a space is prepended to the text.
    """
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = _added(tj)
    for i, a in added.items():
        vocab.setdefault(a["content"], i)
    rank = {}
    for r, m in enumerate(tj["model"].get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    by_id = {i: t for t, i in vocab.items()}
    unk = tj["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(max(by_id) + 1):
        t = by_id.get(i, f"[PAD{i}]")
        scores.append(-float(rank[t]) if t in rank else 0.0)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(gguf.TokenType.BYTE)
        elif t == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            t = t.replace(" ", "\u2581")
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    return tokens, scores, types, _prepends_space([tj.get("normalizer"), tj.get("pre_tokenizer")])


def _prepends_space(node: Any) -> bool:
    """Whether a normalizer/pre-tokenizer tree puts "\u2581" before the text (Prepend or Metaspace)."""
    if isinstance(node, list):
        return any(_prepends_space(n) for n in node)
    if not isinstance(node, dict):
        return False
    if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
        return True
    if node.get("type") == "Metaspace":
        return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
    return any(_prepends_space(v) for v in node.values() if isinstance(v, (list, dict)))


def _pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (its split regex), or "default"."""
    text = json.dumps(tj.get("pre_tokenizer"))
    for name, regex in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
        if json.dumps(regex)[1:-1] in text:
            return name
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"
