"""The streaming merge engine: W ← W + Σ weightᵢ·ΔWᵢ, one tensor at a time.

A merge is planned first and executed second (STYLE.md, "frozen plans"): the plan resolves
every adapter module to its base tensor, checks shapes, dtypes and the output path, and
computes each output file's header from the input headers, before a byte is written. The
engine then writes each output file by position (every offset is known from the header):

- a tensor no adapter touches is copied byte for byte with ``copy_file_range`` (the kernel
  moves the pages; nothing is decoded), consecutive ones as one range;
- a touched tensor is read once, widened to float32 on the device, gets its deltas added
  (computed there from the factors in float32), is checked for NaN/Inf, rounded once to the
  output dtype and written once.

A copier moves the untouched tensors while a reader, a merger and a writer handle the touched
ones through a small pool of reused buffers (pinned on CUDA), so disk and compute overlap and
memory stays near a few tensors whatever the model's size; a flusher starts writeback as the
file grows. Planning needs no torch (adapters can be read from their headers, see
``load_adapter(lazy=True)``): the copy starts at once and torch is imported while it runs.

Outputs go to a temporary directory beside OUT and are renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .adapter import Adapter, LoraModule
from .errors import ValidationError
from .formats.resolve import resolve
from .fsutil import atomic_dir, atomic_file, check_output
from .tensors.header import DTYPE_SIZES, FLOAT_DTYPES, BaseIndex, TensorInfo, read_base
from .tensors.io import header_bytes

DTYPE_CHOICES = {"same": None, "float16": "F16", "bfloat16": "BF16", "float32": "F32"}
PROVENANCE_KEY = "loratool.merges"
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class AdapterInput:
    adapter: Adapter
    weight: float
    label: str
    sha256: str


@dataclass(frozen=True)
class TensorPlan:
    name: str
    src: TensorInfo
    out_dtype: str
    out_start: int  # offset within the output file's data section
    modules: tuple[tuple[LoraModule, float], ...]  # (module, weight) pairs; empty → untouched

    @property
    def out_nbytes(self) -> int:
        return self.src.numel * DTYPE_SIZES[self.out_dtype]

    @property
    def raw_copy(self) -> bool:
        return not self.modules and self.out_dtype == self.src.dtype


@dataclass(frozen=True)
class FilePlan:
    name: str  # file name inside the output (or the output file itself for a single file)
    header: bytes  # the complete 8-byte length + JSON header
    tensors: tuple[TensorPlan, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.out_nbytes for t in self.tensors)


@dataclass(frozen=True)
class MergePlan:
    base: BaseIndex
    out: Path
    single_file: bool
    files: tuple[FilePlan, ...]
    inputs: tuple[AdapterInput, ...]
    device: str
    extra_files: tuple[Path, ...]
    index: dict | None
    warnings: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def touched(self) -> int:
        return sum(1 for f in self.files for t in f.tensors if t.modules)


@dataclass
class MergeResult:
    out: Path
    device: str
    tensors_changed: int
    tensors_copied: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    # the part of ``seconds`` spent importing torch (while the copy ran); 0 if it was loaded
    torch_import_seconds: float = 0.0

    @property
    def gbps(self) -> float:
        return self.bytes_written / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "out": str(self.out),
            "device": self.device,
            "tensors_changed": self.tensors_changed,
            "tensors_copied": self.tensors_copied,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 4),
            "gb_per_s": round(self.gbps, 3),
            "torch_import_seconds": round(self.torch_import_seconds, 4),
            "warnings": self.warnings,
        }


# -- planning -----------------------------------------------------------------------------


def pick_device(device: str) -> str:
    import torch

    if device in ("auto", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValidationError(
                f"--device {device}: no CUDA device is available here", hint="use --device cpu"
            )
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ValidationError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)"
            )
        return f"cuda:{idx}"
    if device != "cpu":
        raise ValidationError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def base_name(base: BaseIndex) -> str:
    root = base.root
    if root.is_file():
        return root.parent.name if root.name in ("model.safetensors",) else root.stem
    return root.name


def base_identity(base: BaseIndex) -> set[str]:
    """Names the base is known by: its directory, config's _name_or_path, merge provenance."""
    names = {base_name(base)}
    cfg = (base.root if base.root.is_dir() else base.root.parent) / "config.json"
    try:
        data = json.loads(cfg.read_text())
        if isinstance(data.get("_name_or_path"), str):
            names.add(data["_name_or_path"])
    except (OSError, ValueError):
        pass
    for meta in base.file_metadata.values():
        if "loratool.base_model" in meta:
            names.add(meta["loratool.base_model"])
    return {n.rstrip("/").rsplit("/", 1)[-1].lower() for n in names if n}


