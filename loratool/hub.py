"""Publishing a folder to the Hugging Face Hub and fetching adapter files from it.

Library functions only: no click, no rich, nothing printed. huggingface_hub is imported inside
the functions, so importing loratool stays fast. The endpoint is huggingface_hub's own
(``HF_ENDPOINT``); the token is the one given, else huggingface_hub's resolution (``HF_TOKEN``,
then the login stored by ``hf auth login``). A token is never put in a message, a log or a file.

Every failure of the Hub, the network or the client library comes out as one ``HubError``
with a one-line message that names the repo and says what to do, raised ``from`` the original.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from .errors import HubError, LoratoolError, NotFoundError, ValidationError
from .redact import register_secret, scrub, scrub_exception

# One part of a repo id, as validate_repo_id accepts it (to name the part it refused).
_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?", re.ASCII)
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*", re.ASCII)
_SPEC_HINT = "expected OWNER/NAME or OWNER/NAME@REVISION"


def parse_repo_spec(spec: str) -> tuple[str, str | None]:
    """``"OWNER/NAME"`` → ``("OWNER/NAME", None)``; ``"OWNER/NAME@REV"`` → ``("OWNER/NAME", "REV")``.

    REV is a branch name or a commit sha. A malformed spec is a one-line ``ValidationError``.
    """
    text = spec.strip() if isinstance(spec, str) else ""
    repo_id, at, revision = text.partition("@")
    if at and not revision:
        raise ValidationError("nothing after '@'", file=spec, hint=_SPEC_HINT)
    _check_repo_id(repo_id, spec)
    if at:
        _check_revision(revision, spec)
    return repo_id, (revision if at else None)


def _check_repo_id(repo_id: str, label: str) -> None:
    """huggingface_hub's own ``validate_repo_id``, plus what loratool always wants: exactly
    OWNER/NAME (never a bare canonical name)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValidationError("not a Hub repo id", file=label, hint=_SPEC_HINT)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        bad = next((p for p in parts if not _PART.fullmatch(p)), repo_id)
        raise ValidationError(
            f"'{bad}' is not a valid Hub name",
            file=label,
            hint="letters, digits, '-', '_' and '.', at most 96, not starting or ending "
            "with '-' or '.', no '--' or '..', not ending in .git",
        ) from exc


