"""Publishing a folder to the Hugging Face Hub and fetching adapter files from it.

Library functions only: no click, no rich, nothing printed. huggingface_hub is imported inside
the functions, so importing loratool stays fast. The endpoint is huggingface_hub's own
(``HF_ENDPOINT``); the token is the one given, else huggingface_hub's resolution (``HF_TOKEN``,
then the login stored by ``hf auth login``). A token is never put in a message, a log or a file.

Every failure of the Hub, the network or the client library comes out as one ``HubError``
with a one-line message that names the repo and says what to do, raised ``from`` the original.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from .errors import HubError, LoratoolError, NotFoundError, ValidationError

DEFAULT_PULL_PATTERNS: tuple[str, ...] = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "*.safetensors",
    "README.md",
)

# The Hub's rules for a namespace or repo name (huggingface_hub's validate_repo_id, made strict:
# loratool always wants OWNER/NAME, never a bare canonical name).
_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?", re.ASCII)
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]*", re.ASCII)
_TOKEN_LIKE = re.compile(r"\bhf_[A-Za-z0-9_]{6,}")
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
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValidationError("not a Hub repo id", file=label, hint=_SPEC_HINT)
    for part in parts:
        if not _PART.fullmatch(part) or ".." in part or "--" in part or part.endswith(".git"):
            raise ValidationError(
                f"'{part}' is not a valid Hub name",
                file=label,
                hint="letters, digits, '-', '_' and '.', at most 96, not starting or ending "
                "with '-' or '.', no '--' or '..'",
            )


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


def pull_files(
    spec: str,
    *,
    allow_patterns: Iterable[str] = DEFAULT_PULL_PATTERNS,
    token: str | None = None,
    tqdm_class: type | None = None,
) -> tuple[Path, dict]:
    """Download the files of ``spec`` (``OWNER/NAME`` or ``OWNER/NAME@REV``) that match
    ``allow_patterns`` into the Hub cache.

    The revision (``main`` by default) is resolved to a commit once, and that exact commit is
    downloaded, so a branch that moves meanwhile cannot mix two commits' files. Returns the
    snapshot directory and ``{"repo", "revision", "commit", "files"}``.

    Quiet by default; ``tqdm_class`` (a tqdm subclass) is huggingface_hub's progress hook, for a
    caller that wants to show progress.
    """
    repo_id, revision = parse_repo_spec(spec)
    revision = revision or "main"
    patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)

    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import constants as hf_constants

    api = HfApi(token=token)
    label = repo_id if revision == "main" else f"{repo_id}@{revision}"
    timeout = hf_constants.HF_HUB_ETAG_TIMEOUT
    with _hub_errors(label, api.endpoint, token):
        commit = api.repo_info(repo_id, revision=revision, timeout=timeout).sha
        if not commit:
            raise HubError("the Hub did not say which commit this is", file=label)
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=commit,
                allow_patterns=patterns,
                token=token,
                etag_timeout=timeout,
                endpoint=api.endpoint,
                tqdm_class=tqdm_class or _quiet_tqdm(),
            )
        )
    # The snapshot directory is shared by every pull of this commit, so it may also hold files
    # an earlier pull with other patterns fetched: report the ones these patterns match.
    from huggingface_hub.utils import filter_repo_objects

    present = (
        [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        if snapshot.is_dir()
        else []
    )
    files = sorted(filter_repo_objects(present, allow_patterns=patterns))
    if not files:
        raise HubError(
            f"no file matches {', '.join(patterns)} at commit {commit[:12]}",
            file=label,
            hint="is this a LoRA adapter repo? a PEFT one holds adapter_config.json and "
            "adapter_model.safetensors",
        )
    return snapshot, {"repo": repo_id, "revision": revision, "commit": commit, "files": files}


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
    try:
        yield
    except LoratoolError:
        raise
    except Exception as exc:
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
    # The token huggingface_hub would have used: the environment's, or the stored login's.
    # (Read directly: get_token() may exchange an OIDC token over the network.)
    secrets = {
        t
        for t in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"))
        if t
    }
    try:
        from huggingface_hub import constants

        secrets.add(Path(constants.HF_TOKEN_PATH).read_text().strip())
    except Exception:  # no stored login; finding the token must never mask the error reported
        pass
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return _TOKEN_LIKE.sub("hf_***", text)
