"""Hugging Face Hub ids in recipes: `org/name` or `org/name@revision`, fetched with huggingface_hub.

A model is fetched in two steps so a recipe is checked before any weight is downloaded: first its
small files (`METADATA_FILES`: config.json, the safetensors index, the tokenizer side files), for
every Hub model of the recipe; then the safetensors the index lists (every top-level `*.safetensors`
without an index). A LoRA adapter (`BASE+ADAPTER` in a recipe) is its config and safetensors weights
(`ADAPTER_FILES`). Nothing else is ever requested: no `.bin`, `.pt` or other pickle, no README.

The files land in the normal Hugging Face cache (HF_HOME / HF_HUB_CACHE); the untrusted-file checks of
`formats/files.py` apply to the snapshot as to any model directory. huggingface_hub reads HF_TOKEN (gated
and private repos), HF_ENDPOINT and HF_HUB_OFFLINE (the cache only) itself. Every failure is a
ModelError naming the YAML key and the repo id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from .adapters.read import CONFIG_FILE, MLX_WEIGHTS, PEFT_WEIGHTS
from .errors import ModelError, short_repr
from .formats.base import ModelSource, TensorInfo
from .formats.files import SIDE_FILES, read_config, read_json

INDEX_FILE = "model.safetensors.index.json"
METADATA_FILES = ("config.json", INDEX_FILE, *SIDE_FILES)
GLOB_CHARACTERS = "*?[]"
ADAPTER_FILES = (CONFIG_FILE, PEFT_WEIGHTS, MLX_WEIGHTS)
# whether weight downloads show a progress bar; the commands set it from --no-progress, the API
# from MergeOptions.progress (see download_progress)
_PROGRESS: ContextVar[bool] = ContextVar("mergekit_mlx_download_progress", default=True)


@contextmanager
def download_progress(enabled: bool) -> Iterator[None]:
    """Within the block, Hub weight downloads show a progress bar only if `enabled`."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


