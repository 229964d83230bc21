"""The streaming merge engine: executes a MergePlan (``plan.py``), one tensor at a time.

The plan fixed every output tensor's steps, shape, dtype and offset before a byte is written;
the engine writes each output file by position (every offset is known from the header):

- a tensor no adapter touches is copied byte for byte with ``copy_file_range`` (the kernel
  moves the pages; nothing is decoded), consecutive ones as one range;
- a touched tensor is read once, widened to float32 on the device, goes through its steps
  (``ops.py``: ΔW added from the factors in float32, DoRA re-normalised, replaced, …), is
  checked for NaN/Inf, rounded once to the output dtype and written once.

A copier moves the untouched tensors while a reader, a merger and a writer handle the touched
ones through a small pool of reused buffers (pinned on CUDA), so disk and compute overlap and
memory stays near a few tensors whatever the model's size; a flusher starts writeback as the
file grows. Planning needs no torch (adapters can be read from their headers, see
``load_adapter(lazy=True)``): the copy starts at once and torch is imported while it runs.

Outputs go to a temporary directory beside OUT and are renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ValidationError
from ..fsutil import atomic_dir, atomic_file, contained_target, copy_contained
from .plan import FilePlan, MergePlan, TensorPlan, base_file_roots, pick_device
from .quant import run_group, summarize
from .records import RECORDS_KEY, SIDECAR, fill_records

_COPY_CHUNK = 64 << 20


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
    # one entry per tensor that is not a raw copy: name, op and steps (the audit)
    tensors: list[dict] = field(default_factory=list)
    # a quantized base: its scheme, and the worst error a rewritten weight carries
    quantization: dict | None = None
    # a base read from the Hub: repo, revision, commit, the cache snapshot and what was fetched
    base_source: dict | None = None

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
            "tensors": self.tensors,
            **({"quantization": self.quantization} if self.quantization else {}),
            **({"base_source": self.base_source} if self.base_source else {}),
        }


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


def _as_bytes(t):
    """A tensor's bytes, for pwrite (float8 and uint8 alike)."""
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()


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


def _compute(tp: TensorPlan, raw, out, device: str, scratch: _Scratch) -> list[dict]:
    """out ← round(steps(W)): W widened to float32 on ``device``, its steps applied, rounded once.
    Returns the values of the steps' records (``records.py``), in order.

    ``raw`` holds W's bytes (empty when no step reads W) and ``out`` receives the result's
    (uint8 tensors on the host). ``out`` may be ``raw`` itself when the output is no larger:
    each block of rows is taken into the float32 accumulator before its result is stored, and
    a result row never lies beyond the input rows already taken.
    """
    import torch

    from ..tensors.io import torch_dtype

    if tp.numel == 0:
        return []
    out_dtype = torch_dtype(tp.out_dtype)
    shape = tp.shape
    rows = shape[0] if shape else 1
    w2 = None
    if tp.steps_read_input:
        w = raw.view(torch_dtype(tp.src.dtype))
        if device != "cpu":
            w = w.to(device, non_blocking=True)
        w2 = w.view(rows, -1)
    res = (
        out.view(out_dtype).view(rows, -1)
        if device == "cpu"
        else torch.empty((rows, tp.numel // rows), dtype=out_dtype, device=device)
    )
    wide = "F64" in (tp.src.dtype if tp.src is not None else "", tp.out_dtype)
    work = torch.float64 if wide else torch.float32
    records = []
    if tp.keeps_original:  # before ``out`` (which may be ``raw``) is written
        sha = hashlib.sha256(memoryview(raw.numpy())).hexdigest()
    prepared = [s.prepare(res.device, work) for s in tp.steps]
    whole = not all(s.blockwise for s in tp.steps)
    if not run_steps(
        w2 if tp.steps_read_input else None, res, prepared, work, scratch, whole=whole
    ):
        raise ValidationError(
            "the merged weight contains NaN or Inf",
            file=tp.src.file if tp.src is not None else None,
            tensor=tp.name,
        )
    for s, p in zip(tp.steps, prepared, strict=True):
        if s.record_template() is None:
            continue
        rec = p.record() or {}
        if s.op == "replace":
            rec = {"sha256": sha}
        records.append(rec)
    if device != "cpu":
        out.view(out_dtype).view(rows, -1).copy_(res, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
    return records


def run_steps(w2, res, prepared, work, scratch: _Scratch, *, whole: bool = False) -> bool:
    """res ← round(steps(w2)), a block of rows at a time in ``work`` precision (or the whole
    tensor at once when a step needs it).

    ``w2`` (None when no step reads W) and ``res`` are 2-D views with the same rows, on one
    device; ``res`` may alias ``w2`` (see _compute). Returns whether every value is finite,
    checked once at the end (one sync on a GPU).
    """
    import torch

    rows, cols = res.shape
    if whole:
        step = max(1, rows)
    else:
        # Blocks that stay in cache on the CPU; on a GPU, few large ones (memory is plentiful
        # and every launch costs).
        block = _BLOCK_ELEMS if res.device.type == "cpu" else _GPU_BLOCK_ELEMS
        step = max(1, block // max(1, cols))
    finite = []  # per block, on the device
    for i in range(0, rows, step):
        n = min(step, rows - i)
        acc = scratch.block(n, cols, work)
        if w2 is not None:
            acc.copy_(w2[i : i + n])
        for p in prepared:
            if whole:
                p.apply_full(acc)
            else:
                p.apply_block(acc, i, i + n)
        if prepared:
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
            atomic_file(plan.out, force=plan.force)
            if plan.single_file
            else atomic_dir(plan.out, force=plan.force)
        )
        with ctx as tmp:
            for fp in plan.files:
                dest = tmp if plan.single_file else tmp / fp.name
                if not plan.single_file:
                    dest.parent.mkdir(parents=True, exist_ok=True)  # components in subfolders
                written += _write_file(fp, dest, fds, report, engine)
            if not plan.single_file:
                if plan.index is not None:
                    (tmp / plan.base.index_path.name).write_text(
                        json.dumps(plan.index, indent=2) + "\n"
                    )
                for rel, doc in plan.indexes:  # a pipeline's sharded components
                    (tmp / rel).write_text(json.dumps(doc, indent=2) + "\n")
                # Checked again as they are copied: a link swapped in since the plan is refused.
                roots = base_file_roots(plan.base)
                if plan.keep_originals:
                    _write_sidecar(plan, tmp / SIDECAR, engine.originals)
                for p in plan.extra_files:
                    rel = p.relative_to(plan.base.root)
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    if rel == Path("config.json") and (plan.config_updates or plan.config_drop):
                        real = contained_target(p, roots)
                        if real is None:
                            raise ValidationError(
                                "is a link to outside the model directory; not copied", file=p
                            )
                        write_config(real, tmp / rel, plan.config_updates, plan.config_drop)
                    else:
                        copy_contained(p, tmp / rel, roots)
    finally:
        for fd in fds.values():
            os.close(fd)
        engine.close()
    changed = plan.touched
    total = sum(len(f.tensors) + len(f.groups) for f in plan.files)
    device = engine.device or (plan.device if plan.device != "auto" else "cpu")
    audit = plan.audit()
    quantization = None
    if plan.quant is not None:
        reports = {r["name"]: r for r in engine.quant_reports}
        for entry in audit:
            r = reports.get(entry["name"])
            if r is not None:
                entry.update({k: v for k, v in r.items() if k != "name"})
        quantization = {
            "scheme": plan.quant.scheme,
            "description": plan.quant.describe(),
            "mode": "dequantize" if plan.config_drop else "requantize",
            "weights": len(plan.quant.weights),
            "weights_rewritten": len(plan.groups),
            **(summarize(list(reports.values())) or {}),
        }
    return MergeResult(
        plan.out,
        device,
        changed,
        total - changed,
        written,
        time.perf_counter() - t0,
        list(plan.warnings),
        engine.import_seconds,
        audit,
        quantization,
    )


def write_config(src: Path, dest: Path, updates: dict, drop: tuple[str, ...] = ()) -> None:
    """config.json with some keys set or dropped (as transformers writes it: indent 2,
    sorted keys)."""
    try:
        config = json.loads(src.read_text())
    except (OSError, ValueError) as exc:
        raise ValidationError("cannot update config.json: not valid JSON", file=src) from exc
    config.update(updates)
    for key in drop:
        config.pop(key, None)
    dest.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


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
        self.quant_reports: list[dict] = []  # one per quantized weight rewritten
        self.originals: dict[str, tuple] = {}  # name → (TensorInfo, bytes), for --keep-originals
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
                in_size = max(1, max(t.in_nbytes for t in computed))
                count = min(_READ_BUFFERS if in_size <= _LARGE else 2, len(computed))
                for _ in range(count):
                    self.read.put(torch.empty(in_size, dtype=torch.uint8, pin_memory=pin))
                widened = [t for t in computed if t.out_nbytes > t.in_nbytes]
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
    recorded: dict[str, list[dict]] = {}  # the values of this file's unmerge records
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
                view = buf[: tp.in_nbytes]
                if tp.reads_input:
                    _read_into(tp, fds[tp.src.file], view)
                _put(loaded, (tp, view, buf), stop)

        def merger() -> None:
            scratch = _Scratch(engine.device)
            for _ in computes:
                item = _get(loaded, stop)
                if item is _DONE:
                    return
                tp, raw, buf = item
                if tp.keeps_original and engine.plan.keep_originals:
                    engine.originals[tp.name] = (tp.src, bytes(memoryview(raw.numpy())))
                if tp.out_nbytes <= tp.in_nbytes:  # merged in place
                    recorded[tp.name] = _compute(
                        tp, raw, buf[: tp.out_nbytes], engine.device, scratch
                    )
                    _put(merged, (tp, buf[: tp.out_nbytes], buf, engine.read), stop)
                    continue
                out = _get(engine.wide, stop)
                if out is _DONE:
                    return
                recorded[tp.name] = _compute(tp, raw, out[: tp.out_nbytes], engine.device, scratch)
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

        def quantizer() -> None:
            # Quantized weights, one logical weight at a time: its parts are read, decoded,
            # merged, encoded (or cast) and every output written at its planned offset.
            for group in fp.groups:
                if stop.is_set():
                    return
                outs, report = run_group(group)
                for o in group.outputs:
                    _pwrite_all(fd, _as_bytes(outs[o.name]), base + o.out_start)
                    wrote(o.nbytes, o.name)
                engine.quant_reports.append(report)

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
            if fp.groups:
                engine.ready()
                qstage = _Worker(quantizer, stop)
                stages.append(qstage)
                workers.append(qstage)
                qstage.start()
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
        if any(recorded.values()):
            _rewrite_header(fp, fd, recorded)
    return fp.size


def _rewrite_header(fp: FilePlan, fd: int, recorded: dict[str, list[dict]]) -> None:
    """The header again, with the records' placeholders filled: the same length, so every
    offset written stays right."""
    from ..tensors.io import header_bytes

    meta = dict(fp.metadata)
    meta[RECORDS_KEY] = fill_records(meta[RECORDS_KEY], recorded)
    header = header_bytes(list(fp.entries), meta)
    if len(header) != len(fp.header):
        raise ValidationError(
            f"the filled header is {len(header)} bytes, the planned one {len(fp.header)}",
            file=fp.name,
        )
    _pwrite_all(fd, header, 0)


def _write_sidecar(plan: MergePlan, dest: Path, originals: dict) -> None:
    """The replaced tensors' originals, as stored in the base (and those of the base's own
    sidecar that this merge did not replace again), for unmerge."""
    from ..tensors.io import header_bytes

    items: dict[str, tuple] = {}
    if plan.sidecar is not None:
        for name, info in plan.sidecar.tensors.items():
            with open(info.file, "rb") as fh:
                fh.seek(info.start)
                items[name] = (info, fh.read(info.nbytes))
    items.update(originals)
    entries, pos = [], 0
    for name in sorted(items):
        info, data = items[name]
        entries.append((name, info.dtype, info.shape, pos, pos + len(data)))
        pos += len(data)
    with open(dest, "wb") as fh:
        fh.write(header_bytes(entries, {"format": "pt"}))
        for name in sorted(items):
            fh.write(items[name][1])