def _check_revision(revision: str, label: str) -> None:
    if (
        not _REVISION.fullmatch(revision)
        or ".." in revision
        or "//" in revision
        or revision.endswith(("/", ".", ".lock"))
    ):
        raise ValidationError(
            f"'{revision}' is not a valid branch name or commit sha", file=label, hint=_SPEC_HINT
        )


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool,
    revision: str | None,
    message: str,
    token: str | None = None,
) -> dict:
    """Upload every file under ``folder`` to ``repo_id`` in one commit on ``revision`` (a branch;
    ``main`` when None). The repo is created when missing (``private`` applies only then) and
    the branch is created from ``main`` when missing.

    Returns ``{"repo", "revision", "commit", "url", "commit_url", "files"}``; ``commit`` is the
    sha the branch points at afterwards (the branch head as it was when nothing changed).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFoundError("not a directory", file=folder, hint="push needs a folder to upload")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise ValidationError("nothing to push: the folder holds no files", file=folder)
    _check_repo_id(repo_id, repo_id)
    branch = revision or "main"
    _check_revision(branch, f"{repo_id}@{branch}")
    if _COMMIT_SHA.fullmatch(branch):
        raise ValidationError(
            "a push goes to a branch, not to a commit sha", file=f"{repo_id}@{branch}"
        )
    if not message or not message.strip():
        raise ValidationError("the commit message is empty", file=repo_id)

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import constants as hf_constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    api = HfApi(token=token)
    label = repo_id if branch == "main" else f"{repo_id}@{branch}"
    with _hub_errors(label, api.endpoint, token):
        # A first request with a deadline: huggingface_hub's HTTP client has none by default,
        # so an endpoint that swallows packets would otherwise hang create_repo forever.
        try:
            api.repo_info(repo_id, timeout=hf_constants.HF_HUB_ETAG_TIMEOUT)
            exists = True
        except RepositoryNotFoundError as exc:
            if isinstance(exc, GatedRepoError):
                raise
            exists = False  # missing, or private and hidden from this token
        if not exists:
            api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        # create_commit, not upload_folder: with hf_xet installed upload_folder runs a pipeline
        # that may split a folder over several commits ("(part 2)"); create_commit is one commit.
        operations = [
            CommitOperationAdd(
                path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)
            )
            for p in files
        ]
        info = api.create_commit(
            repo_id, operations, commit_message=message.strip(), revision=branch
        )

    url = f"{api.endpoint}/{repo_id}"
    if branch != "main":
        url += f"/tree/{quote(branch, safe='')}"
    return {
        "repo": repo_id,
        "revision": branch,
        "commit": info.oid,
        "url": url,
        "commit_url": info.commit_url,
        "files": [p.relative_to(folder).as_posix() for p in files],
    }


def resolved_commit(api, repo_id: str, revision: str, label: str) -> str:
    """The commit the Hub gives for ``revision``, checked to be a 40-character sha: it names
    cache folders and every later request, so a path-like or empty answer is refused. Call it
    inside ``_hub_errors``."""
    from huggingface_hub import constants as hf_constants

    info = api.repo_info(repo_id, revision=revision, timeout=hf_constants.HF_HUB_ETAG_TIMEOUT)
    commit = info.sha
    if not isinstance(commit, str) or not _COMMIT_SHA.fullmatch(commit):
        raise HubError(
            f"the Hub answered {_shown(commit)} for the commit of this revision, not a "
            "40-character sha",
            file=label,
            hint="check HF_ENDPOINT",
        )
    return commit


def pull_files(
    spec: str,
    *,
    allow_patterns: Iterable[str] | None = None,
    token: str | None = None,
    tqdm_class: type | None = None,
    into: Path | None = None,
    progress=None,
) -> tuple[Path, dict]:
    """Download the adapter files of ``spec`` (``OWNER/NAME`` or ``OWNER/NAME@REV``) through
    the Hugging Face cache, each checked against the hash the Hub advertises for it.

    Only what an adapter needs is fetched, from the top of the repository: a PEFT layout's
    ``adapter_config.json`` and ``adapter_model.safetensors``, else its one ``*.safetensors``
    file; ``allow_patterns`` chooses top-level files by name instead. The revision (``main`` by
    default) is resolved to a commit once, and that exact commit is downloaded, so a branch
    that moves meanwhile cannot mix two commits' files.

    Every file's bytes must hash to what the Hub promised (the LFS sha256, else the git blob
    id, and the ETag the cache files them under); a file that does not is refused and removed
    from the cache. ``into``: a directory to copy the verified bytes into (a staging area the
    caller reads from, so what it loads is what was checked); the path returned is then
    ``into``, else the snapshot directory in the cache. Returns it and ``{"repo", "revision",
    "commit", "files"}``.

    Quiet by default; ``tqdm_class`` (a tqdm subclass) is huggingface_hub's progress hook, for a
    caller that wants to show progress; or ``progress(nbytes, label, total=None)``, called
    once with the total size when the files are chosen, then as bytes arrive.
    """
    repo_id, revision = parse_repo_spec(spec)
    revision = revision or "main"
    patterns = None
    if allow_patterns is not None:
        patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)

    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub import constants as hf_constants

    api = HfApi(token=token)
    label = repo_id if revision == "main" else f"{repo_id}@{revision}"
    timeout = hf_constants.HF_HUB_ETAG_TIMEOUT
    with _hub_errors(label, api.endpoint, token):
        commit = resolved_commit(api, repo_id, revision, label)
        wanted = _choose_files(api, repo_id, commit, patterns, label)
        if progress is not None:
            progress(0, None, total=sum(e.size for e in wanted))
            tqdm_class = tqdm_class or progress_tqdm(progress, label)
        paths = []
        for entry in wanted:
            _check_metadata(api, repo_id, commit, entry, token, label)
            path = Path(
                hf_hub_download(
                    repo_id,
                    entry.path,
                    revision=commit,
                    token=token,
                    etag_timeout=timeout,
                    endpoint=api.endpoint,
                    tqdm_class=tqdm_class or _quiet_tqdm(),
                )
            )
            paths.append((entry, path))
    snapshot = paths[0][1].parent
    for entry, path in paths:
        _verify_download(entry, path, snapshot, commit, label, into)
    files = sorted(entry.path for entry, _ in paths)
    return (Path(into) if into is not None else snapshot), {
        "repo": repo_id,
        "revision": revision,
        "commit": commit,
        "files": files,
    }


# What pull reads whole into memory besides the tensors: a config larger than this is not one.
MAX_CONFIG_BYTES = 16 << 20
# How many top-level entries pull looks through for the adapter's files.
MAX_LISTING = 10_000
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._ +-]{0,254}")


def _shown(value: object) -> str:
    """A value a server sent, safe to put in a message: repr'd (no control characters) and
    cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _choose_files(api, repo_id: str, commit: str, patterns, label: str) -> list:
    """The top-level files pull needs (RepoFile entries, with their sizes and hashes)."""
    from fnmatch import fnmatchcase

    from huggingface_hub.hf_api import RepoFile

    top: dict[str, RepoFile] = {}
    for n, entry in enumerate(api.list_repo_tree(repo_id, revision=commit, recursive=False)):
        if n >= MAX_LISTING:
            raise HubError(
                f"the repository's top level lists more than {MAX_LISTING} entries",
                file=label,
                hint="an adapter repo holds a few files; is this the right repo?",
            )
        path = getattr(entry, "path", None)
        if not isinstance(entry, RepoFile) or not isinstance(path, str):
            continue
        if "/" in path or "\\" in path or not _SAFE_NAME.fullmatch(path) or ".." in path:
            continue  # not a top-level file we could ever want; never a path to write
        top[path] = entry
    if patterns is not None:
        chosen = [
            e for name, e in sorted(top.items()) if any(fnmatchcase(name, p) for p in patterns)
        ]
        if not chosen:
            raise HubError(
                f"no top-level file matches {', '.join(patterns)} at commit {commit[:12]}",
                file=label,
            )
    elif (
        "adapter_config.json" in top
        and "adapters.safetensors" in top
        and ("adapter_model.safetensors" not in top)
    ):
        chosen = [top["adapter_config.json"], top["adapters.safetensors"]]  # an mlx-lm adapter
    elif "adapter_config.json" in top:
        if "adapter_model.safetensors" not in top:
            raise HubError(
                f"adapter_config.json but no adapter_model.safetensors at commit {commit[:12]}",
                file=label,
                hint="a PEFT adapter repo holds both (pickled adapter_model.bin is never read)",
            )
        chosen = [top["adapter_config.json"], top["adapter_model.safetensors"]]
    else:
        tensors = [e for name, e in sorted(top.items()) if name.endswith(".safetensors")]
        if len(tensors) != 1:
            found = ", ".join(e.path for e in tensors[:5]) or "none"
            raise HubError(
                f"no adapter_config.json, and not exactly one .safetensors file at the top of "
                f"commit {commit[:12]} (found: {found})",
                file=label,
                hint="is this a LoRA adapter repo? a PEFT one holds adapter_config.json and "
                "adapter_model.safetensors",
            )
        chosen = tensors
        _check_is_adapter(api, repo_id, commit, chosen[0], label)
    for e in chosen:
        size = getattr(e, "size", None)
        if not isinstance(size, int) or size < 0:
            raise HubError(f"the Hub lists {e.path} without a valid size", file=label)
        if e.path.endswith(".json") and size > MAX_CONFIG_BYTES:
            raise HubError(
                f"{e.path} is {size} bytes; a config is at most {MAX_CONFIG_BYTES}", file=label
            )
    return chosen


