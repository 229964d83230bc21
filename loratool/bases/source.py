"""Where a base model comes from: a local path, or a model on the Hugging Face Hub read through
the user's Hugging Face cache.

A BASE argument that names an existing path is that path: a local path always wins over a Hub
id. Anything else of the form ``OWNER/NAME[@REV]`` (checked by huggingface_hub's
``validate_repo_id``) is a model repository on the Hub:

1. its revision is pinned to one commit (``repo_info``), and its top level listed with sizes;
2. its safetensors headers are read with HTTP range requests
   (``HfApi.parse_safetensors_file_metadata``), config.json and the shard index downloaded (a
   few KB): a command checks everything it can from these before any weight is downloaded;
3. only the files the command reads are downloaded, into the Hugging Face cache
   (``HF_HOME`` / ``HF_HUB_CACHE``), where the next command — or transformers — finds them;
   each one's bytes are hashed as it comes down and must be what the listing promised (the LFS
   sha256, else the git blob id) before anything reads it (``hub.download_verified``, as
   ``pull`` checks its files): a mismatch is refused in one line and removed from the cache.
   A later command finds it in the cache filed under that hash and does not hash it again.

What "the files the command reads" are (``need``):

- ``"headers"``: nothing more (``savings --base``);
- ``"weights"``: the safetensors files of the model's layout (``model.safetensors`` or the
  shards an index names), config.json and the index (``unmerge --check``, ``extract``);
- ``"model"``: the weights and the other small top-level files a model folder carries (config,
  tokenizer, generation config, chat template, README, licence), which a merge copies into
  its output: never another copy of the weights in another format (``pytorch_model.bin``,
  ``*.gguf``, ``flax_model.msgpack``, ``*.onnx``…) nor anything in a subfolder.

Library code: no click, no rich. ``progress(nbytes, label)`` is called as bytes arrive.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError, ValidationError
from ..tensors.header import DTYPE_SIZES, PICKLE_SUFFIXES, BaseIndex, TensorInfo

NEEDS = ("headers", "weights", "model")
INDEX_NAMES = ("model.safetensors.index.json",)
SINGLE_NAMES = ("model.safetensors",)
# Top-level files a merge copies beside the weights are small; anything larger that is not
# part of the weight layout is another copy of the weights, whatever its name.
MAX_MODEL_FILE = 64 << 20
# Weights in other formats, never downloaded (a pickle is never opened either).
OTHER_WEIGHTS = frozenset(
    {
        *PICKLE_SUFFIXES,
        ".h5",
        ".msgpack",
        ".onnx",
        ".onnx_data",
        ".gguf",
        ".ot",
        ".tflite",
        ".mlmodel",
        ".pb",
        ".npz",
        ".nemo",
        ".safetensors",  # those of the layout are chosen by name
    }
)

Progress = Callable[[int, "str | None"], None]


@dataclass(frozen=True)
class HubModel:
    """One commit of a model repository, with its top-level files and their sizes."""

    repo_id: str
    revision: str  # as asked (a branch, a tag, a commit); "main" when not given
    commit: str
    files: dict[str, int]  # top-level file name → size in bytes
    weights: tuple[str, ...]  # the safetensors files of the layout
    index: str | None  # the shard index, when sharded
    # top-level file name → its listing entry (huggingface_hub's RepoFile: the LFS sha256 or
    # git blob id every download is checked against)
    entries: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"

    def wanted(self, need: str) -> list[str]:
        """The files a command with this ``need`` downloads, in download order."""
        if need not in NEEDS:
            raise ValueError(f"need must be one of {NEEDS}")
        small = [n for n in ("config.json", self.index) if n and n in self.files]
        if need == "headers":
            return small
        if need == "weights":
            return small + list(self.weights)
        extra = [
            n
            for n, size in sorted(self.files.items())
            if n not in small
            and n not in self.weights
            and not n.startswith(".")
            and Path(n).suffix.lower() not in OTHER_WEIGHTS
            and size <= MAX_MODEL_FILE
        ]
        return small + extra + list(self.weights)

    def skipped(self, need: str) -> list[str]:
        """Top-level files left on the Hub (for the user to know)."""
        keep = set(self.wanted(need))
        return sorted(n for n in self.files if n not in keep and not n.startswith("."))


@dataclass
class BaseSource:
    """A base as a command uses it: ``path`` on this machine (for a Hub model, its snapshot in
    the Hugging Face cache), and ``hub`` when it came from the Hub."""

    spec: str
    path: Path
    hub: HubModel | None = None
    files: tuple[str, ...] = ()  # what was downloaded (a Hub model), by name
    skipped: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.hub.label if self.hub else self.spec


def looks_like_hub_id(spec: str) -> bool:
    """``OWNER/NAME`` or ``OWNER/NAME@REV`` as huggingface_hub accepts a repo id (no network)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id, _, _rev = str(spec).partition("@")
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def is_local(spec: str | os.PathLike) -> bool:
    return os.path.lexists(os.fspath(spec))