@dataclass(frozen=True)
class HubId:
    repo_id: str  # "org/name"
    revision: str | None  # a branch, tag or commit; None for the default branch

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(ref: str) -> HubId | None:
    """`org/name` or `org/name@revision` with the characters the Hub allows; None for anything else."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, at, revision = ref.partition("@")
    if repo_id.count("/") != 1 or (at and not revision.strip()):
        return None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return HubId(repo_id, revision or None)


def fetch_model(hub_id: HubId, where: str, *, weights: bool = True) -> Path:
    """The cache snapshot of a Hub model, holding its `METADATA_FILES` and, with weights, its safetensors."""
    snapshot = _download(hub_id, where, list(METADATA_FILES), progress=False)
    files = _weight_files(snapshot, hub_id, where)  # a bad index stops the run before any download
    if not weights:
        return snapshot
    # the commit the small files came from, so the weights match the config that was checked (a
    # snapshot folder is named by its commit; one that is not a commit hash is left to the revision)
    pinned = HubId(hub_id.repo_id, snapshot.name) if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else hub_id
    snapshot = _download(pinned, where, [*METADATA_FILES, *files], progress=_PROGRESS.get())
    if not any(snapshot.glob("*.safetensors")):
        raise ModelError(
            f"{where}: Hub repo {str(hub_id)!r} has no safetensors weights; only safetensors are downloaded "
            "(pickle checkpoints, .bin or .pt, never are: unpickling can run code)"
        )
    return snapshot


def fetch_adapter(hub_id: HubId, where: str) -> Path:
    """The cache snapshot of a Hub LoRA adapter: its config and its safetensors weights (PEFT's or
    mlx-lm's file name), nothing else; an adapter is small, so it is fetched whole when the recipe is
    checked, before any model weight."""
    return _download(hub_id, where, list(ADAPTER_FILES), progress=False)


def index_only_model(path: Path) -> ModelSource:
    """A model known from its config and index alone, before its weights are downloaded: its tensor
    names and layer count, not their shapes (`info` says so if asked)."""
    return _IndexOnlyModel(path)


class _IndexOnlyModel(ModelSource):
    def __init__(self, path: Path):
        names = list(_weight_map(path)) if os.path.lexists(path / INDEX_FILE) else []
        super().__init__(path, read_config(path), dict.fromkeys(names))  # type: ignore[arg-type]

    def info(self, name: str) -> TensorInfo:
        raise ModelError(f"{self.path}: the shape of {name!r} is known only once the weights are downloaded")


def _weight_map(snapshot: Path) -> dict:
    data = read_json(snapshot, INDEX_FILE, "the index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{snapshot / INDEX_FILE}: needs a non-empty 'weight_map' object")
    return weight_map


def _weight_files(snapshot: Path, hub_id: HubId, where: str) -> list[str]:
    """The safetensors to download: those the index lists, each a plain file name (never a pattern
    that could match a pickle), or every top-level `*.safetensors` when there is no index."""
    if not os.path.lexists(snapshot / INDEX_FILE):
        return ["*.safetensors"]
    files = set()
    for name, fname in _weight_map(snapshot).items():
        if not isinstance(fname, str) or not fname.endswith(".safetensors") or any(c in fname for c in "/\\\0" + GLOB_CHARACTERS):
            raise ModelError(
                f"{where}: the index of Hub repo {str(hub_id)!r} lists {short_repr(fname)} for {short_repr(name)}; "
                "a weight file must be a plain *.safetensors name"
            )
        files.add(fname)
    return sorted(files)


def _download(hub_id: HubId, where: str, patterns: list[str], progress: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import logging as hf_logging

    shown = repr(str(hub_id))
    # the client's own warnings (each retry of a failing read) would come before, and apart from, the
    # one paragraph a failure ends with; they are kept to errors while it runs
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return Path(
            snapshot_download(
                hub_id.repo_id,
                revision=hub_id.revision,
                allow_patterns=patterns,
                ignore_patterns=["*/*"],  # only the top level of the repo is read
                tqdm_class=None if progress else _silent_tqdm(),
            )
        )
    except GatedRepoError:
        raise ModelError(
            f"{where}: Hub repo {shown} is gated: accept its licence on its page on the Hub and set HF_TOKEN "
            "to a token of that account"
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"{where}: Hub repo {hub_id.repo_id!r} has no revision {hub_id.revision!r}") from None
    except RepositoryNotFoundError:  # the Hub answers 401 for a private repo as for a missing one
        raise ModelError(
            f"{where}: model {shown} is neither a local path nor a Hub repo that can be read; if it is private or "
            "gated, set HF_TOKEN to a token with access (and accept its licence on the Hub)"
        ) from None
    except LocalEntryNotFoundError as e:  # offline, or the Hub cannot be reached, and not (all) in the cache
        if constants.is_offline_mode():
            raise ModelError(
                f"{where}: Hub model {shown} is not (completely) in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; unset HF_HUB_OFFLINE to download it"
            ) from None
        raise ModelError(
            f"{where}: cannot download Hub model {shown} from {constants.ENDPOINT}, and it is not in the local "
            f"cache: {short_repr(str(e).splitlines()[0], 300)}"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = "; set HF_TOKEN to a token with access" if status in (401, 403) else ""
        raise ModelError(
            f"{where}: downloading Hub model {shown} failed ({short_repr(str(e).splitlines()[0], 300)}){hint}"
        ) from None
    except Exception as e:
        if not _network_error(e):
            raise
        raise ModelError(
            f"{where}: downloading Hub model {shown} from {constants.ENDPOINT} failed: {type(e).__name__}: "
            f"{short_repr(str(e).splitlines()[0] if str(e) else 'no answer', 300)}. The files downloaded so far stay in "
            "the Hugging Face cache: the same command run again continues from them (HF_HUB_DOWNLOAD_TIMEOUT sets "
            "the seconds a read may wait)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _network_error(e: BaseException) -> bool:
    """A failure of the connection itself (a timeout mid-download, a reset, a refused connection), from
    whichever HTTP client huggingface_hub uses (httpx and its successors, requests, urllib3)."""
    if isinstance(e, (OSError, TimeoutError)):
        return True
    return any(c.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3") for c in type(e).__mro__)


def _silent_tqdm() -> type:
    """A progress bar class that shows nothing: the small files need none."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent
