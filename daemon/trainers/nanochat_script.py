"""What nanod knows about a nanochat phase script, read from its text (never imported).

A script is parsed with `ast` (parsing runs nothing: the daemon never imports torch
or a user's code) and read for the facts nanod needs:

- its options: argparse `add_argument("--x", type=..., choices=...)` names, or the
  old configurator's top-level assignments before `exec(open(...configurator.py))`,
  with the type a value must have where the script says it;
- its flag style (dash or underscore) and whether it can resume (resume_from_step);
- which optimizer files its `save_checkpoint(...)` call writes (every rank, rank 0, none);
- what a value <= 0 means for each option the script tests as `step % X`:
  OFF (every such test is guarded by `X > 0`), EVERY (an unguarded test: -1 fires at
  every step, since `step % -1 == 0`), or NEEDS_POSITIVE (guarded, but the guarded block
  sets a name the checkpoint save reads, so "off" crashes at the save);
- whether the checkout compiles something with `fullgraph=True` (which
  TORCH_COMPILE_DISABLE=1 breaks on current torch).

What it does not do: decide what to pass to the script (daemon/trainers/nanochat.py).
A read is cached per file version, since the daemon asks on every checkpoint scan.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

SCRIPTS = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft"}   # phase -> scripts/<name>.py
OFF, EVERY, NEEDS_POSITIVE = "off", "every", "needs_positive"
_KINDS = {bool: "bool", int: "int", float: "float", str: "str"}
_FULLGRAPH = re.compile(r"torch\.compile\([^)]*fullgraph\s*=\s*True")


class NanochatRefused(ValueError):
    """A nanochat job or attempt nanod will not start; str() is the one-line reason."""


@dataclass(frozen=True)
class Script:
    """What nanod needs to know about one phase script (read-only: it is shared by a cache)."""

    path: Path
    configurator: bool            # pre-2026-01-04: globals overridden by --key=value
    flag_style: str               # "dash" or "underscore"
    options: frozenset[str]       # option names, underscore spelling
    store_true: frozenset[str]    # argparse flags that take no value
    can_resume: bool              # has resume_from_step (only base_train, since 2025-11-13)
    optim_saving: str             # "all" ranks, "rank0" only, or "none"
    kinds: dict[str, str] = field(default_factory=dict)        # option -> int|float|str|bool, where known
    choices: dict[str, tuple] = field(default_factory=dict)    # argparse choices=
    every: dict[str, str] = field(default_factory=dict)        # option tested as step % X -> OFF|EVERY|NEEDS_POSITIVE
    needs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # NEEDS_POSITIVE: the names the save reads


def resolve_repo(spec) -> Path:
    return Path(os.path.realpath(os.path.expanduser(spec.nanochat.repo)))


def resolve_python(spec, repo: Path) -> Path | None:
    """The interpreter as an absolute path (relative paths are relative to the checkout)."""
    name = os.path.expanduser(spec.nanochat.python)
    if "/" not in name:
        found = shutil.which(name)
        return Path(found) if found else None
    path = Path(name)
    return Path(os.path.normpath(path if path.is_absolute() else repo / path))


def phase_script(spec, phase: str) -> Script:
    """The script a phase of this job runs, read (NanochatRefused when it is missing or unparsable)."""
    path = resolve_repo(spec) / "scripts" / f"{SCRIPTS[phase]}.py"
    if not path.is_file():
        if phase == "mid":
            raise NanochatRefused(f"job {spec.name}: this nanochat checkout has no mid phase "
                                  f"(removed 2026-01-31); drop the mid phase")
        raise NanochatRefused(f"job {spec.name}: {path} does not exist")
    try:
        return read_script(path)
    except OSError as e:
        raise NanochatRefused(f"job {spec.name}: cannot read {path}: {e.strerror or e}") from None


def read_script(path: Path) -> Script:
    """The facts of one script (raises NanochatRefused when it cannot be parsed, OSError when unreadable)."""
    path = Path(path)
    st = path.stat()
    return _read(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _read(path: str, mtime_ns: int, size: int) -> Script:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        v = sys.version_info
        raise NanochatRefused(f"{path}: nanod's Python {v.major}.{v.minor} cannot parse it (line {e.lineno}: "
                              f"{e.msg}); run nanod with the checkout's Python version or newer") from None
    exec_at = _configurator_exec(tree)
    if exec_at is not None:
        kinds = _configurator_options(tree.body[:exec_at])
        options, style, store_true, choices = frozenset(kinds), "underscore", frozenset(), {}
        kinds = {k: v for k, v in kinds.items() if v is not None}
    else:
        names, kinds, store_true, choices = _argparse_options(tree)
        options = frozenset(names)
        # argparse with underscores existed for nine days (2026-01-04 .. 2026-01-13)
        spelled = [s for n in names.values() for s in n]
        style = "dash" if any("-" in s for s in spelled) or not any("_" in s for s in spelled) else "underscore"
    every, needs = _every_semantics(tree, options)
    return Script(path=Path(path), configurator=exec_at is not None, flag_style=style, options=options,
                  store_true=store_true, can_resume="resume_from_step" in options,
                  optim_saving=_optim_saving(tree), kinds=kinds, choices=choices, every=every, needs=needs)


def compiles_fullgraph(repo: Path, script: Path) -> str | None:
    """The first file (relative to the checkout) of the script or the nanochat package that compiles
    with fullgraph=True, or None. Such code fails on its first call under TORCH_COMPILE_DISABLE=1."""
    repo = Path(repo)
    for path in [Path(script), *sorted((repo / "nanochat").rglob("*.py"))]:
        try:
            if _FULLGRAPH.search(path.read_text(encoding="utf-8", errors="replace")):
                return str(path.relative_to(repo)) if path.is_relative_to(repo) else str(path)
        except OSError:
            continue
    return None


# ---- options ------------------------------------------------------------------------------

def _configurator_exec(tree: ast.Module) -> int | None:
    """Index of the top-level `exec(open(...configurator.py...).read())`, or None."""
    for i, stmt in enumerate(tree.body):
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) \
                and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id == "exec" \
                and "configurator" in ast.unparse(stmt.value):
            return i
    return None


def _configurator_options(stmts: list[ast.stmt]) -> dict[str, str | None]:
    """Top-level `name = <literal>` before the configurator runs: what --name=value may override.
    The value is the kind the configurator insists on (its type check), None for a None default."""
    out: dict[str, str | None] = {}
    for stmt in stmts:
        targets, value = ([stmt.target], stmt.value) if isinstance(stmt, ast.AnnAssign) else \
            (stmt.targets, stmt.value) if isinstance(stmt, ast.Assign) else ((), None)
        if value is None:
            continue
        kind = _literal_kind(value)
        if kind is None and not (isinstance(value, ast.Constant) and value.value is None):
            continue  # computed (e.g. config_keys): not a setting
        for t in targets:
            if isinstance(t, ast.Name) and not t.id.startswith("_"):
                out[t.id] = kind
    return out


def _literal_kind(node: ast.expr) -> str | None:
    """int/float/str/bool for a literal or constant arithmetic (`20*524288`), else None."""
    if isinstance(node, ast.Constant):
        return _KINDS.get(type(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        kind = _literal_kind(node.operand)
        return kind if kind in ("int", "float") else None
    if isinstance(node, ast.BinOp):
        a, b = _literal_kind(node.left), _literal_kind(node.right)
        if a in ("int", "float") and b in ("int", "float"):
            return "float" if "float" in (a, b) or isinstance(node.op, ast.Div) else "int"
    return None


def _argparse_options(tree: ast.Module):
    """{dest: option strings}, {dest: kind}, store_true dests, {dest: choices} of every add_argument."""
    names: dict[str, list[str]] = {}
    kinds: dict[str, str] = {}
    store_true: set[str] = set()
    choices: dict[str, tuple] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                 and a.value.startswith("--")]
        if not flags:
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        dest = kw["dest"].value if isinstance(kw.get("dest"), ast.Constant) else flags[0][2:].replace("-", "_")
        names[dest] = [f[2:] for f in flags]
        action = kw.get("action")
        if isinstance(action, ast.Constant) and action.value in ("store_true", "store_false"):
            store_true.add(dest)
            kinds[dest] = "bool"
        elif isinstance(kw.get("type"), ast.Name) and kw["type"].id in ("int", "float", "str"):
            kinds[dest] = kw["type"].id
        if isinstance(kw.get("choices"), (ast.List, ast.Tuple)):
            values = [e.value for e in kw["choices"].elts if isinstance(e, ast.Constant)]
            if len(values) == len(kw["choices"].elts):
                choices[dest] = tuple(values)
    return names, kinds, frozenset(store_true), choices


def _optim_saving(tree: ast.Module) -> str:
    """Which optimizer files the script's save_checkpoint(...) call writes."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _called(node) == "save_checkpoint":
            if len(node.args) >= 4 and isinstance(node.args[3], ast.Constant) and node.args[3].value is None:
                return "none"
            return "all" if any(k.arg == "rank" for k in node.keywords) else "rank0"
    return "all"


