"""Saving and loading checkpoints in nanochat's layout (paths: trainer/layout.py).

A save has two halves. On the training loop: wait for the previous write,
check free disk space, take references to the state and copy the small parts
(meta, data position, RNG). In a background thread: copy the tensors into CPU
buffers kept from the previous save, then write each file to its hidden temp
name, fsync, rename, directory fsync, and the meta last, since the meta is what
makes a checkpoint complete (`layout.is_complete`). The loop goes on with the
next forward/backward during the copy and blocks only if the copy is not done
by the next optimizer step (`wait_copied`), the first moment a tensor of the
saved state changes.
A kill at any instant leaves either the previous checkpoints or a complete new
one, plus at worst hidden temp files or a meta-less step that resume skips.

Loading uses `torch.load(weights_only=True)` only. The meta records the size of
each file so that a truncated file is recognised without unpickling it, and
resume falls back to the previous complete checkpoint. This module does not
decide when to save (train.py) and never deletes checkpoints (retention does);
it removes only its own temp files and the files of a save that failed.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from trainer import layout

FORMAT = 1


class DiskWaitAborted(Exception):
    """A stop signal arrived while waiting for disk space; nothing was saved."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024
    return f"{n}B"


def copy_to_cpu(obj, reuse=None):
    """A deep copy with every tensor in CPU memory, reusing `reuse`'s tensors where shapes match.

    Reusing the previous snapshot's buffers matters: fresh memory costs page
    faults (a 240 MB state took ~600 ms to copy fresh, ~60 ms into warm buffers),
    and this copy is the only time a save blocks the loop.
    """
    if isinstance(obj, torch.Tensor):
        out = reuse
        if not (isinstance(out, torch.Tensor) and out.shape == obj.shape and out.dtype == obj.dtype):
            out = torch.empty(obj.shape, dtype=obj.dtype, device="cpu", pin_memory=obj.is_cuda)
        out.copy_(obj.detach(), non_blocking=obj.is_cuda)
        return out
    if isinstance(obj, dict):
        reuse = reuse if isinstance(reuse, dict) else {}
        return {k: copy_to_cpu(v, reuse.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        reuse = reuse if isinstance(reuse, (list, tuple)) and len(reuse) == len(obj) else [None] * len(obj)
        return type(obj)(copy_to_cpu(v, r) for v, r in zip(obj, reuse))
    return obj


def snapshot(model_sd: dict, optim_payload: dict, reuse: tuple | None = None) -> tuple[dict, dict]:
    reuse = reuse or (None, None)
    snap = copy_to_cpu(model_sd, reuse[0]), copy_to_cpu(optim_payload, reuse[1])
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the non_blocking copies must land before the thread reads them
    return snap


def free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def disk_reserve() -> int:
    try:
        return max(0, int(os.environ.get("NANOD_DISK_RESERVE", "0")))
    except ValueError:
        return 0


def disk_poll() -> float:
    try:
        return max(0.05, float(os.environ.get("NANOD_DISK_POLL", "5")))
    except ValueError:
        return 5.0


def wait_for_disk(ckpt_dir: Path, step: int, estimate: int, should_abort) -> None:
    """Block until estimate + NANOD_DISK_RESERVE bytes are free; the paused/resumed lines go to stdout."""
    need = estimate + disk_reserve()
    free = free_bytes(ckpt_dir)
    if free >= need:
        return
    print(f"paused: waiting for disk space before saving step {step}: need {human_bytes(need)} free {human_bytes(free)}",
          flush=True)
    while free_bytes(ckpt_dir) < need:
        if should_abort():
            raise DiskWaitAborted(f"stopped while waiting for disk space; step {step} was not saved")
        time.sleep(disk_poll())
    print("resumed: disk space available", flush=True)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(final: Path, write) -> int:
    tmp = layout.temp_path(final)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final.stat().st_size


def write_checkpoint(ckpt_dir: Path, step: int, model_sd: dict, optim_payload: dict, meta: dict,
                     slow_ms: int = 0) -> int:
    """Write one checkpoint (model, optim rank 0, meta last); returns its bytes on disk."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # an older checkpoint of the same step stops being complete before its files are replaced
    layout.meta_path(ckpt_dir, step).unlink(missing_ok=True)
    pause = (lambda: time.sleep(slow_ms / 1000)) if slow_ms > 0 else (lambda: None)
    written = [layout.model_path(ckpt_dir, step), layout.optim_path(ckpt_dir, step, 0)]
    try:
        sizes = {written[0].name: _write_file(written[0], lambda f: torch.save(model_sd, f))}
        pause()
        sizes[written[1].name] = _write_file(written[1], lambda f: torch.save(optim_payload, f))
        pause()
        _fsync_dir(ckpt_dir)
        meta = {**meta, "nanod": {**meta.get("nanod", {}), "files": sizes}}
        mp = layout.meta_path(ckpt_dir, step)
        _write_file(mp, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        _fsync_dir(ckpt_dir)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            for p in written:  # a meta-less step only takes space; the previous checkpoint is untouched
                p.unlink(missing_ok=True)
        raise
    return sum(sizes.values()) + mp.stat().st_size


class CheckpointWriter:
    """One background write at a time; submit() and wait() block until the previous one is done."""

    def __init__(self, should_abort, slow_ms: int = 0):
        self.should_abort, self.slow_ms = should_abort, slow_ms
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_bytes = 0
        self.last_step: int | None = None
        self._buffers: tuple | None = None  # CPU copies, reused by the next save
        self._copied = threading.Event()

    def submit(self, ckpt_dir: Path, step: int, model_sd: dict, optim_payload: dict, meta: dict) -> None:
        """Start saving the live state: the thread copies it into CPU buffers, then writes.

        The caller must not change any tensor of the state until `wait_copied()`
        returns (the trainer calls it just before the next optimizer step, so the
        copy overlaps the next forward/backward). `meta` must already be a copy.
        """
        self.wait()
        self._copied.clear()
        self._thread = threading.Thread(target=self._run, args=(ckpt_dir, step, model_sd, optim_payload, meta),
                                        name=f"checkpoint-{step}", daemon=False)
        self._thread.start()

    def wait_copied(self) -> None:
        """Block until the save in flight (if any) has its own copy of the state."""
        if self._thread is not None:
            self._copied.wait()

    def wait(self) -> None:
        """Block until the save in flight is on disk; re-raise its error here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    def _run(self, ckpt_dir, step, model_sd, optim_payload, meta) -> None:
        t0 = time.monotonic()
        try:
            try:
                self._buffers = snapshot(model_sd, optim_payload, self._buffers)
            finally:
                self._copied.set()
            model_sd, optim_payload = self._buffers
            while True:
                try:
                    self.last_bytes = write_checkpoint(ckpt_dir, step, model_sd, optim_payload, meta, self.slow_ms)
                    break
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    estimate = max(self.last_bytes, estimate_bytes(model_sd, optim_payload))
                    need = estimate + disk_reserve()
                    print(f"paused: waiting for disk space before saving step {step}: need {human_bytes(need)} "
                          f"free {human_bytes(free_bytes(ckpt_dir))}", flush=True)
                    # wait until the estimate fits, then retry; the guard prints the resumed line
                    _wait_quiet(ckpt_dir, need, self.should_abort, step)
                    print("resumed: disk space available", flush=True)
            self.last_step = step
            print(f"saved checkpoint step {step} ({human_bytes(self.last_bytes)}, {time.monotonic() - t0:.2f}s): "
                  f"{layout.model_path(ckpt_dir, step)}", file=sys.stderr, flush=True)
        except BaseException as e:  # handed to the loop by wait()
            self._error = e


def _wait_quiet(ckpt_dir: Path, need: int, should_abort, step: int) -> None:
    while free_bytes(ckpt_dir) < need:
        if should_abort():
            raise DiskWaitAborted(f"stopped while waiting for disk space; step {step} was not saved")
        time.sleep(disk_poll())


def estimate_bytes(model_sd: dict, optim_payload: dict | None = None) -> int:
    """Bytes a checkpoint will take: tensor bytes of the state, with a little for pickling."""
    def tensor_bytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0
    return int((tensor_bytes(model_sd) + tensor_bytes(optim_payload or {})) * 1.02) + 65536


# ---------------------------------------------------------------- loading

def verify(ckpt_dir: Path, step: int) -> str | None:
    """None when the checkpoint is complete (layout's one definition, sizes included), else why not."""
    return layout.why_incomplete(ckpt_dir, step)


def load_checkpoint(ckpt_dir: Path, step: int, device, *, with_optim: bool = True):
    """(model state, optim payload or None, meta); raises ValueError naming the file when unreadable."""
    problem = verify(ckpt_dir, step)
    if problem:
        raise ValueError(f"checkpoint step {step} in {ckpt_dir} is not usable: {problem}")
    meta = layout.read_meta(ckpt_dir, step)
    paths = [layout.model_path(ckpt_dir, step)] + ([layout.optim_path(ckpt_dir, step, 0)] if with_optim else [])
    loaded = []
    for p in paths:
        try:
            loaded.append(torch.load(p, map_location=device, weights_only=True))
        except Exception as e:
            raise ValueError(f"checkpoint file {p} is unreadable: {str(e).splitlines()[0] if str(e) else e!r}") from None
    return loaded[0], (loaded[1] if with_optim else None), meta


def newest_usable(ckpt_dir: Path, device, *, with_optim: bool = True):
    """The newest checkpoint that loads: (step, model, optim, meta) or None; skipped ones are warned about."""
    for step in reversed(layout.list_steps(ckpt_dir)):
        try:
            model_sd, optim, meta = load_checkpoint(ckpt_dir, step, device, with_optim=with_optim)
        except ValueError as e:
            print(f"warning: skipping checkpoint step {step}: {e}", file=sys.stderr, flush=True)
            continue
        return step, model_sd, optim, meta
    return None


def remove_stale_temps(ckpt_dir: Path) -> None:
    """Hidden temp files left by a writer that died (its pid is gone); never a checkpoint file."""
    try:
        names = os.listdir(ckpt_dir)
    except OSError:
        return
    for name in names:
        if not layout.is_temp(Path(name)):
            continue
        pid = name[:-len(layout.TEMP_SUFFIX)].rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            (Path(ckpt_dir) / name).unlink(missing_ok=True)