def merge_history(base: BaseIndex) -> list[dict]:
    for meta in base.file_metadata.values():
        if PROVENANCE_KEY in meta:
            try:
                hist = json.loads(meta[PROVENANCE_KEY])
                return hist if isinstance(hist, list) else []
            except ValueError:
                return []
    return []


def plan_merge(
    base_path: str | os.PathLike,
    inputs: list[AdapterInput],
    out: str | os.PathLike,
    *,
    dtype: str = "same",
    device: str = "auto",
    force: bool = False,
    strict: bool = False,
) -> MergePlan:
    """Validate everything a merge needs and freeze it into a plan; writes nothing."""
    base = read_base(base_path)
    out = Path(out)
    check_output(out, force)
    if out.resolve() == base.root.resolve() or any(
        out.resolve() == f.resolve() for f in base.files
    ):
        raise ValidationError("the output may not overwrite the base it reads", file=out)
    if dtype not in DTYPE_CHOICES:
        raise ValidationError(
            f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}"
        )
    forced = DTYPE_CHOICES[dtype]
    if not inputs:
        raise ValidationError("no adapter to merge")
    # "auto" is settled when the engine imports torch, which it does while the copy runs;
    # an explicit CUDA device is checked now.
    dev = device if device in ("auto", None, "cpu") else pick_device(device)
    dev = dev or "auto"
    warnings: list[str] = []
    ident = base_identity(base)
    history = merge_history(base)
    by_tensor: dict[str, list[tuple[LoraModule, float]]] = {}
    for inp in inputs:
        adapter = resolve(inp.adapter, base, source=inp.label)
        declared = adapter.meta.base_model
        if declared:
            short = declared.rstrip("/").rsplit("/", 1)[-1].lower()
            if short not in ident:
                msg = f"{inp.label} was made for {declared!r}, but the base is {base_name(base)!r}"
                if strict:
                    raise ValidationError(msg, hint="drop --strict to merge anyway")
                warnings.append(msg)
        if inp.weight < 0 and history is not None:
            net = sum(h.get("weight", 0) for h in history if h.get("sha256") == inp.sha256)
            if net <= 0:
                warnings.append(
                    f"{inp.label} is not recorded as merged into {base_name(base)}; subtracting it anyway"
                )
        for name, mod in adapter.modules.items():
            by_tensor.setdefault(name, []).append((mod, inp.weight))
    new_history = history + [
        {"adapter": i.label, "sha256": i.sha256, "weight": i.weight} for i in inputs
    ]
    files: list[FilePlan] = []
    for f in base.files:
        src_meta = dict(base.file_metadata.get(f, {}))
        src_meta.setdefault("format", "pt")
        src_meta[PROVENANCE_KEY] = json.dumps(new_history, separators=(",", ":"))
        src_meta["loratool.version"] = __version__
        src_meta.setdefault("loratool.base_model", base_name(base))
        infos = sorted((t for t in base.tensors.values() if t.file == f), key=lambda t: t.start)
        entries, plans, pos = [], [], 0
        for info in infos:
            out_dtype = forced if (forced and info.dtype in FLOAT_DTYPES) else info.dtype
            size = info.numel * DTYPE_SIZES[out_dtype]
            entries.append((info.name, out_dtype, info.shape, pos, pos + size))
            plans.append(
                TensorPlan(info.name, info, out_dtype, pos, tuple(by_tensor.get(info.name, ())))
            )
            pos += size
        name = out.name if base.index_path is None and base.root.is_file() else f.name
        files.append(FilePlan(name, header_bytes(entries, src_meta), tuple(plans)))
    index = None
    if base.index_path is not None:
        index = {
            "metadata": {
                **base.index_metadata,
                "total_size": sum(f.size - len(f.header) for f in files),
            },
            "weight_map": {t.name: f.name for f in files for t in f.tensors},
        }
    extra: list[Path] = []
    single = base.root.is_file()
    if not single:
        skip = {f.resolve() for f in base.files}
        if base.index_path is not None:
            skip.add(base.index_path.resolve())
        for p in sorted(base.root.iterdir()):
            if p.is_file() and p.resolve() not in skip and not p.name.startswith("."):
                extra.append(p)
    plan = MergePlan(
        base, out, single, tuple(files), tuple(inputs), dev, tuple(extra), index, tuple(warnings)
    )
    _check_space(plan)
    return plan


def _check_space(plan: MergePlan) -> None:
    """Refuse up front a merge that cannot fit on OUT's filesystem, rather than fail near the end."""
    need = plan.total_bytes + sum(p.stat().st_size for p in plan.extra_files)
    parent = plan.out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    st = os.statvfs(parent)
    free = st.f_bavail * st.f_frsize
    if need > free:
        from .units import human_size

        raise ValidationError(
            f"needs {human_size(need)} but only {human_size(free)} is free there",
            file=plan.out,
            hint="free some space or write OUT elsewhere",
        )


# -- execution ----------------------------------------------------------------------------
#
# Every byte of an output file has a known offset once the header is planned, so the file is
# written by position (pwrite, copy_file_range with an explicit offset) rather than in order.
# That lets the stages run at once: the copier moves the untouched tensors kernel-side while
# the reader fills buffers with the touched ones, the merger computes and the writer writes
# the results. Buffers come from small fixed pools that are reused tensor after tensor: memory
# stays at a few tensors whatever the model's size, and (on CUDA) the host buffers are pinned
# once rather than per tensor.

_DONE = object()
# Rows per block when adding a delta: the block of W in float32 and its slice of ΔW stay in
# cache instead of making several passes over the whole tensor.
_BLOCK_ELEMS = 1 << 18
_GPU_BLOCK_ELEMS = 1 << 24
_READ_BUFFERS = 3
_LARGE = 64 << 20  # tensors above this get two buffers instead of three
_FLUSH_EVERY = 256 << 20


def _copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, length: int) -> None:
    """Copy file bytes without passing them through Python (falls back to pread/pwrite)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(
                    src_fd, dst_fd, length - done, src_off + done, dst_off + done
                )
                if n == 0:
                    break
                done += n
        except OSError:
            pass
    while done < length:
        chunk = os.pread(src_fd, min(_COPY_CHUNK, length - done), src_off + done)
        if not chunk:
            raise ValidationError("unexpected end of file while copying")
        _pwrite_all(dst_fd, chunk, dst_off + done)
        done += len(chunk)


def _pwrite_all(fd: int, data, offset: int) -> None:
    mv = memoryview(data).cast("B")
    while len(mv):
        k = os.pwrite(fd, mv, offset)
        mv = mv[k:]
        offset += k


def _read_into(tp: TensorPlan, fd: int, buf) -> None:
    """Fill ``buf`` (a uint8 tensor of exactly the tensor's size) from the base file."""
    view = memoryview(buf.numpy()).cast("B")
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], tp.src.start + got)
        if n <= 0:
            raise ValidationError(
                f"read {got} of {len(view)} bytes: truncated", file=tp.src.file, tensor=tp.name
            )
        got += n


class _Scratch:
    """The merger's reusable float32 block, grown to the largest block it has needed."""

    def __init__(self, device: str):
        self.device = device
        self.buf = None

    def block(self, rows: int, cols: int, dtype):
        import torch

        n = rows * cols
        if self.buf is None or self.buf.numel() < n or self.buf.dtype != dtype:
            self.buf = torch.empty(max(n, _BLOCK_ELEMS), dtype=dtype, device=self.device)
        return self.buf[:n].view(rows, cols)


def _factor_terms(modules, device, work) -> list:
    """Each (module, weight)'s factors as (left, right, scale) with weight·ΔW (as stored,
    flattened to 2-D) = scale · left @ right."""
    terms = []
    for mod, weight in modules:
        mod = mod.materialized()  # lazy factors are read (and checked finite) here
        A = mod.A.to(device=device, dtype=work)
        B = mod.B.to(device=device, dtype=work)
        if mod.kind == "linear":
            left, right = B, A
        elif mod.kind in ("linear_fifo", "embedding"):
            left, right = A.T, B.T  # ΔW = (B·A)ᵀ = Aᵀ·Bᵀ
        else:  # conv2d: ΔW[o, i·kh·kw] = B[o, r]·A[r, i·kh·kw]
            left, right = B.flatten(1), A.flatten(1)
        terms.append((left, right, mod.scale * weight))
    return terms


