"""The output tokenizer and the vocabulary rows of embeddings and heads, as mergekit 0.1.5 builds them.

`tokenizer_source` (or the `tokenizer:` block's `source`) picks the output vocabulary:
  base      the base model's tokenizer (the first model's when there is no base), without tokens
            whose id is at or past its config's vocab_size
  union     the base tokenizer plus every other model's tokens (within its vocab_size), added in
            recipe order as added tokens; added tokens keep the first settings seen
  <model>   that model's tokenizer as it is
Tokens named under `tokenizer.tokens` are added when missing. Every vocabulary tensor of every input
is then rebuilt row by row in the output order: a model's own row where it has the token; otherwise
(or when the token's entry says `force`) a default row: the token's configured source, else the one
model that has it, else the base's row, else the mean over the models that have it, else zeros.
With `pad_to_multiple_of` the extra rows are each model's mean row. Without a tokenizer setting,
vocabulary tensors of different sizes are an error, as in mergekit (see `rectify_embeddings`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .chat_template import apply_chat_template, read_chat_template
from .errors import ModelError, RecipeError
from .formats.files import TOKENIZER_FILES, copy_side_files

LOG = logging.getLogger(__name__)

# tensors whose axis 0 is the vocabulary (the names mergekit's architecture tables mark so)
_VOCAB_NAME = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_out|tok_embeddings|word_embeddings|wte|lm_head|output|output_layer"
    r"|vocab_projector|shared|embeddings)(\.(decoder|linear))?\.(weight|bias)$"
    r"|(^|\.)cls\.predictions\.(bias|decoder\.weight)$"
)
_NOT_VOCAB = re.compile(r"(position|token_type|wpe)")


def is_vocab_tensor(name: str) -> bool:
    """True for token embeddings and output heads (rows indexed by token id)."""
    if _NOT_VOCAB.search(name):
        return False
    return bool(_VOCAB_NAME.search(name))


# ---- vocabulary sizes without a tokenizer setting --------------------------------------------


def rectify_embeddings(name: str, tensors: list[mx.array], base: int | None, truncate: bool = False) -> list[mx.array]:
    """Vocabulary tensors of different sizes with no tokenizer setting: mergekit 0.1.5 refuses them.

    With truncate (mergekit's --unsafe-truncate-embeddings) every tensor keeps the first rows they
    all have, which is only right when the shared ids mean the same tokens.
    """
    shapes = [tuple(t.shape) for t in tensors]
    if len({s[1:] for s in shapes}) > 1:
        raise ModelError(f"tensor {name}: shapes {shapes} differ beyond the vocabulary axis; these models cannot be merged")
    if len(set(shapes)) == 1:
        return tensors
    if not truncate:
        raise ModelError(
            f"tensor {name}: vocabulary sizes differ between models ({', '.join(str(s[0]) for s in shapes)} rows). "
            "Set `tokenizer_source: base` (or `union`, or a `tokenizer:` block) so rows are matched by token; "
            "truncating to the common rows is only safe when the shared ids mean the same tokens"
        )
    rows = min(s[0] for s in shapes)
    LOG.warning("tensor %s: keeping the first %d rows of every input (%s); ids past them are dropped", name, rows, shapes)
    return [t[:rows] for t in tensors]


# ---- per-token embedding sources -------------------------------------------------------------


@dataclass(frozen=True)
class RowSource:
    """Where a token's default row comes from (mergekit's TokenEmbeddingConfig)."""

    kind: str  # "model" (that model's row of this token), "model_token" (a given row), "zero", "auto"
    model: int | None = None  # index into the sources
    token_id: int | None = None
    token: str | None = None
    force: bool = False  # use the default row even for models that have the token


def _parse_token_sources(tokens: dict | None, model_index) -> dict[str, RowSource]:
    out: dict[str, RowSource] = {}
    for tok, cfg in (tokens or {}).items():
        where = f"tokenizer.tokens[{tok!r}]"
        if cfg is None:
            cfg = {}
        if hasattr(cfg, "model_dump"):
            cfg = cfg.model_dump(exclude_none=True)
        if not isinstance(cfg, dict):
            raise RecipeError(f"{where}: must be a mapping with 'source' (and optionally 'force')")
        unknown = set(cfg) - {"source", "force"}
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; valid: source, force")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{where}.force: must be true or false, got {force!r}")
        src = cfg.get("source")
        if src is None:
            out[tok] = RowSource("auto", force=force)
        elif isinstance(src, str):
            out[tok] = RowSource("model", model=model_index(src, f"{where}.source"), force=force)
        elif isinstance(src, dict) and src.get("kind") == "zero":
            if set(src) != {"kind"}:
                raise RecipeError(f"{where}.source: a 'kind: zero' source takes no other keys")
            out[tok] = RowSource("zero", force=force)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            unknown = set(src) - {"kind", "model", "token_id", "token"}
            if unknown:
                raise RecipeError(f"{where}.source: unknown key(s) {sorted(unknown)}; valid: model, token_id, token")
            if (src.get("token_id") is None) == (src.get("token") is None):
                raise RecipeError(f"{where}.source: give exactly one of token_id or token")
            if "model" not in src:
                raise RecipeError(f"{where}.source: 'kind: model_token' needs a 'model'")
            tid = src.get("token_id")
            if tid is not None and (not isinstance(tid, int) or isinstance(tid, bool) or tid < 0):
                raise RecipeError(f"{where}.source.token_id: must be a non-negative integer, got {tid!r}")
            out[tok] = RowSource(
                "model_token",
                model=model_index(src["model"], f"{where}.source.model"),
                token_id=tid,
                token=src.get("token"),
                force=force,
            )
        else:
            raise RecipeError(
                f"{where}.source: must be a model, {{kind: zero}} or {{kind: model_token, model: ..., token_id|token: ...}}"
            )
    return out


# ---- building the output tokenizer -----------------------------------------------------------


def config_vocab_size(config: dict) -> int | None:
    for cfg in (config, config.get("text_config") if isinstance(config.get("text_config"), dict) else {}):
        for key in ("vocab_size", "padded_vocab_size", "n_vocab"):
            if isinstance(cfg.get(key), int) and not isinstance(cfg.get(key), bool):
                return cfg[key]
    return None


def _load_tokenizer(path: Path, where: str):
    """A transformers tokenizer built from the checked tokenizer files of `path` only.

    They are copied (each checked as it is opened, `models.copy_side_files`) into a private
    directory first, so the loader never opens a file of the input that was not checked, whatever
    other names it looks for.
    """
    import tempfile

    from transformers import AutoTokenizer

    read_chat_template(path)  # a template that is not UTF-8 is an error naming its file, not the loader's
    with tempfile.TemporaryDirectory(prefix="mergekit-mlx-tokenizer-") as tmp:
        copy_side_files(path, Path(tmp), TOKENIZER_FILES + ("config.json",))
        try:
            return AutoTokenizer.from_pretrained(tmp, use_fast=True)
        except Exception as e:  # transformers raises many kinds of errors for a bad directory
            raise ModelError(f"{path}: cannot load the tokenizer for {where} ({type(e).__name__}: {e})") from None


def _stripped_tokenizer(path: Path, vocab_size: int | None):
    """The tokenizer without tokens whose id is >= the model's vocab_size (BPE only, as mergekit)."""
    import tokenizers

    tok = _load_tokenizer(path, "the base model")
    vocab = tok.get_vocab()
    limit = vocab_size if vocab_size is not None else len(vocab)
    unused = {t for t, i in vocab.items() if i >= limit}
    if not unused:
        return tok
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{path}: the tokenizer has ids past vocab_size {limit} and no fast version to strip them from")
    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise ModelError(
            f"{path}: the tokenizer has ids past vocab_size {limit} and is {data['model']['type']}; "
            "only BPE tokenizers can be stripped for a tokenizer merge"
        )
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < limit]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge) -> bool:
        # mergekit checks only the two parts; a merge producing a dropped token must go too
        pair = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in pair) and "".join(pair) not in unused

    data["model"]["merges"] = [m for m in data["model"].get("merges", []) if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _union_tokenizer(base_tok, toks: list[tuple[Any, int | None]]):
    """base_tok plus the tokens of every (tokenizer, vocab_size) in order, as added tokens."""
    import tempfile

    from transformers import AutoTokenizer

    out_vocab: dict[str, None] = {}
    out_added: dict[str, Any] = {}
    for tok, vocab_size in toks:
        limit = vocab_size if vocab_size is not None else tok.vocab_size
        added = tok.added_tokens_decoder
        added_contents = {a.content for a in added.values()}
        for t, i in tok.get_vocab().items():
            if i < limit and t not in added_contents:
                out_vocab.setdefault(t)
        for i, info in added.items():
            if i < limit and info.content not in out_added:
                out_added[info.content] = info
    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the base tokenizer object stays as it was
        base_tok.save_pretrained(tmp)
        res = AutoTokenizer.from_pretrained(tmp, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in out_added and t not in base_vocab:
            res.add_tokens(t)
    for info in out_added.values():
        res.add_tokens(info)
    return res


@dataclass
class VocabPlan:
    """The output vocabulary and, per input model, where each output row comes from."""

    vocab_size: int  # rows of every aligned vocabulary tensor (pad_to_multiple_of applied)
    token_rows: int  # rows before padding: the number of token ids
    tokenizer: Any  # the output tokenizer (a transformers tokenizer)
    vocab: dict[str, int]  # output token -> output id
    permutations: list[np.ndarray]  # per source: output id -> that model's row, -1 where it lacks the token
    original_vocabs: list[dict[str, int] | None]  # per source: its own token -> id
    token_sources: dict[str, RowSource]
    base: int | None
    chat_template: str | None = None
    sources: Sequence[Any] = field(default_factory=list)

    def is_vocab_tensor(self, name: str) -> bool:
        return is_vocab_tensor(name)

    def update_config(self, config: dict) -> None:
        """Set the output config's vocabulary size (nested for multimodal configs)."""
        target = config
        if "vocab_size" not in config and isinstance(config.get("text_config"), dict):
            target = config["text_config"]
        target["vocab_size"] = self.vocab_size

    def save(self, out_dir: Path) -> None:
        """Write the tokenizer files (and the recipe's chat template) into out_dir."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(out_dir))
        apply_chat_template(out_dir, self.chat_template, self.sources)

    def align(self, name: str, tensors: list[mx.array], input_ids: list[int]) -> list[mx.array]:
        """Each input's rows rearranged into the output vocabulary (input_ids index the sources)."""
        shapes = [tuple(t.shape) for t in tensors]
        if any(len(s) == 0 for s in shapes) or len({s[1:] for s in shapes}) > 1:
            raise ModelError(f"tensor {name}: shapes {shapes} differ beyond the vocabulary axis; cannot align them")
        n_tok = self.token_rows
        rows_out = self.vocab_size
        k = len(tensors)
        perms = np.full((k, rows_out), -1, dtype=np.int64)
        for j, (m, t) in enumerate(zip(input_ids, tensors)):
            p = self.permutations[m][:rows_out]
            perms[j, : len(p)] = np.where(p < t.shape[0], p, -1)
        present = perms >= 0
        token_of = np.full(rows_out, None, dtype=object)
        for tok, i in self.vocab.items():
            token_of[i] = tok
        is_token = np.array([t is not None for t in token_of], dtype=bool)
        forced = np.zeros(rows_out, dtype=bool)
        for tok, src in self.token_sources.items():
            if src.force and tok in self.vocab:
                forced[self.vocab[tok]] = True

        identity = np.arange(rows_out)
        if (
            not forced.any()
            and is_token.all()
            and rows_out == n_tok
            and all(t.shape[0] == rows_out and (perms[j] == identity).all() for j, t in enumerate(tensors))
        ):
            return tensors  # every model already has every token at its output id

        needs_default = is_token & (forced | ~present.all(axis=0))
        default_ids = np.nonzero(needs_default)[0]
        coef = np.zeros((k, len(default_ids)), dtype=np.float32)
        rows = np.zeros((k, len(default_ids)), dtype=np.int64)
        base_pos = input_ids.index(self.base) if self.base is not None and self.base in input_ids else None
        for d, i in enumerate(default_ids):
            tok = token_of[i]
            src = self.token_sources.get(tok)
            have = np.nonzero(present[:, i])[0]
            if src is None or src.kind == "auto":
                if len(have) == 1:
                    src = RowSource("model", model=input_ids[have[0]])
                elif len(have) == 0:
                    LOG.warning("token %r is in no model; its %s row is zero", tok, name)
                    src = RowSource("zero")
                elif base_pos is not None and present[base_pos, i]:
                    src = RowSource("model", model=self.base)
                else:
                    coef[have, d] = 1.0 / len(have)
                    rows[have, d] = perms[have, i]
                    continue
            if src.kind == "zero":
                continue
            if src.model not in input_ids:
                raise ModelError(
                    f"tensor {name}: token {tok!r} takes its row from {self._label(src.model)}, "
                    "which does not contribute this tensor"
                )
            j = input_ids.index(src.model)
            if src.kind == "model":
                if perms[j, i] < 0:
                    raise ModelError(f"tensor {name}: token {tok!r} is not in {self._label(src.model)}, its configured source")
                row = perms[j, i]
            else:
                row = src.token_id
                if row is None:
                    vocab = self.original_vocabs[src.model] or {}
                    if src.token not in vocab:
                        raise RecipeError(
                            f"tokenizer.tokens[{tok!r}].source.token: {src.token!r} is not in {self._label(src.model)}"
                        )
                    row = vocab[src.token]
                if not 0 <= row < tensors[j].shape[0]:
                    raise RecipeError(
                        f"tokenizer.tokens[{tok!r}].source.token_id: {row} is out of range for {self._label(src.model)} "
                        f"({tensors[j].shape[0]} rows in {name})"
                    )
            coef[j, d] = 1.0
            rows[j, d] = row

        inner = tensors[0].shape[1:]
        defaults = None
        if len(default_ids):
            defaults = mx.zeros((len(default_ids),) + tuple(inner), dtype=mx.float32)
            for j, t in enumerate(tensors):
                if coef[j].any():
                    c = mx.array(coef[j]).reshape((-1,) + (1,) * len(inner))
                    defaults = defaults + c * mx.take(t, mx.array(rows[j]), axis=0).astype(mx.float32)
        slot = np.full(rows_out, -1, dtype=np.int64)
        slot[default_ids] = np.arange(len(default_ids))

        out = []
        for j, t in enumerate(tensors):
            n = t.shape[0]
            zero_row = n + len(default_ids)
            own = present[j] & ~forced & is_token
            index = np.where(own, perms[j], np.where(slot >= 0, n + slot, zero_row))
            parts = [t]
            if defaults is not None:
                parts.append(defaults.astype(t.dtype))
            parts.append(mx.zeros((1,) + tuple(inner), dtype=t.dtype))
            aligned = mx.take(mx.concatenate(parts, axis=0), mx.array(index[:n_tok]), axis=0)
            if rows_out > n_tok:
                # padding rows: the mean row (https://nlp.stanford.edu/~johnhew/vocab-expansion.html)
                mean = mx.mean(aligned.astype(mx.float32), axis=0, keepdims=True).astype(t.dtype)
                aligned = mx.concatenate([aligned, mx.broadcast_to(mean, (rows_out - n_tok,) + tuple(inner))], axis=0)
            out.append(aligned)
        return out

    def _label(self, model: int | None) -> str:
        if model is not None and model < len(self.sources):
            return f"model {self.sources[model].path}"
        return f"model #{model}"


# ---- planning --------------------------------------------------------------------------------

_CACHE: dict[tuple, VocabPlan] = {}


def plan_vocab(recipe, sources: list, base: int | None) -> VocabPlan | None:
    """The output vocabulary for a recipe, or None when it sets no tokenizer_source / tokenizer block."""
    block = recipe.tokenizer
    if block is None and recipe.tokenizer_source is None:
        return None
    key = (recipe.model_dump_json(), tuple(str(s.path) for s in sources), base)
    if key not in _CACHE:
        if len(_CACHE) > 4:
            _CACHE.clear()
        _CACHE[key] = _build(recipe, sources, base)
    return _CACHE[key]


def _build(recipe, sources: list, base: int | None) -> VocabPlan:
    block = recipe.tokenizer
    if block is not None:
        source = getattr(block, "source", None) if not isinstance(block, dict) else block.get("source")
        tokens = getattr(block, "tokens", None) if not isinstance(block, dict) else block.get("tokens")
        pad = getattr(block, "pad_to_multiple_of", None) if not isinstance(block, dict) else block.get("pad_to_multiple_of")
        where = "tokenizer.source"
    else:
        source, tokens, pad = recipe.tokenizer_source, None, None
        where = "tokenizer_source"
    source = source or "union"
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeError(f"tokenizer.pad_to_multiple_of: must be a positive integer, got {pad!r}")
    refs = recipe.referenced_models()
    model_index = _model_indexer(refs, sources)
    token_sources = _parse_token_sources(tokens, model_index)

    base_index = base if base is not None else 0
    sizes = [config_vocab_size(s.config) for s in sources]
    base_dir = sources[base_index].tokenizer_dir
    if base_dir is None:
        raise ModelError(f"{sources[base_index].path}: has no tokenizer files, which {where} needs")
    base_tok = _stripped_tokenizer(base_dir, sizes[base_index])

    toks: list[Any | None] = []
    for i, s in enumerate(sources):
        if i == base_index:
            toks.append(base_tok)
            continue
        try:
            if s.tokenizer_dir is None:
                raise ModelError(f"{s.path}: no tokenizer files")
            toks.append(_load_tokenizer(s.tokenizer_dir, str(s.path)))
        except ModelError as e:
            LOG.warning("%s; assuming it shares the tokenizer of %s", e, sources[base_index].path)
            toks.append(None)

    if isinstance(source, dict):
        source = source.get("model") or source.get("path")
    if source == "base":
        out_tok = base_tok
    elif source == "union":
        order = [base_index] + [i for i in range(len(sources)) if i != base_index]
        out_tok = _union_tokenizer(base_tok, [(toks[i], sizes[i]) for i in order if toks[i] is not None])
    elif isinstance(source, str):
        i = _try_index(model_index, source)
        if i is not None:
            if toks[i] is None:
                raise ModelError(f"{where}: {source!r} has no loadable tokenizer")
            out_tok = toks[i]
        else:
            path = Path(source).expanduser()
            if not path.is_dir():
                raise RecipeError(
                    f"{where}: {source!r} is not 'base', 'union', one of the recipe's models, or a tokenizer directory"
                )
            out_tok = _load_tokenizer(path, where)
    else:
        raise RecipeError(f"{where}: must be 'base', 'union' or a model, got {source!r}")

    existing = set(out_tok.get_vocab())
    for tok in token_sources:
        if tok not in existing:
            out_tok.add_tokens(tok)
            existing.add(tok)
    vocab = dict(out_tok.get_vocab())
    n_tok = len(vocab)
    token_rows = rows = max(n_tok, max(vocab.values(), default=-1) + 1)
    if pad and rows % pad:
        rows = (rows // pad + 1) * pad

    permutations = []
    original_vocabs = []
    for i in range(len(sources)):
        own = (toks[i] if toks[i] is not None else base_tok).get_vocab()
        original_vocabs.append(own)
        limit = sizes[i] if sizes[i] is not None else len(own)
        p = np.full(rows, -1, dtype=np.int64)
        for tok, new_id in vocab.items():
            old = own.get(tok)
            if old is not None and old < limit:
                p[new_id] = old
        permutations.append(p)

    return VocabPlan(
        vocab_size=rows,
        token_rows=token_rows,
        tokenizer=out_tok,
        vocab=vocab,
        permutations=permutations,
        original_vocabs=original_vocabs,
        token_sources=token_sources,
        base=base,
        chat_template=recipe.chat_template,
        sources=sources,
    )


def _model_indexer(refs: list[str], sources: list):
    resolved = []
    for s in sources:
        try:
            resolved.append(Path(s.path).resolve())
        except OSError:
            resolved.append(None)

    def index(ref: Any, where: str) -> int:
        i = _lookup(ref)
        if i is None:
            raise RecipeError(f"{where}: {ref!r} is not one of the recipe's models ({', '.join(refs)})")
        return i

    def _lookup(ref: Any) -> int | None:
        if isinstance(ref, dict):
            ref = ref.get("model") or ref.get("path")
        if not isinstance(ref, str):
            return None
        if ref in refs and len(refs) == len(sources):
            return refs.index(ref)
        try:
            p = Path(ref).expanduser().resolve()
        except OSError:
            return None
        return resolved.index(p) if p in resolved else None

    index.lookup = _lookup
    return index


def _try_index(model_index, ref: str) -> int | None:
    return model_index.lookup(ref)
