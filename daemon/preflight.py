"""The training safety guide's verification checklist, as code: `nanod check` and the check before each phase.

Each check is a `Check(name, level, message)` with level OK, WARN or FAIL:
GPU free memory against an estimated need, free disk against the projected
need of the checkpoints (the disk guard's number, `projected_disk_need`),
writable directories, a sane save_every, the allocator setting
(expandable_segments), unknown flags, and for mid/sft that the checkpoint it
starts from exists or an earlier phase will produce it. For runner nanochat:
the checkout and its interpreter, each phase's flags against its script's own
options (daemon/trainers/nanochat_check.py, what the inbox refuses), and a
TORCH_COMPILE_DISABLE the checkout cannot run with.

The memory and disk numbers are ESTIMATES from the plan's flags (nanochat's
sizing), documented below; a FAIL on memory says that even the estimate does
not fit. This module reads (GPU, disk, checkpoint metas); it changes nothing.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainer import layout

OK, WARN, FAIL = "OK", "WARN", "FAIL"

# ---- the estimate's constants (bytes) -------------------------------------------------------
# Weights fp32 + grads fp32 (4 + 4 per parameter). Optimizer: AdamW keeps 2 fp32
# states for the embedding and the head; Muon keeps 1 fp32 momentum per matrix.
WEIGHT_GRAD_BYTES = 8
ADAMW_STATE_BYTES = 8
MUON_STATE_BYTES = 4
# Activations saved for backward per token, per layer, per unit of width, in
# bf16 with flash attention (Korthikanti et al. 2022: ~34 * seq * batch * width).
ACTIVATION_BYTES = 34
# Logits per token per vocabulary entry: bf16 logits, their fp32 copy for the
# loss, and its gradient.
LOGIT_BYTES = 8
ALLOCATOR_OVERHEAD = 1.2           # caching allocator slack and fragmentation
CUDA_CONTEXT_BYTES = 512 * 2**20   # the CUDA context, counted by nvidia-smi, not by torch
VRAM_WARN_FRACTION = 0.85          # need above this share of free memory: WARN
# Optimistic throughput for "how long would this run be" (a fast consumer GPU):
# a save_every=-1 run fails the check only when even this fast it would run long.
OPTIMISTIC_FLOPS = 50e12
LONG_RUN_SECONDS = 300.0           # longer than this without a checkpoint: FAIL
GUIDE_SAVE_EVERY = "100-250"       # the guide's advice


@dataclass(frozen=True)
class Check:
    name: str
    level: str      # "OK" | "WARN" | "FAIL"
    message: str

    def line(self) -> str:
        return f"{self.level:<4} {self.name}: {self.message}"


# ---- the phase's effective flags ------------------------------------------------------------------

def _options():
    try:
        from trainer import options
        return options
    except ImportError:  # the trainer's flag table is not there (a nanochat-only install)
        return None


_NANOCHAT_DEFAULTS = {"depth": 20, "aspect_ratio": 64, "head_dim": 128, "vocab_size": 65536, "num_iterations": -1,
                      "save_every": -1, "save_every_minutes": -1.0, "target_param_data_ratio": 20.0,
                      "target_examples_per_step": 32, "device_type": ""}
_PHASE_DEFAULTS = {"base": {"max_seq_len": 2048, "device_batch_size": 32, "total_batch_size": 524288},
                   "mid": {"max_seq_len": "inherit", "device_batch_size": "inherit", "total_batch_size": "inherit"},
                   "sft": {"max_tokens": "inherit", "device_batch_size": 4, "total_batch_size": None}}


def phase_flags(spec, phase_index: int) -> dict:
    """The flags a phase runs with: the trainer's defaults, the phase's defaults, the job's args;
    "inherit" values and the model shape come from the previous phases of the plan."""
    opts = _options()
    flags: dict = {}
    for i, p in enumerate(spec.phases[:phase_index + 1]):
        if opts is not None:
            defaults = {f.name: f.default for f in opts.fields_of() if f.default is not dataclasses.MISSING}
            defaults.update(opts.phase_defaults(p.phase))
        else:
            defaults = {**_NANOCHAT_DEFAULTS, **_PHASE_DEFAULTS[p.phase]}
        prev = flags
        flags = {k: v for k, v in defaults.items()}
        for key, value in flags.items():
            if value == "inherit":
                flags[key] = prev.get("max_seq_len" if key == "max_tokens" else key)
        if p.phase != "base":  # the shape is the checkpoint's
            for key in ("depth", "aspect_ratio", "head_dim", "vocab_size", "max_seq_len"):
                if prev.get(key) is not None:
                    flags[key] = prev[key]
            if i == 0:
                flags.update(_shape_from_tag(spec.resolved_model_tag))
        args = dict(p.args)
        if p.phase == "sft" and "max_seq_len" in args:
            # chat_sft's max_seq_len is sft's max_tokens: one setting (trainer.options.sft_row_length)
            args.setdefault("max_tokens", args.pop("max_seq_len"))
        flags.update(args)
        if opts is not None:
            flags = {opts.normalise_flag(k): v for k, v in flags.items()}
        if p.phase == "sft" and flags.get("max_tokens") is None:
            flags["max_tokens"] = flags.get("max_seq_len") or 2048
        if p.phase != "sft" and flags.get("max_seq_len") is None:
            flags["max_seq_len"] = 2048
    return flags


def flags_with_checkpoint_shape(settings, spec, phase_index: int) -> dict:
    """phase_flags, with the model's real shape from the newest complete checkpoint of this phase or
    the one it starts from (its meta's model_config: n_layer, n_embd, vocab_size), when there is one.
    The trainer's BPE may stop well below vocab_size on small data."""
    flags = phase_flags(spec, phase_index)
    phase = spec.phases[phase_index].phase
    for p in (phase,) + layout.PREVIOUS_PHASES[phase]:
        d = _ckpt_dir(settings, spec, p)
        step = layout.latest_complete(d)
        if step is None:
            continue
        cfg = (layout.read_meta(d, step) or {}).get("model_config")
        if isinstance(cfg, dict) and all(isinstance(cfg.get(k), int) and cfg[k] > 0
                                         for k in ("n_layer", "n_embd", "vocab_size")):
            flags.update(depth=cfg["n_layer"], _n_embd=cfg["n_embd"], vocab_size=cfg["vocab_size"])
        break
    return flags


def _shape_from_tag(tag: str) -> dict:
    m = re.fullmatch(r"d(\d+)", tag or "")
    return {"depth": int(m.group(1))} if m else {}


def model_shape(flags: dict) -> tuple[int, int, int]:
    """(n_layer, n_embd, vocab) by nanochat's sizing: n_embd = depth x aspect_ratio rounded up to head_dim
    (or, once a checkpoint exists, as its meta's model_config says: see flags_with_checkpoint_shape)."""
    depth = int(flags.get("depth") or 20)
    if flags.get("_n_embd"):
        return depth, int(flags["_n_embd"]), int(flags.get("vocab_size") or 65536)
    width = depth * int(flags.get("aspect_ratio") or 64)
    head = int(flags.get("head_dim") or 128)
    width = max(head, math.ceil(width / head) * head)
    return depth, width, int(flags.get("vocab_size") or 65536)


def param_counts(flags: dict) -> tuple[int, int]:
    """(matrix params, embedding + head params): 12 L d^2 and 2 V d (untied head)."""
    n_layer, n_embd, vocab = model_shape(flags)
    return 12 * n_layer * n_embd ** 2, 2 * vocab * n_embd


def row_length(flags: dict, phase: str) -> int:
    return int((flags.get("max_tokens") if phase == "sft" else flags.get("max_seq_len")) or 2048)


def estimate_vram(flags: dict, phase: str, device_batch_size: int | None = None) -> int:
    """Bytes of GPU memory the phase needs: an estimate (see the constants above)."""
    matrices, embeddings = param_counts(flags)
    n_layer, n_embd, vocab = model_shape(flags)
    batch = device_batch_size or flags.get("device_batch_size") or 1
    batch = 1 if batch == "auto" else int(batch)   # auto: the trainer finds what fits; the least it needs
    tokens = batch * row_length(flags, phase)
    states = (matrices * (WEIGHT_GRAD_BYTES + MUON_STATE_BYTES)
              + embeddings * (WEIGHT_GRAD_BYTES + ADAMW_STATE_BYTES))
    activations = tokens * n_embd * n_layer * ACTIVATION_BYTES + tokens * vocab * LOGIT_BYTES
    return int((states + activations) * ALLOCATOR_OVERHEAD + CUDA_CONTEXT_BYTES)


def phase_shape(spec, phase_index: int) -> dict:
    """What a phase's memory per row depends on, and the device_batch_size values its total batch allows:
    {"model": (n_layer, n_embd, vocab), "row": row length, "ranks": world size, "candidates": [...]}."""
    from trainer.options import batch_candidates
    phase = spec.phases[phase_index].phase
    flags = phase_flags(spec, phase_index)
    row = row_length(flags, phase)
    return {"model": model_shape(flags), "row": row, "ranks": spec.world_size,
            "candidates": batch_candidates(_tokens_per_step(flags, phase), row, spec.world_size)}


def batch_from_estimate(flags: dict, phase: str, card_bytes: int, target: float,
                        world_size: int = 1) -> int | None:
    """device_batch_size auto without a probe (runner nanochat): the largest batch that keeps
    total_batch_size divisible and whose estimate_vram stays within target x card_bytes;
    None when even the smallest does not. An estimate, so the OOM back-off stays the backstop."""
    from trainer.options import batch_candidates
    candidates = batch_candidates(_tokens_per_step(flags, phase), row_length(flags, phase), world_size)
    fitting = [b for b in candidates if estimate_vram(flags, phase, b) <= target * card_bytes]
    return fitting[-1] if fitting else None


def estimate_checkpoint_bytes(flags: dict) -> int:
    """One checkpoint: fp32 model + optimizer state (AdamW 2 states, Muon 1)."""
    matrices, embeddings = param_counts(flags)
    return matrices * (4 + MUON_STATE_BYTES) + embeddings * (4 + ADAMW_STATE_BYTES)


def num_iterations(flags: dict, phase: str) -> int | None:
    """Optimizer steps of the phase; base's -1 is computed as nanochat does, mid/sft's -1 is unknown."""
    n = flags.get("num_iterations")
    if isinstance(n, int) and n > 0:
        return n
    if phase == "base":
        tokens_per_step = flags.get("total_batch_size") or 524288
        ratio = float(flags.get("target_param_data_ratio") or 20.0)
        return max(1, int(ratio * sum(param_counts(flags)) // int(tokens_per_step)))
    return None


def _tokens_per_step(flags: dict, phase: str) -> int:
    if flags.get("total_batch_size"):
        return int(flags["total_batch_size"])
    if phase == "sft":
        return int(flags.get("target_examples_per_step") or 32) * row_length(flags, phase)
    return 524288


def _ckpt_dir(settings, spec, phase: str) -> Path:
    return layout.checkpoint_dir(settings.checkpoint_root, phase, spec.resolved_model_tag)


# ---- disk: the guard's projection ----------------------------------------------------------------

def checkpoint_size(settings, spec, phase_index: int) -> tuple[int, str]:
    """Bytes of one checkpoint of the phase, and where the number comes from."""
    phase = spec.phases[phase_index].phase
    for p in (phase,) + layout.PREVIOUS_PHASES[phase]:
        d = _ckpt_dir(settings, spec, p)
        step = layout.latest_complete(d)
        if step is not None:
            return layout.size_of(d, step), f"the size of {layout.PHASE_DIRS[p]} step {step}"
    return estimate_checkpoint_bytes(flags_with_checkpoint_shape(settings, spec, phase_index)), "estimated from the model size"


def projected_disk_need(settings, spec, phase_index: int) -> int:
    """Free bytes the phase needs on the checkpoint filesystem.

    One checkpoint's size (the newest existing one of this phase or the one it
    starts from, else an estimate) times the checkpoints still to be written
    before retention steadies: keep_last + 1 (one is written before the oldest
    goes), less the complete ones already on disk (their space is already
    used), at least 1; plus settings.disk_margin. With keep_last unset, every
    remaining save is counted.
    """
    return _projection(settings, spec, phase_index)[0]


def _projection(settings, spec, phase_index: int) -> tuple[int, str]:
    size, source = checkpoint_size(settings, spec, phase_index)
    phase = spec.phases[phase_index].phase
    d = _ckpt_dir(settings, spec, phase)
    present = len(layout.complete_steps(d))
    keep_last = spec.retention.keep_last
    if keep_last is not None:
        count = max(1, keep_last + 1 - min(present, keep_last))
    else:
        flags = phase_flags(spec, phase_index)
        total = num_iterations(flags, phase) or 0
        done = layout.latest_complete(d) or 0
        every = flags.get("save_every") if isinstance(flags.get("save_every"), int) else -1
        count = 1 + (max(0, total - done) // every if every and every > 0 else 0)
    from daemon.units import format_size
    why = (f"{count} checkpoint{'s' if count != 1 else ''} of {format_size(size)} ({source}) "
           f"+ {format_size(settings.disk_margin)} margin")
    return size * count + settings.disk_margin, why


def disk_shortfall(settings, spec, phase_index: int) -> str | None:
    """One line when free disk on the checkpoint filesystem is below the projected need, else None."""
    from daemon.health import disk_usage
    from daemon.units import format_size
    need, why = _projection(settings, spec, phase_index)
    usage = disk_usage(settings.checkpoint_root)
    if usage["free_bytes"] >= need:
        return None
    return (f"{format_size(usage['free_bytes'])} free on {usage['path']}, the {spec.phases[phase_index].phase} "
            f"phase needs about {format_size(need)} ({why})")


# ---- the checks ------------------------------------------------------------------------------------

def check_job(settings, spec, *, gpus=None) -> list:
    """Every check for every phase of the plan, the common ones once."""
    if gpus is None:
        from daemon.gpu.vram import read_gpus
        gpus = read_gpus()
    checks = check_dirs(settings) + [c for c in [_check_runner(settings, spec)] if c is not None]
    for i in range(len(spec.phases)):
        checks += check_phase(settings, spec, i, gpus=gpus, include_common=False)
    return checks


def check_phase(settings, spec, phase_index: int, *, device_batch_size: int | None = None,
                gpus=None, include_common: bool = True) -> list:
    """The checks before one phase starts. device_batch_size: the working value after OOM back-off."""
    phase = spec.phases[phase_index].phase
    flags = flags_with_checkpoint_shape(settings, spec, phase_index)
    checks = check_dirs(settings) if include_common else []
    checks.append(_check_flags(spec, phase_index))
    checks.append(_check_compile(spec, phase_index))
    checks.append(_check_vram(settings, spec, phase_index, flags, device_batch_size, gpus))
    checks.append(_check_disk(settings, spec, phase_index))
    checks.append(_check_save_every(flags, phase, periodic=_saves_periodically(spec, phase_index)))
    checks.append(_check_allocator(spec, phase_index))
    if phase != "base":
        checks.append(_check_input(settings, spec, phase_index, flags))
    return [c for c in checks if c is not None]


def check_dirs(settings) -> list:
    return [_check_writable("checkpoint root writable", settings.checkpoint_root),
            _check_writable("home writable", settings.home)]


def _check_writable(name: str, path: Path) -> Check:
    p = Path(path).expanduser().absolute()
    target = p
    while not target.exists() and target.parent != target:
        target = target.parent
    if not target.is_dir():
        return Check(name, FAIL, f"{p}: {target} is not a directory")
    try:  # the real test: root passes os.access everywhere, a read-only mount does not
        fd, tmp = tempfile.mkstemp(prefix=".nanod-check-", dir=target)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return Check(name, FAIL, f"{p}: cannot write in {target}: {e.strerror or e}")
    return Check(name, OK, f"{p}" + ("" if target == p else f" (will be created under {target})"))


def _check_runner(settings, spec) -> Check | None:
    """A nanochat job's checkout, interpreter and environment (its flags: per phase, below)."""
    if spec.runner != "nanochat":
        return None
    from daemon.trainers.nanochat_check import check_checkout
    try:
        check_checkout(spec, settings)
    except ValueError as e:
        return Check("nanochat checkout", FAIL, str(e))
    return Check("nanochat checkout", OK, f"{spec.nanochat.repo}, interpreter {spec.nanochat.python}")


def _check_flags(spec, phase_index: int) -> Check | None:
    p = spec.phases[phase_index]
    if spec.runner == "nanochat":  # against the phase script's own options (what check_job refuses)
        from daemon.trainers.nanochat_check import list_flag_problems
        try:
            problems = list_flag_problems(spec, phase_index)
        except (ValueError, OSError):
            return None  # no script to read: the checkout check says why
        if problems:
            return Check(f"{p.phase} flags", FAIL, "; ".join(problems))
        from daemon.trainers.nanochat_script import SCRIPTS
        return Check(f"{p.phase} flags", OK, f"{len(p.args)} flags known to scripts/{SCRIPTS[p.phase]}.py")
    opts = _options()
    if opts is None:
        return None
    unknown = sorted(k for k in p.args if opts.normalise_flag(k) not in opts.known_flags(p.phase))
    name = f"{p.phase} flags"
    if unknown:
        return Check(name, FAIL, f"unknown for the {p.phase} phase: {', '.join(unknown)}")
    return Check(name, OK, f"{len(p.args)} flags known")


def _check_compile(spec, phase_index: int) -> Check | None:
    """A nanochat checkout that compiles with fullgraph=True cannot run with TORCH_COMPILE_DISABLE=1."""
    if spec.runner != "nanochat":
        return None
    from daemon.trainers.nanochat_check import compile_warning
    warning = compile_warning(spec, phase_index)
    return Check(f"{spec.phases[phase_index].phase} torch.compile", WARN, warning) if warning else None


def _saves_periodically(spec, phase_index: int) -> bool:
    """Can the phase save before its end? Not a nanochat script without save_every (mid_train, chat_sft)."""
    if spec.runner != "nanochat":
        return True
    from daemon.trainers.nanochat_script import phase_script
    try:
        return "save_every" in phase_script(spec, spec.phases[phase_index].phase).options
    except (ValueError, OSError):
        return True


def _check_vram(settings, spec, phase_index, flags, device_batch_size, gpus) -> Check:
    from daemon.units import format_size
    phase = spec.phases[phase_index].phase
    name = f"{phase} vram"
    need = estimate_vram(flags, phase, device_batch_size)
    n_layer, n_embd, _ = model_shape(flags)
    batch = device_batch_size or flags.get("device_batch_size")
    auto = batch == "auto"
    shown = "1 (device_batch_size auto: the trainer finds the largest that fits)" if auto else batch
    what = (f"estimated need {format_size(need)} (d{n_layer}, width {n_embd}, "
            f"{sum(param_counts(flags)) / 1e6:.0f}M params, batch {shown} x {row_length(flags, phase)} tokens)")
    on_cpu = str(flags.get("device_type") or flags.get("device") or "").lower() == "cpu"
    if on_cpu:
        return Check(name, OK, "device_type=cpu: no GPU needed")
    if spec.slurm is not None:   # the allocation's GPUs, which this machine cannot see
        return Check(name, OK, f"{what}; on SLURM ({spec.slurm.resources}): not checked here")
    if gpus is None:
        from daemon.gpu.vram import read_gpus
        gpus = read_gpus()
    if not gpus.gpus:
        auto = "" if flags.get("device_type") else " (device_type is auto: the trainer would run on the CPU)"
        return Check(name, WARN, f"{gpus.note or 'no NVIDIA GPU found'}{auto}; {what}")
    # every rank holds a whole replica (model, optimizer, activations of its batch): the same need on each GPU
    cards = []
    for index in spec.gpu_indices:
        gpu = next((g for g in gpus.gpus if g.index == index), None)
        if gpu is None:
            return Check(name, FAIL, f"GPU {index} not found (have {', '.join(str(g.index) for g in gpus.gpus)})")
        if gpu.free_bytes is None:
            return Check(name, WARN, f"GPU {index} free memory unreadable ({gpu.errors.get('memory') or gpu.errors}); "
                         f"{what}")
        cards.append(gpu)
    gpu = min(cards, key=lambda g: g.free_bytes)  # the tightest card decides
    if len(cards) > 1:
        what = f"{what} on each of GPUs {', '.join(map(str, spec.gpu_indices))}"
    free = f"{format_size(gpu.free_bytes)} free on GPU {gpu.index} ({gpu.name})"
    if need > gpu.free_bytes:
        return Check(name, FAIL, f"{what} > {free}: lower device_batch_size or max_seq_len")
    if need > VRAM_WARN_FRACTION * gpu.free_bytes and not auto:
        return Check(name, WARN, f"{what} is over {VRAM_WARN_FRACTION:.0%} of {free}")
    return Check(name, OK, f"{what}; {free}")


def _check_disk(settings, spec, phase_index) -> Check:
    phase = spec.phases[phase_index].phase
    short = disk_shortfall(settings, spec, phase_index)
    if short:
        return Check(f"{phase} disk", FAIL, short)
    from daemon.health import disk_usage
    from daemon.units import format_size
    need, why = _projection(settings, spec, phase_index)
    free = disk_usage(settings.checkpoint_root)["free_bytes"]
    return Check(f"{phase} disk", OK, f"{format_size(free)} free, needs about {format_size(need)} ({why})")


def _check_save_every(flags: dict, phase: str, periodic: bool = True) -> Check:
    name = f"{phase} save_every"
    every = flags.get("save_every")
    every = every if isinstance(every, int) and not isinstance(every, bool) else -1
    minutes = flags.get("save_every_minutes")
    by_time = isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and minutes > 0
    steps = num_iterations(flags, phase)
    seconds = None
    if steps is not None:
        flops = 6 * sum(param_counts(flags)) * _tokens_per_step(flags, phase) * steps
        seconds = flops / OPTIMISTIC_FLOPS
    if not periodic:  # nothing to set: the script saves at its end, and a crash restarts the phase
        from daemon.units import format_duration
        long = seconds is not None and seconds > LONG_RUN_SECONDS
        return Check(name, WARN if long else OK,
                     f"the {phase} script saves only at its end: a crash restarts the phase from its input "
                     f"checkpoint" + (f" (at least ~{format_duration(seconds)} of {steps} steps)" if long else ""))
    if every <= 0:
        if by_time:
            return Check(name, OK, f"saves every {minutes:g} minutes (save_every {every})")
        if steps is None:
            return Check(name, WARN, f"save_every {every}: only the final checkpoint, and the run's length is "
                                     f"not known (num_iterations -1): set save_every ({GUIDE_SAVE_EVERY} in the guide)")
        if seconds is not None and seconds > LONG_RUN_SECONDS:
            from daemon.units import format_duration
            return Check(name, FAIL, f"save_every {every} on a {steps}-step run (at least ~{format_duration(seconds)}): "
                                     f"a crash loses it all; set save_every ({GUIDE_SAVE_EVERY} in the guide) "
                                     f"or save_every_minutes")
        return Check(name, OK, f"save_every {every}: a short run ({steps} steps), saved at the end")
    if steps is not None and every > steps:
        return Check(name, WARN if not by_time else OK,
                     f"save_every {every} is more than num_iterations {steps}: only the final checkpoint")
    if steps is not None and every > steps / 4 and (seconds or 0) > LONG_RUN_SECONDS and not by_time:
        return Check(name, WARN, f"save_every {every} of {steps} steps: a crash can lose {every / steps:.0%} "
                                 f"of the run (the guide uses {GUIDE_SAVE_EVERY})")
    share = f" ({every / steps:.0%} of the run)" if steps else ""
    return Check(name, OK, f"at most {every} steps{share} lost on a crash")


def _check_allocator(spec, phase_index) -> Check:
    from daemon.trainers import GUIDE_ALLOC_ENV
    phase = spec.phases[phase_index].phase
    env = {**GUIDE_ALLOC_ENV, **spec.phase_env(phase_index)}  # as daemon.launchers.attempt_env layers them
    value = env.get("PYTORCH_ALLOC_CONF") or env.get("PYTORCH_CUDA_ALLOC_CONF") or ""
    source = "nanod's default" if "PYTORCH_ALLOC_CONF" not in spec.phase_env(phase_index) else "the job's env"
    if "expandable_segments:true" in value.replace(" ", "").lower():
        return Check(f"{phase} allocator", OK, f"PYTORCH_ALLOC_CONF={value} ({source})")
    return Check(f"{phase} allocator", WARN, f"PYTORCH_ALLOC_CONF={value!s} lacks expandable_segments:True "
                                             f"(fragmentation makes OOM likelier on a small card)")


def _check_input(settings, spec, phase_index, flags) -> Check:
    phase = spec.phases[phase_index].phase
    name = f"{phase} input"
    earlier = [p.phase for p in spec.phases[:phase_index]]
    sources = layout.PREVIOUS_PHASES[phase]
    src = str(flags.get("source") or "")
    if phase == "sft" and src in sources:
        sources = (src,)
    for p in sources:
        if p in earlier:
            return Check(name, OK, f"starts from the {p} phase's final checkpoint (earlier in this plan)")
    for p in sources:
        step = layout.latest_complete(_ckpt_dir(settings, spec, p))
        if step is not None:
            return Check(name, OK, f"starts from {layout.PHASE_DIRS[p]}/{spec.resolved_model_tag} step {step}")
    dirs = " or ".join(f"{layout.PHASE_DIRS[p]}/{spec.resolved_model_tag}" for p in sources)
    return Check(name, FAIL, f"no complete checkpoint in {dirs} under {settings.checkpoint_root} to start from, "
                             f"and no earlier phase in this plan makes one")
