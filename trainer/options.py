"""The trainer's flags: one dataclass, each field with a comment (stdlib only).

`nanod check` and the daemon import this module to validate a job's args
without torch, so nothing here imports it. Flag names are nanochat's
(base_train.py, mid_train.py, chat_sft.py), spelled with underscores; the
command line also takes dashes. Some of nanochat's flags drive features nanod
does not have (wandb, CORE/ChatCORE evaluation, sampling, fp8): they are
accepted and ignored so that nanochat plans run unchanged.

A default of None means "the phase decides" and is resolved by
`phase_defaults`: base uses nanochat's base_train defaults, mid inherits the
shape of the base checkpoint it starts from, sft follows chat_sft. This module
parses nothing (that is trainer/cli.py) and knows no paths.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

PHASES = ("base", "mid", "sft")
ALL = PHASES
BASE = ("base",)
MID_SFT = ("mid", "sft")
SFT = ("sft",)
BASE_MID = ("base", "mid")


def _f(default, phases, help, *, used=True, auto=False):
    """A field with its phases and help text (the help is the field's comment); auto: also takes "auto"."""
    return field(default=default, metadata={"phases": phases, "help": help, "used": used, "auto": auto})


@dataclass
class Options:
    # ---- run and device (all phases)
    run: str = _f("dummy", ALL, "wandb run name in nanochat; nanod does not log to wandb", used=False)
    device_type: str = _f("", ALL, "cuda|cpu|mps; empty = cuda when available, else cpu")
    dtype: str = _f("bfloat16", ALL, "autocast dtype on CUDA (float32 turns autocast off); the CPU always trains in float32")
    compile: str = _f("auto", ALL, "torch.compile: auto = on for CUDA unless TORCH_COMPILE_DISABLE=1, off on CPU; 1 | 0")
    seed: int = _f(42, ALL, "seed for weight init; data order is fixed by the files, so the seed and batch settings fix the run")
    model_tag: str | None = _f(None, ALL, "checkpoint subdirectory; default d<depth> (mid/sft: the largest d<N> of the previous phase)")
    data: str | None = _f(None, ALL, "file or directory of training data; default: nanod's embedded procedural data. "
                          "base: .parquet (text column), .txt (one document per file), .jsonl ({\"text\"}); "
                          "mid/sft: .jsonl conversations ({\"messages\": [{\"role\", \"content\"}]})")
    # ---- model shape (base; mid/sft take it from the checkpoint they start from)
    depth: int = _f(20, ALL, "number of transformer blocks; width = depth x aspect_ratio (mid/sft: only names the default model_tag)")
    aspect_ratio: int = _f(64, BASE, "model width per layer of depth (nanochat: 64)")
    head_dim: int = _f(128, BASE, "target attention head size; width is rounded up to a multiple of it")
    window_pattern: str = _f("L", BASE, "nanochat's sliding-window pattern; nanod always uses full attention", used=False)
    vocab_size: int = _f(65536, BASE, "vocabulary size when training a new tokenizer (BPE stops earlier on small data); "
                         "an existing NANOCHAT_BASE_DIR/tokenizer is reused as is")
    # ---- batch and length
    max_seq_len: int | None = _f(None, ALL, "tokens per row; base default 2048, mid default: the base checkpoint's; "
                                 "sft: the same setting as max_tokens (chat_sft's name)")
    max_tokens: int | None = _f(None, SFT, "sft: every row is padded/truncated to this many tokens; default the model's "
                                "max_seq_len. max_seq_len is accepted for it too (nanochat's chat_sft name)")
    device_batch_size: int | str | None = _f(None, ALL, "rows per forward/backward; base 32, mid: the base checkpoint's, "
                                             "sft 4. auto: the largest that fits, found by probing training steps "
                                             "before the first one (trainer/autofit.py; a resume reuses the "
                                             "checkpoint's). Changes memory, not the optimisation", auto=True)
    total_batch_size: int | None = _f(None, ALL, "tokens per optimizer step; base 524288, mid: the base checkpoint's, "
                                      "sft: target_examples_per_step x max_tokens. grad_accum = total / (device_batch_size x row length)")
    target_examples_per_step: int = _f(32, SFT, "sft: rows per optimizer step when total_batch_size is not given")
    # ---- duration
    num_iterations: int = _f(-1, ALL, "optimizer steps; -1: base from target_param_data_ratio (or target_flops), "
                             "mid one pass over the data, sft num_epochs passes")
    target_param_data_ratio: float = _f(20.0, BASE, "base: tokens = ratio x parameters when num_iterations=-1 (Chinchilla 20)")
    target_flops: float = _f(-1.0, BASE, "base: train for this many FLOPs (6 x params x tokens) when num_iterations=-1; -1 off")
    num_epochs: int = _f(1, SFT, "sft: passes over the conversations when num_iterations=-1")
    # ---- optimisation (Muon for matrices, AdamW for embedding and head)
    embedding_lr: float = _f(0.2, ALL, "AdamW lr of the token embedding (scaled by (width/768)^-0.5)")
    unembedding_lr: float = _f(0.004, ALL, "AdamW lr of the untied head (scaled by (width/768)^-0.5)")
    matrix_lr: float = _f(0.02, ALL, "Muon lr of every matrix in the blocks")
    weight_decay: float = _f(0.0, ALL, "AdamW weight decay of embedding and head")
    adam_beta1: float = _f(0.8, ALL, "AdamW beta1")
    adam_beta2: float = _f(0.95, ALL, "AdamW beta2")
    grad_clip: float = _f(1.0, ALL, "clip the global gradient norm to this; 0 = off")
    init_lr_frac: float | None = _f(None, ALL, "every lr x this for the whole phase; base 1.0, mid 1.0, sft 0.02")
    warmup_ratio: float | None = _f(None, ALL, "fraction of steps of linear lr warmup; default 0")
    warmdown_ratio: float | None = _f(None, ALL, "fraction of final steps of linear decay to final_lr_frac; base 0.2, mid 0.2, sft 1.0")
    final_lr_frac: float | None = _f(None, ALL, "lr multiplier reached at the last step; default 0")
    # ---- checkpoints and resume
    save_every: int = _f(-1, ALL, "save a checkpoint every N steps; -1 = only the final one")
    save_every_minutes: float = _f(-1.0, ALL, "also save when this many minutes passed since the last save; -1 = off")
    resume_from_step: str = _f("-1", ALL, "N: resume from checkpoint step N of this phase; auto: the newest complete one "
                               "(fresh when there is none); -1: start fresh")
    init_step: str = _f("auto", MID_SFT, "checkpoint step of the previous phase to start from; auto = its newest complete one")
    source: str = _f("", SFT, "sft: start from 'mid' or 'base'; empty = mid when it has a checkpoint, else base")
    # ---- accepted for nanochat compatibility, not used by nanod
    eval_every: int = _f(-1, ALL, "nanochat: validation every N steps; nanod runs no evaluation", used=False)
    eval_tokens: int = _f(-1, BASE_MID, "nanochat: validation tokens", used=False)
    eval_steps: int = _f(-1, SFT, "nanochat: validation batches", used=False)
    eval_metrics_every: int = _f(-1, SFT, "nanochat: accuracy metrics every N steps", used=False)
    eval_metrics_max_problems: int = _f(-1, SFT, "nanochat: problems per metric", used=False)
    core_metric_every: int = _f(-1, BASE, "nanochat: CORE metric every N steps", used=False)
    core_metric_max_per_task: int = _f(-1, BASE, "nanochat: CORE examples per task", used=False)
    sample_every: int = _f(-1, BASE, "nanochat: sample from the model every N steps", used=False)
    chatcore_every: int = _f(-1, MID_SFT, "nanochat: ChatCORE every N steps", used=False)
    chatcore_max_cat: int = _f(-1, MID_SFT, "nanochat: ChatCORE categorical problems", used=False)
    chatcore_max_sample: int = _f(-1, MID_SFT, "nanochat: ChatCORE generative problems", used=False)
    mmlu_epochs: int = _f(-1, MID_SFT, "nanochat: MMLU epochs in the mixture", used=False)
    gsm8k_epochs: int = _f(-1, MID_SFT, "nanochat: GSM8K epochs in the mixture", used=False)
    load_optimizer: int = _f(0, MID_SFT, "nanochat: warm-start the optimizer; nanod starts each phase's optimizer fresh", used=False)
    scalar_lr: float = _f(0.5, BASE, "nanochat: lr of residual scalars; nanod's model has none", used=False)
    warmup_steps: int = _f(-1, BASE, "nanochat: warmup in steps; use warmup_ratio", used=False)
    fp8: bool = _f(False, BASE, "nanochat: fp8 training; not supported, ignored", used=False)
    fp8_recipe: str = _f("tensorwise", BASE, "nanochat: fp8 recipe", used=False)
    dry_run: bool = _f(False, MID_SFT, "nanochat: skip checkpoints; nanod always saves", used=False)


# nanochat spells a few flags differently across its scripts; these name the same field
ALIASES = {"model_step": "init_step", "step": "init_step"}

# what a None default becomes, per phase ("inherit" = from the checkpoint the phase starts from)
PHASE_DEFAULTS = {
    "base": dict(max_seq_len=2048, device_batch_size=32, total_batch_size=524288,
                 init_lr_frac=1.0, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0),
    "mid": dict(max_seq_len="inherit", device_batch_size="inherit", total_batch_size="inherit",
                init_lr_frac=1.0, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0),
    "sft": dict(max_tokens="inherit", device_batch_size=4, total_batch_size=None,
                init_lr_frac=0.02, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0),
}


AUTO = "auto"                 # device_batch_size: auto
AUTOFIT_TARGET = 0.88         # auto-fit's default share of the card that peak reserved memory may reach
AUTOFIT_TARGET_ENV = "NANOD_AUTOFIT_TARGET"


def autofit_target(env) -> float:
    """The share of the card auto-fit may fill: NANOD_AUTOFIT_TARGET (0.5-0.99), default 0.88.

    Below ~92 %: fragmentation can make a size that fitted once fail hours later (the OOM
    back-off is the backstop). Raises ValueError naming the variable."""
    raw = env.get(AUTOFIT_TARGET_ENV, "").strip()
    if not raw:
        return AUTOFIT_TARGET
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{AUTOFIT_TARGET_ENV}={raw!r} is not a number (a share of the card, e.g. 0.88)") from None
    if not 0.5 <= value <= 0.99:
        raise ValueError(f"{AUTOFIT_TARGET_ENV}={raw!r} must be between 0.5 and 0.99")
    return value


def batch_candidates(total_batch_size: int, row_length: int, world_size: int = 1) -> list[int]:
    """Every device_batch_size that keeps total_batch_size divisible by world_size x B x row_length,
    smallest first: the divisors of a rank's rows per step (empty when even B = 1 does not divide)."""
    per_pass = world_size * row_length
    if total_batch_size % per_pass:
        return []
    rows = total_batch_size // per_pass
    small = [d for d in range(1, int(rows ** 0.5) + 1) if rows % d == 0]
    return sorted(set(small + [rows // d for d in small]))


def default_batch_choice(phase: str, candidates: list[int]) -> int:
    """device_batch_size auto where nothing is probed (a CPU, or a trainer without auto-fit and no GPU
    to size it for): the largest candidate at most the phase's default (mid inherits base's 32)."""
    cap = PHASE_DEFAULTS[phase]["device_batch_size"]
    cap = cap if isinstance(cap, int) else PHASE_DEFAULTS["base"]["device_batch_size"]
    return max([c for c in candidates if c <= cap] or candidates[:1])


def fields_of() -> list[dataclasses.Field]:
    return list(dataclasses.fields(Options))


def known_flags(phase: str) -> set[str]:
    """Flag names (underscore spelling, aliases included) the given phase accepts."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} (expected one of {', '.join(PHASES)})")
    names = {f.name for f in fields_of() if phase in f.metadata["phases"]}
    names |= {alias for alias, target in ALIASES.items() if target in names}
    return names


def normalise_flag(name: str) -> str:
    """--a-b and --a_b are the same flag; aliases map to their field."""
    name = name.replace("-", "_")
    return ALIASES.get(name, name)


def sft_row_length(args: dict, *, prefix: str = "") -> int | None:
    """sft's row length from flags in underscore spelling: max_tokens (the guide's name) or
    max_seq_len (nanochat's chat_sft since 2026) are one setting; None when neither is given.
    Both with different values is a ValueError naming them (each name after `prefix`)."""
    tokens, seq = args.get("max_tokens"), args.get("max_seq_len")
    if tokens is not None and seq is not None and tokens != seq:
        raise ValueError(f"{prefix}max_tokens={tokens} and {prefix}max_seq_len={seq} both set sft's row length: "
                         "give one")
    return tokens if tokens is not None else seq


def phase_defaults(phase: str) -> dict:
    return dict(PHASE_DEFAULTS[phase])