def _check_is_adapter(api, repo_id: str, commit: str, entry, label: str) -> None:
    """Before downloading a repo's one .safetensors file, read its header (an HTTP range
    request of a few KB) and refuse it unless some adapter format recognises it: a model's
    weights are not downloaded only to be refused."""
    from .formats import detect_header

    meta = api.parse_safetensors_file_metadata(repo_id, entry.path, revision=commit)
    if detect_header(entry.path, meta) is None:
        raise HubError(
            f"{entry.path} at commit {commit[:12]} holds no adapter tensors (lora_A/lora_B, "
            f"lora_down/lora_up, LyCORIS…): it looks like a model's weights, not an adapter; "
            "nothing was downloaded",
            file=label,
            hint="pull takes an adapter repo; a model is a BASE (merge OWNER/NAME ADAPTER -o OUT)",
        )


def _promised(entry, label: str) -> tuple[str, str]:
    """("sha256" | "git-sha1", hex): the hash the listing promises for the file's bytes."""
    lfs = getattr(entry, "lfs", None)
    sha = getattr(lfs, "sha256", None) if lfs is not None else None
    if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha):
        return "sha256", sha
    oid = getattr(entry, "blob_id", None)
    if isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{40}", oid):
        return "git-sha1", oid
    raise HubError(f"the Hub lists {entry.path} without a hash to check it against", file=label)


