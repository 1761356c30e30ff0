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

Under torchrun every rank saves together: rank 0 writes the model and
`optim_N_rank0.pt` (the whole optimizer state: it is replicated, so one copy
is enough), every other rank writes `optim_N_rank<r>.pt` with only its own
RNG state. The writer threads then agree (their own gloo group) that every
rank's file is on disk; only then does rank 0 write the meta, which records the
world size and every file's size, and a second agreement keeps each rank in
the save until the meta has landed (an emergency stop must not exit early).

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
    """Write one checkpoint of one process (model, optim rank 0, meta last); returns its bytes on disk."""
    sizes = write_rank_files(ckpt_dir, step, model_sd, optim_payload, slow_ms)
    return sum(sizes.values()) + write_meta(ckpt_dir, step, meta, sizes)


def write_rank_files(ckpt_dir: Path, step: int, model_sd: dict | None, optim_payload: dict, slow_ms: int = 0,
                     *, rank: int = 0) -> dict[str, int]:
    """This rank's files of a checkpoint (rank 0: the model and optim rank 0; rank r: optim rank r).

    Returns {file name: bytes}. ENOSPC removes what this call wrote and re-raises.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    # an older checkpoint of the same step stops being complete before its files are replaced
    layout.meta_path(ckpt_dir, step).unlink(missing_ok=True)
    pause = (lambda: time.sleep(slow_ms / 1000)) if slow_ms > 0 else (lambda: None)
    todo = ([(layout.model_path(ckpt_dir, step), model_sd)] if rank == 0 else []) + \
        [(layout.optim_path(ckpt_dir, step, rank), optim_payload)]
    sizes: dict[str, int] = {}
    try:
        for path, obj in todo:
            sizes[path.name] = _write_file(path, lambda f, obj=obj: torch.save(obj, f))
            pause()
        _fsync_dir(ckpt_dir)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            for path, _ in todo:  # a meta-less step only takes space; the previous checkpoint is untouched
                path.unlink(missing_ok=True)
        raise
    return sizes


def write_meta(ckpt_dir: Path, step: int, meta: dict, sizes: dict[str, int]) -> int:
    """The meta, last: it makes the checkpoint complete. `sizes` names every rank's files."""
    meta = {**meta, "nanod": {**meta.get("nanod", {}), "files": sizes}}
    mp = layout.meta_path(ckpt_dir, step)
    _write_file(mp, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    _fsync_dir(ckpt_dir)
    return mp.stat().st_size


class PeerSaveFailed(RuntimeError):
    """Another rank could not write its part of a checkpoint; this step has no meta."""


class CheckpointWriter:
    """One background write at a time; submit() and wait() block until the previous one is done."""

    def __init__(self, should_abort, slow_ms: int = 0, group=None):
        self.should_abort, self.slow_ms = should_abort, slow_ms
        self.group = group  # trainer.distributed.Group under torchrun: every rank saves together
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
        group = self.group
        together = group is not None and group.active
        rank = group.rank if together else 0
        try:
            if together and group.device is not None and group.device.type == "cuda":
                torch.cuda.set_device(group.device)  # a new thread starts on GPU 0, not on this rank's
            try:
                self._buffers = snapshot(model_sd, optim_payload, self._buffers)
            finally:
                self._copied.set()
            model_sd, optim_payload = self._buffers
            estimate = lambda: max(self.last_bytes, estimate_bytes(model_sd, optim_payload))  # noqa: E731
            write_own = lambda: write_rank_files(ckpt_dir, step, model_sd, optim_payload,  # noqa: E731
                                                 self.slow_ms, rank=rank)
            if together:
                sizes = self._save_together(ckpt_dir, step, meta, write_own, estimate)
            else:
                sizes = self._retry_on_enospc(ckpt_dir, step, write_own, estimate)
                sizes[layout.meta_path(ckpt_dir, step).name] = self._retry_on_enospc(
                    ckpt_dir, step, lambda: write_meta(ckpt_dir, step, meta, sizes), estimate)
            self.last_bytes = sum(sizes.values())
            self.last_step = step
            if rank == 0:
                print(f"saved checkpoint step {step} ({human_bytes(self.last_bytes)}, {time.monotonic() - t0:.2f}s): "
                      f"{layout.model_path(ckpt_dir, step)}", file=sys.stderr, flush=True)
        except BaseException as e:  # handed to the loop by wait()
            self._error = e

    def _save_together(self, ckpt_dir, step, meta, write_own, estimate) -> dict[str, int]:
        """Under torchrun: every rank's files, an agreement, rank 0's meta, a second agreement.

        Each rank takes part in both agreements whatever happened to its own
        writes (an error is raised only after them), or its peers would wait.
        """
        group = self.group
        error: BaseException | None = None
        sizes: dict[str, int] = {}
        try:
            sizes = self._retry_on_enospc(ckpt_dir, step, write_own, estimate)
        except Exception as e:
            error = e
        if not group.all_in_writer(error is None):
            raise error or PeerSaveFailed(f"another rank could not write its part of checkpoint step {step}")
        if group.is_main:
            try:
                every = dict(sizes)
                for r in range(1, group.world_size):
                    path = layout.optim_path(ckpt_dir, step, r)
                    every[path.name] = path.stat().st_size
                sizes[layout.meta_path(ckpt_dir, step).name] = self._retry_on_enospc(
                    ckpt_dir, step, lambda: write_meta(ckpt_dir, step, meta, every), estimate)
            except Exception as e:
                error = e
        if not group.all_in_writer(error is None):  # no rank leaves the save before the meta has landed
            raise error or PeerSaveFailed(f"rank 0 could not write the meta of checkpoint step {step}")
        return sizes

    def _retry_on_enospc(self, ckpt_dir, step, write, estimate):
        """write(); after ENOSPC, print the paused line, wait until the estimate fits, and write again."""
        while True:
            try:
                return write()
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
            need = estimate() + disk_reserve()
            print(f"paused: waiting for disk space before saving step {step}: need {human_bytes(need)} "
                  f"free {human_bytes(free_bytes(ckpt_dir))}", flush=True)
            _wait_quiet(ckpt_dir, need, self.should_abort, step)
            print("resumed: disk space available", flush=True)


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


def load_checkpoint(ckpt_dir: Path, step: int, device, *, with_optim: bool = True, rank: int = 0):
    """(model state, optim payload or None, meta); raises ValueError naming the file when unreadable.

    The optimizer state is rank 0's file (it holds the whole, replicated state);
    `rank`'s own file adds that rank's RNG state when the checkpoint has one for
    it (a checkpoint of fewer ranks has none for the extra ones).
    """
    problem = verify(ckpt_dir, step)
    if problem:
        raise ValueError(f"checkpoint step {step} in {ckpt_dir} is not usable: {problem}")
    meta = layout.read_meta(ckpt_dir, step)
    model_sd = _load(layout.model_path(ckpt_dir, step), device)
    if not with_optim:
        return model_sd, None, meta
    optim = _load(layout.optim_path(ckpt_dir, step, 0), device)
    if rank > 0:
        own = layout.optim_path(ckpt_dir, step, rank)
        rng = _load(own, device).get("rng") if rank < layout.expected_ranks(meta) else None
        optim = {**optim, "rng": rng or {}}
    return model_sd, optim, meta


def _load(path: Path, device):
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint file {path} is unreadable: {str(e).splitlines()[0] if str(e) else e!r}") from None


def newest_usable(ckpt_dir: Path, device, *, with_optim: bool = True, rank: int = 0, quiet: bool = False):
    """The newest checkpoint that loads: (step, model, optim, meta) or None; skipped ones are warned about."""
    for step in reversed(layout.list_steps(ckpt_dir)):
        try:
            model_sd, optim, meta = load_checkpoint(ckpt_dir, step, device, with_optim=with_optim, rank=rank)
        except ValueError as e:
            if not quiet:
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
