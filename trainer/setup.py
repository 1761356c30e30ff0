"""Resolve a run before training: data, tokenizer, where to start from, shapes and batch.

Everything that can be wrong with a request is found here, before the first
step, and raised as BadArgs with a one-line reason (exit BAD_ARGS): missing
data, no checkpoint to start mid/sft from, a resume whose model shape,
sequence length or total batch differs from the checkpoint, a total batch
that device_batch_size x row length does not divide. The result is a `Plan`;
train.py builds the model from it and runs the loop.

Under torchrun each rank resolves its own plan (rank 0 first: it may generate
the embedded data and train the tokenizer), with the world size in the batch
arithmetic: one optimizer step is grad_accum x world_size x device_batch_size
rows. A resume may change the world size as it may change device_batch_size:
the rows of each step and the optimizer state are the same (see train.py).
Only rank 0 prints the notes of this module.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer import layout
from trainer.checkpoint import load_checkpoint, newest_usable
from trainer.cli import BadArgs
from trainer.data import DataError, DocSource, count_documents, count_stream_tokens, list_data_files
from trainer.embedded import ensure_embedded_data
from trainer.model import GPTConfig, config_for_depth
from trainer.options import AUTO, Options, batch_candidates, phase_defaults
from trainer.tokenizer import ChatTokenizer, load_tokenizer, save_tokenizer, tokenizer_path, train_tokenizer

TOKENIZER_MAX_CHARS = 2_000_000_000  # text the tokenizer trains on at most (nanochat's tok_train default)
TOKENIZER_DOC_CAP = 10_000           # characters taken from one document


@dataclass
class Plan:
    phase: str
    opts: Options
    given: dict
    root: Path
    model_tag: str
    ckpt_dir: Path
    data_path: Path
    source: DocSource
    tok: ChatTokenizer
    model_config: GPTConfig
    seq_len: int             # row length: max_seq_len (base/mid) or max_tokens (sft)
    device_batch_size: int
    total_batch_size: int
    grad_accum: int
    num_iterations: int
    schedule: dict
    start_step: int = 0
    resume: dict | None = None     # {"step", "model", "optim", "meta"} when resuming
    init: dict | None = None       # {"phase", "step", "model", "meta"} for mid/sft started fresh
    notes: list[str] = field(default_factory=list)
    world_size: int = 1            # ranks under torchrun; each step takes world_size x device_batch_size rows a pass
    rank: int = 0
    # device_batch_size: auto. Before the probe {"candidates": [...]} (device_batch_size and grad_accum
    # are None until trainer/autofit.py sets them); after it, what the meta records (nanod.autofit)
    autofit: dict | None = None

    def set_batch(self, device_batch_size: int) -> None:
        """The device_batch_size auto-fit chose; grad_accum follows, so total_batch_size is kept."""
        self.device_batch_size = device_batch_size
        self.grad_accum = self.total_batch_size // (self.world_size * device_batch_size * self.seq_len)


def resolve_plan(phase: str, opts: Options, given: dict, *, world_size: int = 1, rank: int = 0) -> Plan:
    root = layout.base_dir()
    tag = resolve_model_tag(phase, opts, given, root)
    ckpt_dir = layout.checkpoint_dir(root, phase, tag)
    data_path, source = resolve_data(phase, opts, root)
    resume = find_resume(phase, opts, ckpt_dir, rank=rank)
    init = None if resume else find_init(phase, opts, root, tag)
    tok = resolve_tokenizer(phase, opts, root, source)
    src_meta = (resume or init or {}).get("meta") or {}
    defaults = phase_defaults(phase)

    def pick(name: str, inherited):
        if getattr(opts, name) is not None:
            return getattr(opts, name)
        d = defaults.get(name)
        return inherited if d == "inherit" else d

    if phase == "base":
        seq_len = pick("max_seq_len", None)
        cfg = config_for_depth(opts.depth, vocab_size=tok.vocab_size, sequence_len=seq_len,
                               aspect_ratio=opts.aspect_ratio, head_dim=opts.head_dim)
        if resume:
            check_same(resume, "model shape (depth/width/heads/vocab)", _shape(cfg), _shape(_config_of(resume["meta"])))
    else:
        cfg = _config_of(src_meta)
        seq_len = pick("max_tokens", cfg.sequence_len) if phase == "sft" else pick("max_seq_len", src_meta.get("max_seq_len", cfg.sequence_len))
    if cfg.vocab_size != tok.vocab_size:
        raise BadArgs(f"the tokenizer {tokenizer_path(root)} has {tok.vocab_size} tokens but the model has "
                      f"{cfg.vocab_size}: it was trained with another tokenizer")
    B = pick("device_batch_size", src_meta.get("device_batch_size"))
    total = pick("total_batch_size", src_meta.get("total_batch_size"))
    if total is None:  # sft: nanochat counts examples per step
        total = opts.target_examples_per_step * seq_len
    row_name = "max_tokens" if phase == "sft" else "max_seq_len"
    W = world_size
    autofit = None
    if B == AUTO:
        B, autofit = resolve_auto(phase, resume, total, seq_len, W, row_name)
    elif resume and resume["meta"].get("device_batch_size") == B:
        # the daemon gives auto's choice as a number to later attempts: the record goes on with it
        autofit = (resume["meta"].get("nanod") or {}).get("autofit")
    if B is not None and total % (W * B * seq_len):
        ranks = "world_size x " if W > 1 else ""
        shown = f"{W} x " if W > 1 else ""
        raise BadArgs(f"total_batch_size {total} is not a multiple of {ranks}device_batch_size x {row_name} = "
                      f"{shown}{B} x {seq_len} = {W * B * seq_len}; pick a device_batch_size that divides it")
    if resume:
        meta = resume["meta"]
        check_same(resume, row_name, seq_len, meta.get("max_tokens" if phase == "sft" else "max_seq_len"))
        check_same(resume, "total_batch_size", total, meta.get("total_batch_size"))
        then = layout.world_size(meta)
        if then != W:
            say(f"note: resuming step {resume['step']} of {then} rank{'s' if then > 1 else ''} with {W}: the same rows "
                f"and optimizer state each step; the gradient sums in another order, so the weights are no longer "
                f"bitwise those of an uninterrupted {then}-rank run")
    grad_accum = total // (W * B * seq_len) if B is not None else None
    n_iter = opts.num_iterations if opts.num_iterations > 0 else default_iterations(phase, opts, cfg, total, seq_len, source, tok)
    schedule = {k: pick(k, None) for k in ("init_lr_frac", "warmup_ratio", "warmdown_ratio", "final_lr_frac")}
    plan = Plan(phase=phase, opts=opts, given=given, root=root, model_tag=tag, ckpt_dir=ckpt_dir,
                data_path=data_path, source=source, tok=tok, model_config=cfg, seq_len=seq_len,
                device_batch_size=B, total_batch_size=total, grad_accum=grad_accum, num_iterations=n_iter,
                schedule=schedule, resume=resume, init=init, start_step=resume["step"] if resume else 0,
                world_size=W, rank=rank, autofit=autofit)
    if resume and resume["meta"].get("num_iterations") not in (None, n_iter):
        say(f"warning: num_iterations is {n_iter} now, {resume['meta']['num_iterations']} in the checkpoint; "
            "the lr schedule follows the new value")
    return plan


def resolve_auto(phase: str, resume: dict | None, total: int, seq_len: int, world_size: int,
                 row_name: str) -> tuple[int | None, dict]:
    """device_batch_size: auto. A resume reuses its checkpoint's value (no probe: it fitted, and the
    run goes on exactly as it was); otherwise (None, the candidates) for trainer/autofit.py to probe."""
    candidates = batch_candidates(total, seq_len, world_size)
    if not candidates:
        ranks = "world_size x " if world_size > 1 else ""
        raise BadArgs(f"device_batch_size auto: total_batch_size {total} is not a multiple of {ranks}{row_name} = "
                      f"{world_size * seq_len}, so no device_batch_size divides it")
    if resume:
        meta = resume["meta"]
        used = meta.get("device_batch_size")
        if isinstance(used, int) and used in candidates:
            earlier = (meta.get("nanod") or {}).get("autofit") or {}
            return used, {**earlier, "chosen": used, "reused_from_step": resume["step"]}
    return None, {"candidates": candidates}


def say(message: str) -> None:
    """A note on stderr; under torchrun from rank 0 only (the other ranks' would repeat it)."""
    if not _quiet():
        print(message, file=sys.stderr, flush=True)


def _quiet() -> bool:
    return os.environ.get("RANK", "0").strip() not in ("", "0")


def check_same(resume: dict, what: str, now, then) -> None:
    if then is not None and now != then:
        raise BadArgs(f"cannot resume from step {resume['step']} ({resume['dir']}): {what} is {now} now "
                      f"but {then} in the checkpoint")


def _shape(cfg: GPTConfig) -> str:
    return f"n_layer={cfg.n_layer} n_embd={cfg.n_embd} n_head={cfg.n_head} vocab_size={cfg.vocab_size}"


def _config_of(meta: dict) -> GPTConfig:
    mc = meta.get("model_config")
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    if not isinstance(mc, dict) or not names <= set(mc):
        raise BadArgs("the checkpoint's meta has no usable model_config")
    return GPTConfig(**{k: mc[k] for k in names})


def resolve_model_tag(phase: str, opts: Options, given: dict, root: Path) -> str:
    if opts.model_tag:
        return opts.model_tag
    if phase == "base" or "depth" in given:
        return f"d{opts.depth}"
    # like nanochat: the largest d<N> model the previous phases have
    tags = set()
    for p in (phase,) + layout.PREVIOUS_PHASES[phase]:
        d = root / layout.PHASE_DIRS[p]
        if d.is_dir():
            tags |= {c.name for c in d.iterdir() if c.is_dir() and re.fullmatch(r"d\d+", c.name)}
    if not tags:
        prev = layout.PREVIOUS_PHASES[phase][-1]
        raise BadArgs(f"no {prev} checkpoint under {root / layout.PHASE_DIRS[prev]} to start {phase} from; "
                      f"run the {prev} phase first or pass --model_tag")
    return max(tags, key=lambda t: int(t[1:]))


def resolve_data(phase: str, opts: Options, root: Path) -> tuple[Path, DocSource]:
    kind = "text" if phase == "base" else "chat"
    try:
        if opts.data:
            path = Path(opts.data).expanduser()
        else:
            path = ensure_embedded_data(root) / ("base" if kind == "text" else "chat")
        source = DocSource(list_data_files(path, kind), kind)
        source.check()
    except DataError as e:
        raise BadArgs(str(e)) from None
    return path, source


def find_resume(phase: str, opts: Options, ckpt_dir: Path, *, rank: int = 0) -> dict | None:
    value = opts.resume_from_step
    if value == "-1":
        if layout.list_steps(ckpt_dir):
            say(f"warning: starting {phase} fresh; checkpoints in {ckpt_dir} will be overwritten as steps are saved")
        return None
    if value == "auto":
        found = newest_usable(ckpt_dir, "cpu", rank=rank, quiet=_quiet())
        if found is None:
            say(f"no checkpoint to resume from in {ckpt_dir}; starting fresh")
            return None
        step, model, optim, meta = found
    else:
        step = int(value)
        try:
            model, optim, meta = load_checkpoint(ckpt_dir, step, "cpu", rank=rank)
        except ValueError as e:
            raise BadArgs(f"cannot resume: {e}") from None
    if (meta.get("nanod") or {}).get("phase", phase) != phase:
        raise BadArgs(f"cannot resume: checkpoint step {step} in {ckpt_dir} belongs to phase {meta['nanod']['phase']}")
    return {"step": step, "model": model, "optim": optim, "meta": meta, "dir": ckpt_dir}


def find_init(phase: str, opts: Options, root: Path, tag: str) -> dict | None:
    if phase == "base":
        return None
    prev = layout.PREVIOUS_PHASES[phase]
    if opts.source:
        prev = (opts.source,)
    for p in prev:
        d = layout.checkpoint_dir(root, p, tag)
        if opts.init_step == "auto":
            found = newest_usable(d, "cpu", with_optim=False, quiet=_quiet())
            if found:
                step, model, _, meta = found
                return {"phase": p, "step": step, "model": model, "meta": meta, "dir": d}
        elif layout.list_steps(d):
            try:
                model, _, meta = load_checkpoint(d, int(opts.init_step), "cpu", with_optim=False)
            except ValueError as e:
                raise BadArgs(f"cannot start {phase}: {e}") from None
            return {"phase": p, "step": int(opts.init_step), "model": model, "meta": meta, "dir": d}
    dirs = " or ".join(str(layout.checkpoint_dir(root, p, tag)) for p in prev)
    step = "" if opts.init_step == "auto" else f" step {opts.init_step}"
    raise BadArgs(f"no complete checkpoint{step} in {dirs} to start {phase} from; run {prev[-1]} first")


def resolve_tokenizer(phase: str, opts: Options, root: Path, source: DocSource) -> ChatTokenizer:
    path = tokenizer_path(root)
    if not path.exists():
        if phase != "base":
            raise BadArgs(f"no tokenizer at {path}; the base phase trains it")
        t0 = time.monotonic()
        tok = train_tokenizer(_tokenizer_texts(source), opts.vocab_size)
        save_tokenizer(tok, path)
        say(f"trained tokenizer ({tok.get_vocab_size()} tokens) in {time.monotonic() - t0:.1f}s: {path}")
    try:
        return ChatTokenizer(load_tokenizer(path))
    except Exception as e:
        raise BadArgs(f"tokenizer {path} is unusable: {str(e).splitlines()[0] if str(e) else e!r}") from None


def _tokenizer_texts(source: DocSource):
    chars = 0
    for i in range(len(source.files)):
        for text in source.docs_of(i):
            text = text[:TOKENIZER_DOC_CAP]
            chars += len(text)
            yield text
            if chars >= TOKENIZER_MAX_CHARS:
                return


def default_iterations(phase, opts, cfg, total, seq_len, source, tok) -> int:
    if phase == "base":
        params = _param_count(cfg)
        if opts.target_flops > 0:
            return max(1, round(opts.target_flops / (6 * params * total)))
        return max(1, round(opts.target_param_data_ratio * params / total))
    if phase == "mid":
        return max(1, count_stream_tokens(source, tok) // total)
    rows = total // seq_len
    return max(1, opts.num_epochs * count_documents(source) // rows)


def _param_count(cfg: GPTConfig) -> int:
    per_block = 12 * cfg.n_embd * cfg.n_embd
    return 2 * cfg.vocab_size * cfg.n_embd + cfg.n_layer * per_block