def locate(spec: str, *, token: str | None = None) -> HubModel:
    """Pin a Hub model to one commit and list its top level (two small requests)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    from ..hub import _hub_errors, parse_repo_spec, resolved_commit

    repo_id, revision = parse_repo_spec(spec)
    revision = revision or "main"
    api = HfApi(token=token)
    label = repo_id if revision == "main" else f"{repo_id}@{revision}"
    with _hub_errors(label, api.endpoint, token):
        commit = resolved_commit(api, repo_id, revision, label)
        files: dict[str, int] = {}
        entries: dict[str, RepoFile] = {}
        for entry in api.list_repo_tree(repo_id, revision=commit, recursive=False):
            if isinstance(entry, RepoFile) and isinstance(entry.size, int) and entry.size >= 0:
                if "/" not in entry.path and ".." not in entry.path:
                    files[entry.path] = entry.size
                    entries[entry.path] = entry
    hub = _layout(repo_id, revision, commit, files, entries, label, token)
    return hub


def _layout(repo_id, revision, commit, files, entries, label, token) -> HubModel:
    """The weight files of the layout read_base would read in a folder holding these files
    (the index first, then model.safetensors, then a single *.safetensors); config.json and
    the index are downloaded (they are small, and the index names the shards)."""
    import json

    if "model_index.json" in files:
        raise ValidationError(
            "is a diffusers pipeline: a Hub base is read as one model",
            file=label,
            hint=f"download it (`hf download {repo_id}`) and give the folder",
        )
    index = next((n for n in INDEX_NAMES if n in files), None)
    hub = HubModel(repo_id, revision, commit, files, (), index, entries)
    for name in hub.wanted("headers"):
        _download(hub, name, token, None)
    if index is not None:
        where = f"{label}: {index}"
        try:
            doc = json.loads((snapshot_dir(hub) / index).read_text())
            weight_map = doc["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FormatError("not a valid index: needs a weight_map object", file=where) from exc
        names: list[str] = []
        for fname in weight_map.values():
            if not isinstance(fname, str) or fname not in files:
                raise FormatError(
                    f"weight_map names a shard the repository does not hold at its top level: "
                    f"{fname!r}",
                    file=where,
                )
            if fname not in names:
                names.append(fname)
        weights: tuple[str, ...] = tuple(names)
    else:
        single = next((n for n in SINGLE_NAMES if n in files), None)
        found = [n for n in files if n.endswith(".safetensors")]
        if single is None and len(found) == 1:
            single = found[0]
        if single is None:
            pickles = sorted(n for n in files if Path(n).suffix.lower() in PICKLE_SUFFIXES)
            raise FormatError(
                "holds no model.safetensors, no model.safetensors.index.json and not one "
                "*.safetensors at its top level"
                + (f" (only pickle checkpoints: {', '.join(pickles[:3])})" if pickles else ""),
                file=f"{label} ({commit[:12]})",
                hint="loratool reads safetensors bases only",
            )
        weights = (single,)
    return HubModel(repo_id, revision, commit, files, weights, index, entries)


def snapshot_dir(hub: HubModel) -> Path:
    """Where the Hugging Face cache keeps this commit's files."""
    from huggingface_hub import constants as hf_constants

    folder = "models--" + hub.repo_id.replace("/", "--")
    return Path(hf_constants.HF_HUB_CACHE) / folder / "snapshots" / hub.commit


def _download(hub: HubModel, name: str, token, progress: Progress | None) -> Path:
    """One file of the pinned commit, downloaded into the cache unless it is there, its bytes
    checked against the hash the listing promised before anyone reads it (``hub.download_
    verified``: a mismatch is refused in one line and removed from the cache)."""
    from ..hub import download_verified, progress_tqdm

    return download_verified(
        hub.repo_id,
        hub.entries[name],
        commit=hub.commit,
        label=hub.label,
        token=token,
        tqdm_class=progress_tqdm(progress, f"{hub.repo_id}: {name}"),
    )