def _check_metadata(api, repo_id: str, commit: str, entry, token, label: str) -> None:
    """Ask for the file's headers before huggingface_hub does, and refuse what it would use
    as paths in the cache (the commit, the ETag) unless they are plain hashes."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    meta = get_hf_file_metadata(
        hf_hub_url(repo_id, entry.path, revision=commit, endpoint=api.endpoint), token=token
    )
    if meta.commit_hash != commit:
        raise HubError(
            f"the Hub served {entry.path} from commit {_shown(meta.commit_hash)}, not "
            f"{commit[:12]}: refused",
            file=label,
            hint="check HF_ENDPOINT; a Hub serves a commit's files from that commit",
        )
    if not isinstance(meta.etag, str) or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", meta.etag):
        raise HubError(
            f"the Hub's ETag for {entry.path} is {_shown(meta.etag)}, not a hash: refused",
            file=label,
            hint="check HF_ENDPOINT",
        )
    kind, value = _promised(entry, label)
    if (kind == "sha256" and meta.etag != value) or (
        meta.size is not None and meta.size != entry.size
    ):
        raise HubError(
            f"the Hub's headers for {entry.path} (ETag {meta.etag[:12]}…, {meta.size} bytes) "
            f"disagree with its listing ({value[:12]}…, {entry.size} bytes): refused",
            file=label,
        )


def _verify_download(entry, path: Path, snapshot: Path, commit: str, label: str, into) -> None:
    """Hash the cached file (copying it into ``into`` on the way); on a mismatch remove it
    from the cache (the snapshot's link and the blob it names) and from ``into``."""
    import hashlib

    kind, promised = _promised(entry, label)
    sha256, git = hashlib.sha256(), hashlib.sha1()
    size = 0
    dest = Path(into) / entry.path if into is not None else None
    if snapshot.name != commit or path.parent != snapshot or path.name != entry.path:
        raise HubError(
            f"huggingface_hub stored {entry.path} at an unexpected place: {path}", file=label
        )
    try:
        real = path.resolve(strict=True)
        git.update(b"blob %d\0" % real.stat().st_size)
        with open(real, "rb") as src, open(dest, "xb") if dest is not None else _Null() as out:
            while chunk := src.read(1 << 20):
                sha256.update(chunk)
                git.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except OSError as exc:
        raise HubError(
            f"cannot read the downloaded {entry.path}: {exc.strerror or exc}", file=label
        ) from exc
    got = sha256.hexdigest() if kind == "sha256" else git.hexdigest()
    etag = real.name  # huggingface_hub names the blob by the ETag it was promised
    etag_ok = etag == (sha256.hexdigest() if len(etag) == 64 else git.hexdigest())
    if got == promised and size == entry.size and etag_ok:
        return
    for p in (path, real, dest):
        if p is not None:
            try:
                p.unlink()
            except OSError:
                pass
    with_etag = "" if etag_ok else f" (nor the ETag {etag[:12]}… it was cached under)"
    raise HubError(
        f"downloaded {entry.path} ({size} bytes) does not match the {kind} the Hub promised "
        f"({promised[:12]}…, {entry.size} bytes){with_etag}: refused and removed from the cache",
        file=label,
        hint="retry; if it persists, the endpoint or something between is altering files",
    )


def download_verified(
    repo_id: str,
    entry,
    *,
    commit: str,
    label: str,
    token: str | None = None,
    tqdm_class: type | None = None,
) -> Path:
    """One file of a pinned commit through the Hugging Face cache, its bytes checked against
    the hash the Hub's listing promises for it (``entry``: the file's ``RepoFile`` at
    ``commit``): the LFS sha256, else the git blob id, as :func:`pull_files` checks them.

    A file this call downloads is hashed (streaming) before its path is returned, and refused
    and removed from the cache when it does not match. A file already in the cache is not
    hashed again when huggingface_hub filed it under that very hash: the cache names a blob by
    the ETag it was downloaded under (``blobs/<sha256>`` for an LFS file, ``blobs/<git blob
    id>`` otherwise), so a blob whose name is the promised hash and whose size is the promised
    size is the one checked when it came down; any other cached file is hashed.
    """
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
    from huggingface_hub import constants as hf_constants

    api = HfApi(token=token)
    kind, promised = _promised(entry, label)
    with _hub_errors(label, api.endpoint, token):
        cached = try_to_load_from_cache(repo_id, entry.path, revision=commit)
        if not isinstance(cached, str):
            _check_metadata(api, repo_id, commit, entry, token, label)
        path = Path(
            hf_hub_download(
                repo_id,
                entry.path,
                revision=commit,
                token=token,
                etag_timeout=hf_constants.HF_HUB_ETAG_TIMEOUT,
                endpoint=api.endpoint,
                tqdm_class=tqdm_class or _quiet_tqdm(),
            )
        )
    if isinstance(cached, str) and _filed_as_promised(path, promised, entry.size):
        return path
    _verify_download(entry, path, path.parent, commit, label, None)
    return path


def _filed_as_promised(path: Path, promised: str, size: int) -> bool:
    """Whether a cached file is a link to the blob named by the promised hash, of the promised
    size (huggingface_hub's content-addressed cache: no need to read it again)."""
    try:
        if not path.is_symlink():
            return False
        real = path.resolve(strict=True)
        blobs = path.parent.parent.parent.resolve(strict=True) / "blobs"
        return real.name == promised and real.parent == blobs and real.stat().st_size == size
    except OSError:
        return False


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, data) -> None:
        pass