def _called(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


# ---- what -1 means --------------------------------------------------------------------------

def _every_semantics(tree: ast.Module, options: frozenset[str]):
    """({option: OFF|EVERY|NEEDS_POSITIVE}, {option: names the save needs}) for options used as `step % X`."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    every: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            name = _option_ref(node.right, options)
            if name is not None:
                every[name] = OFF if _is_guarded(node, name, parents) and every.get(name) != EVERY else EVERY
    saved = {n.id for call in ast.walk(tree) if isinstance(call, ast.Call) and _called(call) == "save_checkpoint"
             for n in ast.walk(call) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    needs: dict[str, tuple[str, ...]] = {}
    for name in [n for n, s in every.items() if s == OFF]:
        blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and _requires_guard(n.test, name)]
        inside = {t for b in blocks for stmt in b.body for t in _stored_names(stmt)}
        outside = set(_stored_names(tree, skip=set(map(id, blocks))))
        missing = tuple(sorted((inside & saved) - outside))
        if missing:  # e.g. mid_train: `val_bpb` is set only by the evaluation, and its save reads it
            every[name], needs[name] = NEEDS_POSITIVE, missing
    return every, needs


def _option_ref(node: ast.expr, options: frozenset[str]) -> str | None:
    """`X` (configurator globals) or `args.X` (argparse) naming an option."""
    if isinstance(node, ast.Name) and node.id in options:
        return node.id
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr in options:
        return node.attr
    return None


def _requires_guard(expr: ast.AST, name: str) -> bool:
    """Is `expr` true only when `X > 0` (or `0 < X`, `X >= 1`): the comparison itself, or an `and`
    with it among its terms? (`last_step or X > 0` does not require it.)"""
    if isinstance(expr, ast.BoolOp) and isinstance(expr.op, ast.And):
        return any(_requires_guard(v, name) for v in expr.values)
    if isinstance(expr, ast.Compare):
        items = [expr.left, *expr.comparators]
        for left, op, right in zip(items, expr.ops, items[1:]):
            if _names(left, name) and isinstance(op, ast.Gt) and _const(right, 0) \
                    or _const(left, 0) and isinstance(op, ast.Lt) and _names(right, name) \
                    or _names(left, name) and isinstance(op, ast.GtE) and _const(right, 1):
                return True
    return False


def _names(node: ast.expr, name: str) -> bool:
    return (isinstance(node, ast.Name) and node.id == name) or (isinstance(node, ast.Attribute) and node.attr == name)


def _const(node: ast.expr, value) -> bool:
    return isinstance(node, ast.Constant) and node.value == value and not isinstance(node.value, bool)


def _is_guarded(node: ast.AST, name: str, parents: dict) -> bool:
    """Is `node` evaluated only where `name > 0` holds: inside an `and` with the guard, or in the
    test or body of an `if` / `while` / conditional expression whose test has it?"""
    child, up = node, parents.get(node)
    while up is not None:
        if isinstance(up, ast.BoolOp) and isinstance(up.op, ast.And) and any(_requires_guard(v, name) for v in up.values):
            return True
        if isinstance(up, (ast.If, ast.While, ast.IfExp)) and _requires_guard(up.test, name):
            body = up.body if isinstance(up.body, list) else [up.body]
            if child is up.test or child in body:
                return True
        child, up = up, parents.get(up)
    return False


def _stored_names(node: ast.AST, skip: set[int] = frozenset()):
    """Names assigned in `node` at module or block level (not inside functions, lambdas, classes, or
    the nodes whose id() is in `skip`)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in skip or (n is not node and isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                             ast.Lambda, ast.ClassDef))):
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            yield n.id
        stack.extend(ast.iter_child_nodes(n))