def remote_index(hub: HubModel, *, token: str | None = None) -> BaseIndex:
    """The base's tensors from its safetensors headers on the Hub: range requests of a few KB
    per file, no weight downloaded. The files are named where the cache will put them once
    downloaded; byte offsets are relative to each file's data section (the header's length is
    known only once the file is here), which is all that names, shapes and sizes need."""
    import json

    from huggingface_hub import HfApi

    from ..hub import _hub_errors

    snap = snapshot_dir(hub)
    index_meta: dict = {}
    if hub.index is not None:
        try:
            index_meta = json.loads((snap / hub.index).read_text()).get("metadata") or {}
        except (OSError, ValueError, AttributeError):
            index_meta = {}
    api = HfApi(token=token)
    tensors: dict[str, TensorInfo] = {}
    file_meta: dict[Path, dict[str, str]] = {}
    with _hub_errors(hub.label, api.endpoint, token):
        for fname in hub.weights:
            meta = api.parse_safetensors_file_metadata(hub.repo_id, fname, revision=hub.commit)
            path = snap / fname
            file_meta[path] = {
                str(k): str(v) for k, v in (meta.metadata or {}).items() if isinstance(v, str)
            }
            for name, info in meta.tensors.items():
                if name in tensors:
                    raise FormatError(
                        "tensor stored in two files", file=f"{hub.label}: {fname}", tensor=name
                    )
                tensors[name] = _tensor_info(hub, fname, path, name, info)
    files = tuple(snap / f for f in hub.weights)
    index_path = snap / hub.index if hub.index else None
    return BaseIndex(snap, files, tensors, index_path, index_meta, file_meta)


def _tensor_info(hub: HubModel, fname: str, path: Path, name: str, info) -> TensorInfo:
    where = f"{hub.label}: {fname}"
    size = DTYPE_SIZES.get(info.dtype)
    shape = info.shape
    begin, end = (list(info.data_offsets) + [None, None])[:2]
    if (
        size is None
        or not isinstance(shape, list)
        or not all(isinstance(d, int) and d >= 0 for d in shape)
        or not isinstance(begin, int)
        or not isinstance(end, int)
    ):
        raise FormatError(f"unreadable entry (dtype {info.dtype!r})", file=where, tensor=name)
    n = size
    for d in shape:
        n *= d
    if end - begin != n:
        raise FormatError(
            f"offsets span {end - begin} bytes, shape × dtype needs {n}", file=where, tensor=name
        )
    return TensorInfo(name, info.dtype, tuple(shape), path, begin, end)


@dataclass
class RemoteBase:
    """A Hub model known from its headers, not yet downloaded: ``index`` names every tensor
    with its shape and dtype, ``fetch`` downloads what a command needs."""

    spec: str
    hub: HubModel
    index: BaseIndex
    token: str | None = None

    def missing_bytes(self, need: str) -> int:
        """What ``fetch(need)`` would download (files already in the cache are not)."""
        snap = snapshot_dir(self.hub)
        return sum(self.hub.files[n] for n in self.hub.wanted(need) if not (snap / n).exists())

    def fetch(self, need: str = "model", progress: Progress | None = None) -> BaseSource:
        wanted = self.hub.wanted(need)
        _check_cache_space(self.hub, self.missing_bytes(need))
        for name in wanted:
            _download(self.hub, name, self.token, progress)
        return BaseSource(
            self.spec, snapshot_dir(self.hub), self.hub, tuple(wanted), self.hub.skipped(need)
        )


def remote_base(spec: str, *, token: str | None = None) -> RemoteBase:
    """A Hub id's model, pinned to one commit and described from its headers (config.json and
    the shard index downloaded: they are small); nothing else downloaded yet."""
    hub = _hub_model(spec, token)
    return RemoteBase(spec, hub, remote_index(hub, token=token), token)


def open_base(
    spec: str,
    *,
    need: str = "model",
    progress: Progress | None = None,
    before_download: Callable[[BaseIndex], object] | None = None,
    token: str | None = None,
) -> BaseSource:
    """The base ``spec`` names, on this machine: a local path as it is (a path that exists
    always wins), else a Hub model with the files ``need`` names downloaded into the cache;
    ``before_download`` sees its headers first and may refuse by raising."""
    if is_local(spec):
        return BaseSource(spec, Path(spec))
    remote = remote_base(spec, token=token)
    if before_download is not None:
        before_download(remote.index)
    return remote.fetch(need, progress)


def read_any(spec: str, *, token: str | None = None) -> BaseIndex:
    """A base's index from headers alone: ``read_base`` for a local path, range requests for a
    Hub model (no weight is downloaded)."""
    if is_local(spec):
        from ..tensors.header import read_base

        return read_base(spec)
    return remote_index(_hub_model(spec, token), token=token)


def _hub_model(spec: str, token) -> HubModel:
    if not looks_like_hub_id(spec):
        raise ValidationError(
            "no such file or directory, and not a Hub model id",
            file=spec,
            hint="give a model folder, a .safetensors file or OWNER/NAME[@REVISION]",
        )
    return locate(spec, token=token)


def _check_cache_space(hub: HubModel, need: int) -> None:
    parent = snapshot_dir(hub)
    while not parent.exists():
        parent = parent.parent
    st = os.statvfs(parent)
    free = st.f_bavail * st.f_frsize
    if need > free:
        from ..units import human_size

        raise ValidationError(
            f"downloading it needs {human_size(need)} in the Hugging Face cache, but only "
            f"{human_size(free)} is free there",
            file=hub.label,
            hint="free some space, or point HF_HUB_CACHE elsewhere",
        )