def progress_tqdm(callback, label: str | None = None) -> type:
    """A tqdm class for huggingface_hub's ``tqdm_class`` hooks that draws nothing itself and
    passes each chunk's size to ``callback(nbytes, label)`` (the caller's own progress bar);
    with no callback, the quiet one."""
    if callback is None:
        return _quiet_tqdm()
    from huggingface_hub.utils.tqdm import tqdm

    class ProgressTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if n:
                callback(int(n), label)
            return super().update(n)

    return ProgressTqdm


def _quiet_tqdm() -> type:
    """huggingface_hub's tqdm, always disabled: a library call prints nothing."""
    from huggingface_hub.utils.tqdm import tqdm

    class QuietTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return QuietTqdm


# -- error translation --------------------------------------------------------------------------


@contextmanager
def _hub_errors(label: str, endpoint: str, token: str | None) -> Iterator[None]:
    register_secret(token)
    try:
        yield
    except LoratoolError:
        raise
    except Exception as exc:
        # The original stays chained (for --debug): masked first, and everything behind it.
        scrub_exception(exc)
        if not _is_hub_failure(exc):
            raise
        message, hint = _describe(exc, label, _safe_endpoint(endpoint))
        raise HubError(_scrub(message, token), file=label, hint=_scrub(hint, token)) from exc


def _is_hub_failure(exc: BaseException) -> bool:
    """Errors of the Hub, the network, the client libraries or the cache on disk, as opposed to
    bugs (TypeError, AttributeError...), which must keep their traceback."""
    module = type(exc).__module__.split(".")[0]
    return module in (
        "huggingface_hub",
        "httpx2",
        "httpx",
        "httpcore",
        "requests",
        "urllib3",
        "hf_xet",
    ) or isinstance(exc, OSError)