def _compute(tp: TensorPlan, raw, out, device: str, scratch: _Scratch) -> None:
    """out ← round(W + Σ weight·ΔW): W widened to float32 on ``device``, rounded once.

    ``raw`` holds W's bytes and ``out`` receives the result's (uint8 tensors on the host).
    ``out`` may be ``raw`` itself when the output dtype is no wider: each block of rows is
    taken into the float32 accumulator before its result is stored, and a result row never
    lies beyond the input rows already taken.
    ΔW is added block by block with ``addmm`` (acc ← acc + scale·B_blk·A), which computes the
    same float32 values as forming (B·A)·scale and adding it, without materialising it.
    """
    import torch

    from .tensors.io import torch_dtype

    if tp.src.numel == 0:
        return
    src_dtype, out_dtype = torch_dtype(tp.src.dtype), torch_dtype(tp.out_dtype)
    w = raw.view(src_dtype)
    if device != "cpu":
        w = w.to(device, non_blocking=True)
    rows = tp.src.shape[0] if tp.src.shape else 1
    w2 = w.view(rows, -1)
    res = (
        out.view(out_dtype).view(rows, -1)
        if device == "cpu"
        else torch.empty(w2.shape, dtype=out_dtype, device=device)
    )
    work = torch.float64 if tp.src.dtype == "F64" else torch.float32
    terms = _factor_terms(tp.modules, w.device, work)
    if not _add_deltas(w2, res, terms, work, scratch):
        raise ValidationError(
            "the merged weight contains NaN or Inf", file=tp.src.file, tensor=tp.name
        )
    if device != "cpu":
        out.view(out_dtype).view(rows, -1).copy_(res, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()


def _add_deltas(w2, res, terms, work, scratch: _Scratch) -> bool:
    """res ← round(w2 + Σ scale·left@right), a block of rows at a time in ``work`` precision.

    Both are 2-D views of one shape, on one device; ``res`` may alias ``w2`` (see _compute).
    Returns whether every sum is finite, checked once at the end (one sync on a GPU).
    """
    import torch

    rows, cols = w2.shape
    # Blocks that stay in cache on the CPU; on a GPU, few large ones (memory is plentiful and
    # every launch costs).
    block = _BLOCK_ELEMS if w2.device.type == "cpu" else _GPU_BLOCK_ELEMS
    step = max(1, block // max(1, cols))
    finite = []  # per block, on the device
    for i in range(0, rows, step):
        n = min(step, rows - i)
        acc = scratch.block(n, cols, work)
        acc.copy_(w2[i : i + n])
        for left, right, scale in terms:
            acc.addmm_(left[i : i + n], right, alpha=scale)
        if terms:
            lo, hi = torch.aminmax(acc)  # one pass; NaN propagates into both
            finite.append(torch.isfinite(lo) & torch.isfinite(hi))
        res[i : i + n].copy_(acc)  # the one rounding
    return not finite or bool(torch.stack(finite).all())


def execute(
    plan: MergePlan, progress: Callable[[int, str | None], None] | None = None
) -> MergeResult:
    """Run a plan; the output appears at ``plan.out`` only if every tensor was written.

    The copy of untouched tensors starts at once; torch is imported (and the device settled)
    while it runs, so a process that has not imported torch yet does not wait for it.
    """
    t0 = time.perf_counter()
    lock = threading.Lock()
    user_progress = progress or (lambda n, label=None: None)

    def report(n: int, label: str | None = None) -> None:
        with lock:
            user_progress(n, label)

    fds = {f: os.open(f, os.O_RDONLY) for f in plan.base.files}
    written = 0
    engine = _Engine(plan)
    try:
        ctx = (
            atomic_file(plan.out, force=True)
            if plan.single_file
            else atomic_dir(plan.out, force=True)
        )
        with ctx as tmp:
            for fp in plan.files:
                dest = tmp if plan.single_file else tmp / fp.name
                written += _write_file(fp, dest, fds, report, engine)
            if not plan.single_file:
                if plan.index is not None:
                    (tmp / plan.base.index_path.name).write_text(
                        json.dumps(plan.index, indent=2) + "\n"
                    )
                for p in plan.extra_files:
                    shutil.copyfile(p, tmp / p.name)
    finally:
        for fd in fds.values():
            os.close(fd)
        engine.close()
    changed = plan.touched
    total = sum(len(f.tensors) for f in plan.files)
    device = engine.device or (plan.device if plan.device != "auto" else "cpu")
    return MergeResult(
        plan.out,
        device,
        changed,
        total - changed,
        written,
        time.perf_counter() - t0,
        list(plan.warnings),
        engine.import_seconds,
    )


class _Engine:
    """What the merger needs from torch, set up on first use: the device, the CPU thread
    share, and the host buffers.

    A tensor is read into a buffer, merged in place there (when its output dtype is no
    wider) and written from it, so one pool does for most merges; a second holds outputs
    wider than their inputs. Three buffers let reading, merging and writing overlap; two when
    tensors are large, so memory stays at a couple of the largest tensors. On a GPU they are
    pinned, once.
    """

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.device: str | None = None
        self.import_seconds = 0.0
        self.read: queue.Queue = queue.Queue()
        self.wide: queue.Queue = queue.Queue()
        self._threads: int | None = None
        self._lock = threading.Lock()

    def ready(self) -> None:
        with self._lock:
            if self.device is not None:
                return
            t0 = time.perf_counter()
            import torch

            self.import_seconds = time.perf_counter() - t0

            device = pick_device(self.plan.device)
            if device == "cpu":
                # Leave one core to the copier: torch's thread pool spins at its barriers and
                # loses several-fold when a kernel copy takes one of its cores.
                self._threads = torch.get_num_threads()
                torch.set_num_threads(max(1, min(self._threads, (os.cpu_count() or 2) - 1)))
            computed = [t for f in self.plan.files for t in f.tensors if not t.raw_copy]
            pin = device != "cpu"
            if computed:
                in_size = max(t.src.nbytes for t in computed)
                count = min(_READ_BUFFERS if in_size <= _LARGE else 2, len(computed))
                for _ in range(count):
                    self.read.put(torch.empty(in_size, dtype=torch.uint8, pin_memory=pin))
                widened = [t for t in computed if t.out_nbytes > t.src.nbytes]
                if widened:
                    out_size = max(t.out_nbytes for t in widened)
                    self.wide.put(torch.empty(out_size, dtype=torch.uint8, pin_memory=pin))
            self.device = device

    def close(self) -> None:
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)
            self._threads = None


class _Worker(threading.Thread):
    """Runs ``fn``; an exception is kept for the caller and stops the other workers."""

    def __init__(self, fn, stop: threading.Event):
        super().__init__(daemon=True)
        self.fn, self.stop, self.error = fn, stop, None

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # handed to the caller, which re-raises it
            self.error = exc
            self.stop.set()


def _get(q: queue.Queue, stop: threading.Event):
    """q.get() that gives up (returns _DONE) once another stage has failed."""
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            if stop.is_set():
                return _DONE


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            pass


def _write_file(fp: FilePlan, dest: Path, fds: dict[Path, int], progress, engine: _Engine) -> int:
    base = len(fp.header)
    copies: list[list] = []  # [src file, src offset, dst offset, length], consecutive runs joined
    computes: list[TensorPlan] = []
    for tp in fp.tensors:
        if tp.raw_copy:
            last = copies[-1] if copies else None
            if (
                last
                and last[0] == tp.src.file
                and last[1] + last[3] == tp.src.start
                and last[2] + last[3] == base + tp.out_start
            ):
                last[3] += tp.src.nbytes
            else:
                copies.append([tp.src.file, tp.src.start, base + tp.out_start, tp.src.nbytes])
        else:
            computes.append(tp)
    stop = threading.Event()
    finished = threading.Event()  # every stage that writes is done
    more = threading.Condition()  # notified as bytes are written, for the flusher
    written = [0]
    flushed = [0]
    loaded: queue.Queue = queue.Queue()  # (tensor, buffer): as many as the read pool holds
    merged: queue.Queue = queue.Queue()  # (tensor, result, buffer, its pool)

    with open(dest, "wb") as fh:
        fd = fh.fileno()
        _pwrite_all(fd, fp.header, 0)
        os.ftruncate(fd, fp.size)

        def wrote(n: int, label: str | None) -> None:
            progress(n, label)
            with more:
                written[0] += n
                if written[0] - flushed[0] >= _FLUSH_EVERY:
                    more.notify()

        def copier() -> None:
            for src, src_off, dst_off, length in copies:
                if stop.is_set():
                    return
                _copy_range(fds[src], fd, src_off, dst_off, length)
                wrote(length, None)

        def reader() -> None:
            for tp in computes:
                buf = _get(engine.read, stop)
                if buf is _DONE:
                    return
                view = buf[: tp.src.nbytes]
                _read_into(tp, fds[tp.src.file], view)
                _put(loaded, (tp, view, buf), stop)

        def merger() -> None:
            scratch = _Scratch(engine.device)
            for _ in computes:
                item = _get(loaded, stop)
                if item is _DONE:
                    return
                tp, raw, buf = item
                if tp.out_nbytes <= tp.src.nbytes:  # merged in place
                    _compute(tp, raw, buf[: tp.out_nbytes], engine.device, scratch)
                    _put(merged, (tp, buf[: tp.out_nbytes], buf, engine.read), stop)
                    continue
                out = _get(engine.wide, stop)
                if out is _DONE:
                    return
                _compute(tp, raw, out[: tp.out_nbytes], engine.device, scratch)
                engine.read.put(buf)
                _put(merged, (tp, out[: tp.out_nbytes], out, engine.wide), stop)

        def writer() -> None:
            for _ in computes:
                item = _get(merged, stop)
                if item is _DONE:
                    return
                tp, data, buf, pool = item
                _pwrite_all(fd, data.numpy(), base + tp.out_start)
                pool.put(buf)
                wrote(tp.out_nbytes, tp.name)

        def flusher() -> None:
            # Starts writeback of what is written every _FLUSH_EVERY bytes, in its own thread
            # so that no stage waits on the disk: the final fsync then finds little left.
            while True:
                with more:
                    while written[0] - flushed[0] < _FLUSH_EVERY and not (
                        finished.is_set() or stop.is_set()
                    ):
                        more.wait(0.5)
                    if finished.is_set() or stop.is_set():
                        return
                    flushed[0] = written[0]
                os.fdatasync(fd)

        # The copier and flusher first: they need no torch, which the engine may be importing.
        stages = [_Worker(copier, stop)]
        workers = [_Worker(flusher, stop), *stages]
        for w in workers:
            w.start()
        try:
            if computes:
                engine.ready()
                more_stages = [_Worker(fn, stop) for fn in (reader, merger, writer)]
                stages += more_stages
                workers += more_stages
                for w in more_stages:
                    w.start()
            for w in stages:
                while w.is_alive():
                    w.join(0.2)
            with more:
                finished.set()
                more.notify()
            while workers[0].is_alive():
                workers[0].join(0.2)
        finally:
            stop.set()
            for w in workers:
                w.join(5)
        for w in workers:
            if w.error is not None:
                raise w.error
    return fp.size


def merge(
    base_path: str | os.PathLike,
    inputs: list[AdapterInput],
    out: str | os.PathLike,
    *,
    dtype: str = "same",
    device: str = "auto",
    force: bool = False,
    strict: bool = False,
    progress: Callable[[int, str | None], None] | None = None,
) -> MergeResult:
    """Plan and run a merge (negative weights unmerge). See ``plan_merge``."""
    plan = plan_merge(
        base_path, inputs, out, dtype=dtype, device=device, force=force, strict=strict
    )
    return execute(plan, progress)


# -- round-trip check ---------------------------------------------------------------------


def ulp_distance(a, b):
    """Elementwise distance in units in the last place between two tensors of one float dtype.

    The bit patterns are mapped to integers that are ordered like the values (sign-magnitude to
    two's complement), so the difference counts the representable values between a and b.
    """
    import torch

    ints = {
        torch.float16: torch.int16,
        torch.bfloat16: torch.int16,
        torch.float32: torch.int32,
        torch.float64: torch.int64,
    }
    it = ints[a.dtype]
    bits = {torch.int16: 16, torch.int32: 32, torch.int64: 64}[it]
    sign = 1 << (bits - 1)

    def ordered(t):
        i = t.contiguous().view(it).to(torch.int64)
        if bits < 64:
            i = torch.where(i < 0, -(i + sign), i)  # clear the sign bit, negate
        else:
            i = torch.where(i < 0, -(i & (sign - 1)), i)
        return i

    return (ordered(a) - ordered(b)).abs()


def compare_bases(result_path: str | os.PathLike, reference_path: str | os.PathLike) -> dict:
    """max abs error, max ulp error, tensors checked and exact, between two bases."""
    import torch

    from .tensors.io import read_tensor

    res = read_base(result_path)
    ref = read_base(reference_path)
    missing = sorted(set(ref.tensors) ^ set(res.tensors))
    if missing:
        raise ValidationError(
            "the two models hold different tensors", file=result_path, tensor=missing[0]
        )
    max_abs = 0.0
    max_ulp = 0
    at_scale = 0.0
    exact = 0
    elements = within = 0
    worst = None
    for name, rinfo in ref.tensors.items():
        oinfo = res.tensors[name]
        if oinfo.shape != rinfo.shape:
            raise ValidationError(
                f"shape {list(oinfo.shape)} vs {list(rinfo.shape)}", file=result_path, tensor=name
            )
        a = read_tensor(oinfo)
        b = read_tensor(rinfo)
        elements += b.numel()
        if a.dtype == b.dtype and torch.equal(
            a.view(torch.uint8) if a.dtype.is_floating_point else a,
            b.view(torch.uint8) if b.dtype.is_floating_point else b,
        ):
            exact += 1
            within += b.numel()
            continue
        if not a.dtype.is_floating_point:
            raise ValidationError("integer tensor differs", file=result_path, tensor=name)
        err = (a.double() - b.double()).abs().max().item()
        if err > max_abs:
            max_abs, worst = err, name
        ulps = ulp_distance(a if a.dtype == b.dtype else a.to(b.dtype), b)
        max_ulp = max(max_ulp, int(ulps.max().item()))
        within += int((ulps <= 1).sum().item())
        # An ulp near zero is tiny: a weight of 1e-9 restored as 1e-9 + 1e-16 is thousands
        # of its own ulps off. Measured in ulps of the tensor's largest magnitude instead,
        # the error says how it compares with the rounding the tensor's values live with.
        top = float(b.abs().max())
        if top > 0 and math.isfinite(top):
            step = torch.finfo(b.dtype).eps * 2.0 ** (math.frexp(top)[1] - 1)  # ulp(top)
            at_scale = max(at_scale, err / step)
    return {
        "max_abs_error": max_abs,
        "max_ulp_error": max_ulp,
        "tensors_checked": len(ref.tensors),
        "tensors_exact": exact,
        "elements_checked": elements,
        "elements_within_1_ulp": within,
        "max_error_in_ulps_at_tensor_scale": round(at_scale, 4),
        "worst_tensor": worst,
    }


# -- in-memory API ------------------------------------------------------------------------


def _state(target) -> dict:
    if hasattr(target, "state_dict") and hasattr(target, "named_parameters"):
        return target.state_dict(keep_vars=True)
    return target


def merge_into(target, adapter: Adapter, weight: float = 1.0) -> list[str]:
    """Add ``weight``·ΔW of ``adapter`` into an nn.Module or a state dict, in place.

    Each weight stays on its device and dtype; the sum is taken in float32 there and rounded
    once. Returns the names of the tensors changed. Nothing changes if any module fails to
    resolve or fit, or if a result would hold NaN/Inf.
    """
    import torch

    state = _state(target)
    resolved = resolve(adapter, state, source="adapter")
    updates = {}
    with torch.no_grad():
        for name, mod in resolved.modules.items():
            t = state[name]
            data = (t.data if isinstance(t, torch.nn.Parameter) else t).contiguous()
            work = torch.float64 if data.dtype == torch.float64 else torch.float32
            rows = data.shape[0] if data.dim() else 1
            new = torch.empty_like(data)
            # the file engine's blockwise sum: no dense ΔW, no float32 copy of the weight
            terms = _factor_terms([(mod, weight)], data.device, work)
            scratch = _Scratch(data.device)
            if not _add_deltas(data.view(rows, -1), new.view(rows, -1), terms, work, scratch):
                raise ValidationError("the merged weight contains NaN or Inf", tensor=name)
            updates[name] = new
        for name, new in updates.items():
            t = state[name]
            (t.data if isinstance(t, torch.nn.Parameter) else t).copy_(new)
    return list(updates)


def unmerge_from(target, adapter: Adapter, weight: float = 1.0) -> list[str]:
    """Subtract what ``merge_into(target, adapter, weight)`` added."""
    return merge_into(target, adapter, -weight)