def _describe(exc: BaseException, label: str, endpoint: str) -> tuple[str, str | None]:
    """(message, hint) for one exception; the label (the repo) is prefixed by HubError."""
    import httpx2
    from huggingface_hub import errors as e

    repo = label.partition("@")[0]
    owner = repo.partition("/")[0]

    if isinstance(exc, e.LocalEntryNotFoundError):
        # snapshot_download hides a connection failure behind "not in the local cache"
        cause = exc.__cause__ or exc.__context__
        if cause is not None and _is_hub_failure(cause):
            return _describe(cause, label, endpoint)
        return (
            "the files are not in the local cache and the Hub could not be asked",
            f"check the network and HF_ENDPOINT ({endpoint})",
        )
    if isinstance(exc, e.OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub is not contacted", "unset HF_HUB_OFFLINE"
    if isinstance(exc, e.GatedRepoError):
        return (
            "gated repository: its conditions have not been accepted by this account",
            "accept them on the repo's page, then set HF_TOKEN or run `hf auth login`",
        )
    if isinstance(exc, e.RepositoryNotFoundError):
        return (
            f"repository not found on {endpoint}",
            "check OWNER/NAME; a private repo needs HF_TOKEN or `hf auth login` "
            "with an account that can read it",
        )
    if isinstance(exc, e.RevisionNotFoundError):
        return ("revision not found", "check the branch name or commit sha (`main` is the default)")
    if isinstance(exc, e.RemoteEntryNotFoundError):
        url = str(exc.response.request.url) if exc.response is not None else ""
        name = url.split("/resolve/", 1)[1].split("/", 1)[-1] if "/resolve/" in url else "a file"
        return (
            f"file not found in the repository: {name}",
            "the repo changed while downloading, retry",
        )
    if isinstance(exc, e.HfHubHTTPError) and exc.response is not None:
        return _describe_status(exc, owner)
    if isinstance(exc, httpx2.TimeoutException):
        return (
            f"the Hub at {endpoint} did not answer in time",
            "check the network, or raise HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT",
        )
    if isinstance(exc, (httpx2.TransportError, httpx2.TooManyRedirects)):
        return (
            f"cannot reach the Hub at {endpoint}: {_first_line(exc) or type(exc).__name__}",
            "check the network, or HF_ENDPOINT if it is set",
        )
    if isinstance(exc, e.LocalTokenNotFoundError):
        return "no Hugging Face token found", "set HF_TOKEN or run `hf auth login`"
    if isinstance(exc, e.HFValidationError):
        return f"rejected by huggingface_hub: {_first_line(exc)}", _SPEC_HINT
    if isinstance(exc, e.FileMetadataError):
        return (
            f"{endpoint} did not answer like a Hugging Face Hub: {_first_line(exc)}",
            "check HF_ENDPOINT",
        )
    if isinstance(exc, OSError) and exc.errno is None and type(exc) is OSError:
        # raised by huggingface_hub itself, not by the system: a download that came out the
        # wrong size (its consistency check), ...
        return (
            f"the download failed: {_first_line(exc)}",
            "retry; if it persists, the endpoint or something between is altering files",
        )
    if isinstance(exc, OSError) and not isinstance(exc, (e.HfHubHTTPError, httpx2.HTTPError)):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        return (
            f"local file error{where}: {exc.strerror or _first_line(exc)}",
            "check the Hub cache (HF_HOME / HF_HUB_CACHE): free space and permissions",
        )
    return f"{type(exc).__name__}: {_first_line(exc)}", None


def _describe_status(exc, owner: str) -> tuple[str, str | None]:
    status = exc.response.status_code
    server = _first_line(exc.server_message or "")
    said = f" ({server})" if server else ""
    if status == 401:
        if (
            exc.response.headers.get("X-Error-Message")
            == "Invalid credentials in Authorization header"
        ):
            return (
                "401 unauthorized: the Hub rejected the token",
                "set a valid HF_TOKEN or run `hf auth login`",
            )
        return "401 unauthorized", "set HF_TOKEN or run `hf auth login`"
    if status == 403:
        return (
            f"403 forbidden{said}",
            f"use a token with write access to '{owner}', or push under your own namespace",
        )
    if status == 409:
        return f"409 conflict{said}", "the repo or branch is in a conflicting state; retry"
    if status == 412:
        return f"412 the branch moved during the push{said}", "retry the push"
    if status == 429:
        return "429 too many requests", "wait a little and retry"
    if status >= 500:
        return f"the Hub failed with {status}{said}", "retry later"
    return f"the Hub answered {status}{said}", None


def _first_line(value: object) -> str:
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if len(text) <= 200 else text[:197] + "..."


def _safe_endpoint(endpoint: str) -> str:
    """The endpoint without user:password@, should someone have put credentials in the URL."""
    parts = urlsplit(endpoint)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return endpoint


def _scrub(text: str | None, token: str | None) -> str | None:
    """Belt and braces: no message may carry a token, whatever a server or library put in it."""
    if text is None:
        return None
    register_secret(token)
    return scrub(text)
