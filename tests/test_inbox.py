"""Claims about the inbox: files are taken once complete and once per version, any
bad file is rejected with one line beside it, and nothing in the inbox stops it.

Real directories, real inotify (watchdog) and real polling; the only fakes are the
observers that stand for an inotify that is silent or cannot start.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from daemon.config import Settings
from daemon.inbox import Inbox, InboxError, is_candidate
from daemon.inbox_files import FileChanged, filesystem_type, read_regular_file
from daemon.spec import JobFileError
from tests.conftest import wait_until

VALID = "phases:\n  - phase: base\n    args: {depth: 4, num_iterations: 10}\n"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", settle_time=0.2, poll_interval=0.1, rescan_interval=30)


@pytest.fixture
def make_inbox():
    made = []

    def make(settings: Settings, start: bool = True, **kw) -> Inbox:
        inbox = Inbox(settings, threading.Event(), **kw)
        made.append(inbox)
        if start:
            inbox.start()
        return inbox

    yield make
    for inbox in made:
        inbox.stop()


def take_until(inbox: Inbox, count: int = 1, timeout: float = 5.0) -> list:
    got: list = []

    def enough():
        got.extend(inbox.take())
        return len(got) >= count

    wait_until(enough, timeout, interval=0.02, message=f"{count} inbox result(s)")
    return got


def drop(inbox_dir: Path, name: str, text: str | bytes) -> Path:
    """Write the file beside the inbox, then rename it in (what editors and `nanod submit` do)."""
    src = inbox_dir.parent / f"src-{name}"
    src.write_bytes(text.encode() if isinstance(text, str) else text)
    os.rename(src, inbox_dir / name)
    return inbox_dir / name


class SilentObserver:
    """An observer that starts fine and never reports anything (inotify on WSL2's /mnt/c)."""

    def schedule(self, *a, **kw): pass
    def start(self): pass
    def stop(self): pass
    def join(self, timeout=None): pass


def failing_observer():
    raise OSError(errno.ENOSPC, "inotify watch limit reached")


# ---- noticing files --------------------------------------------------------------------

def test_file_renamed_in_is_taken_within_a_fraction_of_a_second(settings, make_inbox):
    inbox = make_inbox(settings)
    assert inbox.mode == "inotify", inbox.mode_reason
    start = time.monotonic()
    drop(settings.inbox_dir, "tiny.yaml", VALID)
    (result,) = take_until(inbox)
    assert time.monotonic() - start < 0.2
    assert result.error is None and result.spec.name == "tiny"


def test_wake_is_set_when_a_file_arrives(settings, make_inbox):
    inbox = make_inbox(settings)
    inbox.take()
    inbox.wake.clear()
    drop(settings.inbox_dir, "tiny.yaml", VALID)
    assert inbox.wake.wait(1.0)


def test_file_written_in_place_is_taken_when_closed(settings, make_inbox):
    inbox = make_inbox(settings)
    start = time.monotonic()
    (settings.inbox_dir / "tiny.yaml").write_text(VALID)
    (result,) = take_until(inbox)
    assert result.spec and time.monotonic() - start < settings.settle_time  # the close event, not settling


def test_file_being_written_is_not_read_until_complete(settings, make_inbox):
    inbox = make_inbox(settings)
    path = settings.inbox_dir / "slow.yaml"
    with open(path, "w") as f:
        f.write("phases:\n  - phase: base\n")  # already a valid job on its own: reading it now would be wrong
        f.flush()
        os.fsync(f.fileno())
        deadline = time.monotonic() + 3 * settings.settle_time
        while time.monotonic() < deadline:
            assert inbox.take() == []
            time.sleep(0.02)
        f.write("    args: {depth: 6}\n")
    (result,) = take_until(inbox)
    assert result.spec.phases[0].args == {"depth": 6}


def test_file_touched_before_it_is_written_is_not_rejected_as_empty(settings, make_inbox):
    inbox = make_inbox(settings.model_copy(update={"settle_time": 1.0}))
    path = settings.inbox_dir / "touched.yaml"
    path.touch()  # `touch x.yaml; cat >> x.yaml`: the first close event is for an empty file
    time.sleep(0.05)
    assert inbox.take() == []
    path.write_text(VALID)
    (result,) = take_until(inbox)
    assert result.spec and not Path(str(path) + ".rejected").exists()


def test_files_present_at_start_are_taken(settings, make_inbox):
    settings.inbox_dir.mkdir(parents=True, mode=0o700)
    for name in ("a.yaml", "b.yml", "c.YAML"):
        (settings.inbox_dir / name).write_text(VALID)
    inbox = make_inbox(settings)
    results = take_until(inbox, 3)
    assert sorted(r.path.name for r in results) == ["a.yaml", "b.yml", "c.YAML"]
    assert sorted(r.spec.name for r in results) == ["a", "b", "c"]


def test_polling_mode_takes_files(settings, make_inbox):
    inbox = make_inbox(settings.model_copy(update={"inbox_mode": "polling"}))
    assert inbox.mode == "polling" and "polling" in inbox.mode_reason
    drop(settings.inbox_dir, "tiny.yaml", VALID)
    (result,) = take_until(inbox)
    assert result.spec.name == "tiny"


def test_polling_mode_waits_for_a_growing_file_to_settle(settings, make_inbox):
    inbox = make_inbox(settings.model_copy(update={"inbox_mode": "polling", "settle_time": 0.5}))
    path = settings.inbox_dir / "grow.yaml"
    with open(path, "w") as f:
        f.write("phases:\n  - phase: base\n")
        for _ in range(12):  # a write every 0.05 s keeps it from ever being unchanged for settle_time (0.5 s)
            f.flush()
            assert inbox.take() == []
            time.sleep(0.05)
            f.write("    # still writing\n")
        f.write("    args: {depth: 6}\n")
    (result,) = take_until(inbox)
    assert result.spec.phases[0].args == {"depth": 6}


def test_auto_mode_falls_back_to_polling_when_inotify_is_silent(settings, make_inbox):
    inbox = make_inbox(settings, observer_factory=SilentObserver)
    assert inbox.mode == "polling"
    assert "probe" in inbox.mode_reason and "polling every 0.1s" in inbox.mode_reason
    assert [p for p in settings.inbox_dir.iterdir()] == []  # the probe file is cleaned up
    drop(settings.inbox_dir, "tiny.yaml", VALID)
    (result,) = take_until(inbox)
    assert result.spec.name == "tiny"


def test_auto_mode_falls_back_to_polling_when_inotify_cannot_start(settings, make_inbox):
    inbox = make_inbox(settings, observer_factory=failing_observer)
    assert inbox.mode == "polling" and "watch limit" in inbox.mode_reason
    drop(settings.inbox_dir, "tiny.yaml", VALID)
    assert take_until(inbox)[0].spec


def test_forced_inotify_that_cannot_start_is_a_startup_error(settings):
    inbox = Inbox(settings.model_copy(update={"inbox_mode": "inotify"}), threading.Event(),
                  observer_factory=failing_observer)
    with pytest.raises(InboxError, match="inotify cannot start"):
        inbox.start()


def test_inbox_on_a_windows_drive_under_wsl2_is_polled(settings, make_inbox, monkeypatch):
    mountinfo = ("23 1 8:1 / / rw,relatime - ext4 /dev/sdc rw\n"
                 "61 23 0:52 / /mnt/c rw,noatime - 9p C:\\134 rw,aname=drvfs\n"
                 "62 23 0:53 / /mnt/my\\040disk rw - ext4 /dev/sdd rw\n")
    assert filesystem_type(Path("/mnt/c/Users/me/jobs"), mountinfo) == "9p"
    assert filesystem_type(Path("/mnt/my disk/jobs"), mountinfo) == "ext4"
    assert filesystem_type(Path("/home/me/jobs"), mountinfo) == "ext4"
    assert filesystem_type(Path("/mnt/cc"), mountinfo) == "ext4"
    monkeypatch.setattr("daemon.inbox.filesystem_type", lambda path: "9p")
    inbox = make_inbox(settings)
    assert inbox.mode == "polling" and "9p" in inbox.mode_reason


def test_rescan_finds_a_file_whose_event_was_missed(settings, make_inbox):
    inbox = make_inbox(settings.model_copy(update={"rescan_interval": 0.3}))
    inbox.take()
    inbox._observer.unschedule_all()  # from now on inotify reports nothing, as after a queue overflow
    drop(settings.inbox_dir, "missed.yaml", VALID)
    time.sleep(0.05)
    assert inbox.take() == []
    (result,) = take_until(inbox, timeout=3)
    assert result.spec.name == "missed" and inbox.mode == "inotify"


def test_only_visible_yaml_files_are_considered():
    assert is_candidate("a.yaml") and is_candidate("b.YML") and is_candidate("c.Yaml")
    for name in (".a.yaml", ".a.yaml.swp", "a.yaml.rejected", "a.yaml~", "notes.txt", "yaml", ".nanod-probe-1"):
        assert not is_candidate(name), name


def test_other_files_are_ignored(settings, make_inbox):
    inbox = make_inbox(settings)
    drop(settings.inbox_dir, "notes.txt", "hello")
    drop(settings.inbox_dir, ".hidden.yaml", "{{{")
    drop(settings.inbox_dir, "x.yaml.rejected", "old")
    drop(settings.inbox_dir, "tiny.yaml", VALID)
    assert [r.path.name for r in take_until(inbox)] == ["tiny.yaml"]
    time.sleep(0.3)
    assert inbox.take() == []
    assert not (settings.inbox_dir / "notes.txt.rejected").exists()


# ---- once per version, accept and reject ------------------------------------------------

def test_each_version_of_a_file_is_handled_once(settings, make_inbox):
    inbox = make_inbox(settings.model_copy(update={"rescan_interval": 0.1}))
    drop(settings.inbox_dir, "bad.yaml", "phases: [")
    (first,) = take_until(inbox)
    assert first.error
    time.sleep(0.5)  # several rescans
    assert inbox.take() == []


def test_edited_rejected_file_is_read_again_and_accept_removes_the_marker(settings, make_inbox):
    inbox = make_inbox(settings)
    path = drop(settings.inbox_dir, "job.yaml", "phases: [{phase: pretrain}]\n")
    (bad,) = take_until(inbox)
    marker = Path(str(path) + ".rejected")
    assert "phase" in bad.error and marker.read_text() == bad.error + "\n"
    path.write_text(VALID)
    (good,) = take_until(inbox)
    assert good.spec.name == "job"
    dest = inbox.accept(good.path, good.spec.name)
    assert dest == settings.state_dir / "accepted" / "job.yaml"
    assert dest.read_text() == VALID and stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert not path.exists() and not marker.exists()
    assert stat.S_IMODE(dest.parent.stat().st_mode) == 0o700


def test_accept_keeps_the_bytes_that_were_validated(settings, make_inbox):
    inbox = make_inbox(settings)
    path = drop(settings.inbox_dir, "job.yaml", VALID)
    (result,) = take_until(inbox)
    path.write_text("phases: [{phase: base, args: {depth: 99}}]\n")  # changed after take(), before accept()
    dest = inbox.accept(result.path, result.spec.name)
    assert dest.read_text() == VALID
    assert path.exists()  # the new version stays in the inbox, to be read on its own


def test_reject_writes_one_line_beside_the_file_which_stays(settings, make_inbox):
    inbox = make_inbox(settings)
    path = drop(settings.inbox_dir, "dup.yaml", VALID)
    (result,) = take_until(inbox)
    inbox.reject(result.path, "a job named 'dup' exists already\n(queued)")
    marker = Path(str(path) + ".rejected")
    assert marker.read_text().count("\n") == 1 and "exists already" in marker.read_text()
    assert stat.S_IMODE(marker.stat().st_mode) == 0o600 and path.exists()
    time.sleep(settings.settle_time + 0.1)
    assert inbox.take() == []


def test_rejected_file_is_not_rejected_again_after_a_restart(settings, make_inbox):
    first = make_inbox(settings)
    path = drop(settings.inbox_dir, "bad.yaml", "phases: [")
    assert take_until(first)[0].error
    first.stop()
    second = make_inbox(settings)
    time.sleep(settings.settle_time + 0.2)
    assert second.take() == []
    path.write_text(VALID)  # but an edit is read
    assert take_until(second)[0].spec


def test_marker_of_a_removed_file_is_cleaned_up_at_rescan(settings, make_inbox):
    inbox = make_inbox(settings.model_copy(update={"rescan_interval": 0.1}))
    path = drop(settings.inbox_dir, "bad.yaml", "phases: [")
    take_until(inbox)
    path.unlink()
    wait_until(lambda: inbox.take() == [] and not Path(str(path) + ".rejected").exists(), 3)


def test_file_that_vanishes_before_it_is_read_yields_nothing(settings, make_inbox):
    inbox = make_inbox(settings)
    inbox.take()
    inbox.wake.clear()
    path = drop(settings.inbox_dir, "gone.yaml", VALID)
    assert inbox.wake.wait(1.0)
    path.unlink()
    assert inbox.take() == []
    assert list(settings.inbox_dir.iterdir()) == []


def test_file_that_vanishes_between_stat_and_read_yields_nothing(settings, make_inbox):
    inbox = make_inbox(settings, start=False)
    path = settings.inbox_dir / "gone.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(VALID)
    st = os.lstat(path)
    path.unlink()
    assert inbox._read("gone.yaml", st) is None
    assert list(settings.inbox_dir.iterdir()) == []


def test_file_swapped_for_a_fifo_or_a_link_after_stat_is_never_opened_as_one(tmp_path):
    path = tmp_path / "swap.yaml"
    path.write_text(VALID)
    st = os.lstat(path)
    os.mkfifo(tmp_path / "fifo")
    os.rename(tmp_path / "fifo", path)  # a FIFO now: open() must not block, and it is not read
    with pytest.raises(FileChanged):
        read_regular_file(path, st)
    path.unlink()
    os.symlink("/etc/passwd", path)
    with pytest.raises(JobFileError, match="cannot read"):  # O_NOFOLLOW
        read_regular_file(path, st)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_rejected(settings, make_inbox):
    inbox = make_inbox(settings)
    path = settings.inbox_dir / "secret.yaml"
    path.write_text(VALID)
    path.chmod(0)
    (result,) = take_until(inbox)
    assert "cannot read" in result.error and "Permission denied" in result.error


# ---- the inbox directory (promise 12) ----------------------------------------------------

def test_missing_inbox_is_created_0700(settings, make_inbox):
    make_inbox(settings)
    assert stat.S_IMODE(settings.inbox_dir.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702, 0o720])
def test_world_writable_inbox_is_refused(settings, mode):
    settings.inbox_dir.mkdir(parents=True)
    os.chmod(settings.inbox_dir, mode)
    with pytest.raises(InboxError, match=f"writable by other users \\(mode 0{mode:o}\\); chmod 700"):
        Inbox(settings, threading.Event()).start()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the inbox away")
def test_inbox_owned_by_another_user_is_refused(settings):
    settings.inbox_dir.mkdir(parents=True, mode=0o700)
    os.chown(settings.inbox_dir, 65534, 65534)
    with pytest.raises(InboxError, match="belongs to uid 65534"):
        Inbox(settings, threading.Event()).start()


def test_inbox_that_is_a_file_is_refused(settings):
    settings.home.mkdir(parents=True)
    settings.inbox_dir.write_text("not a directory")
    with pytest.raises(InboxError):
        Inbox(settings, threading.Event()).start()


# ---- promise 8: the table of bad files --------------------------------------------------

ONE = "phases: [{phase: base}]\n"
BOMB = "".join(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9 if i else ['"lol"'] * 9) + "]\n" for i in range(9))
NESTED = "phases: [{phase: base, args: {depth: 4}}]\nenv: " + "{a: " * 40 + "1" + "}" * 40 + "\n"

# file name -> (content, a word the reason must contain)
BAD_FILES: dict[str, tuple[str | bytes, str]] = {
    "bad-yaml.yaml": ("phases: [unclosed\n", "invalid yaml"),
    "bad-indent.yaml": ("phases:\n- phase: base\n  args: {depth: 4}\n    bad: 1\n", "invalid yaml"),
    "tabs.yaml": ("phases:\n\t- phase: base\n", "tab"),
    "string-for-int.yaml": (ONE + "priority: '8'\n", "priority"),
    "string-for-bool.yaml": (ONE + "recovery: {oom_backoff: 'yes'}\n", "oom_backoff"),
    "unknown-key.yaml": (ONE + "recovry: {stall_timeout: 10m}\n", "recovry: unknown key"),
    "unknown-phase-key.yaml": ("phases: [{phase: base, argz: {depth: 4}}]\n", "argz: unknown key"),
    "unknown-recovery-key.yaml": (ONE + "recovery: {stall_timout: 10m}\n", "stall_timout"),
    "non-utf8.yaml": (b"phases: [{phase: base}]\nname: caf\xe9\n", "utf-8"),
    "nul-bytes.yaml": (b"phases: [{phase: \x00base}]\n", "invalid yaml"),
    "path-traversal-name.yaml": ("name: ../../etc\n" + ONE, "name"),
    "absolute-name.yaml": ("name: /etc/passwd\n" + ONE, "name"),
    "uppercase-name.yaml": ("name: Big\n" + ONE, "name"),
    "space-name.yaml": ("name: my job\n" + ONE, "name"),
    "unicode-name.yaml": ("name: jöb\n" + ONE, "name"),
    "Bad Stem.yaml": (ONE, "file name"),
    "empty.yaml": ("", "empty"),
    "only-comments.yaml": ("# nothing here\n\n", "no yaml"),
    "list.yaml": ("- phase: base\n- phase: mid\n", "mapping"),
    "scalar.yaml": ("hello\n", "mapping"),
    "billion-laughs.yaml": (BOMB, "bomb"),
    "deeply-nested.yaml": (NESTED, "nested"),
    "two-documents.yaml": (ONE + "---\n" + ONE, "document"),
    "duplicate-key.yaml": ("phases: [{phase: base, args: {depth: 4, depth: 8}}]\n", "duplicate key"),
    "python-tag.yaml": ("phases: !!python/object/apply:os.system ['true']\n", "invalid yaml"),
    "bad-duration.yaml": (ONE + "recovery: {stall_timeout: 10 minutes}\n", "stall_timeout"),
    "negative-duration.yaml": (ONE + "recovery: {stall_timeout: -5}\n", "stall_timeout"),
    "negative-batch.yaml": ("phases: [{phase: base, args: {device_batch_size: -2}}]\n", "device_batch_size"),
    "float-depth.yaml": ("phases: [{phase: base, args: {depth: 4.5}}]\n", "depth"),
    "bool-iterations.yaml": ("phases: [{phase: base, args: {num_iterations: true}}]\n", "num_iterations"),
    "nested-arg.yaml": ("phases: [{phase: base, args: {depth: {a: 1}}}]\n", "args.depth"),
    "resume-arg.yaml": ("phases: [{phase: base, args: {resume_from_step: 5}}]\n", "resume_from_step"),
    "keep-last-1.yaml": (ONE + "retention: {keep_last: 1}\n", "keep_last"),
    "unknown-runner.yaml": (ONE + "runner: docker\n", "runner"),
    "nanochat-no-block.yaml": (ONE + "runner: nanochat\n", "nanochat"),
    "phase-order.yaml": ("phases: [{phase: sft}, {phase: base}]\n", "order"),
    "phase-twice.yaml": ("phases: [{phase: base}, {phase: base}]\n", "at most once"),
    "unknown-phase.yaml": ("phases: [{phase: pretrain}]\n", "phase"),
    "no-phases.yaml": ("name: nothing\n", "phases"),
    "empty-phases.yaml": ("phases: []\n", "phases"),
    "phase-and-phases.yaml": ("phase: base\n" + ONE, "either"),
    "env-int.yaml": (ONE + "env: {OMP_NUM_THREADS: 4}\n", "env.omp_num_threads"),
    "env-bad-name.yaml": (ONE + "env: {1BAD: x}\n", "environment variable"),
    "date-value.yaml": (ONE + "env: {WHEN: 2024-01-01}\n", "env.when"),
    "newline-key.yaml": ('"bad\\nkey": 1\n' + ONE, "unknown key"),
    "huge-name.yaml": ("name: " + "k" * 500_000 + "\n" + ONE, "..."),
    "gpu-negative.yaml": (ONE + "gpu: -1\n", "gpu"),
}
SPECIAL_FILES = {  # file name -> a word the reason must contain
    "huge.yaml": "bytes", "link-to-job.yaml": "symbolic link", "link-to-passwd.yaml": "symbolic link",
    "dangling-link.yaml": "symbolic link", "fifo.yaml": "fifo", "dir.yaml": "directory", "socket.yaml": "socket",
    "same-name-2.yaml": "also used by same-name-1.yaml",
}


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """All the bad files dropped into one inbox at once, then a valid one: {file name: result}."""
    home = tmp_path_factory.mktemp("table") / "home"
    settings = Settings(home=home, settle_time=0.2, poll_interval=0.1, rescan_interval=30)
    inbox = Inbox(settings, threading.Event())
    inbox.start()
    d = settings.inbox_dir
    writing = open(d / "still-writing.yaml", "w")  # held open throughout: must yield nothing
    writing.write("phases:\n  - phase: base\n")
    writing.flush()
    for name, (content, _) in BAD_FILES.items():
        drop(d, name, content)
    with open(d / "huge.yaml", "wb") as f:
        f.truncate(50 * 1024 * 1024)  # sparse: 50 MB that must never be read whole
    outside = d.parent / "outside.yaml"
    outside.write_text(VALID)
    os.symlink(outside, d / "link-to-job.yaml")
    os.symlink("/etc/passwd", d / "link-to-passwd.yaml")
    os.symlink(d.parent / "nowhere", d / "dangling-link.yaml")
    os.mkfifo(d / "fifo.yaml")
    (d / "dir.yaml").mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "socket.yaml"))
    drop(d, "same-name-1.yaml", "name: twin\n" + ONE)
    time.sleep(0.01)
    drop(d, "same-name-2.yaml", "name: twin\n" + ONE)
    expected = len(BAD_FILES) + len(SPECIAL_FILES) + 1  # + same-name-1, which is valid
    results = {r.path.name: r for r in take_until(inbox, expected)}
    drop(d, "valid-after.yaml", VALID)
    results.update({r.path.name: r for r in take_until(inbox, 1)})
    time.sleep(0.3)
    late = inbox.take()
    yield results, late, d
    writing.close()
    sock.close()
    inbox.stop()


@pytest.mark.parametrize("name", sorted(BAD_FILES) + sorted(SPECIAL_FILES))
def test_bad_file_is_rejected_with_one_line_beside_it(table, name):
    results, _, inbox_dir = table
    word = BAD_FILES[name][1] if name in BAD_FILES else SPECIAL_FILES[name]
    result = results[name]
    assert result.spec is None and result.error
    assert "\n" not in result.error and len(result.error) <= 400
    assert word.lower() in result.error.lower(), result.error
    marker = inbox_dir / (name + ".rejected")
    assert marker.read_text() == result.error + "\n"
    assert stat.S_IMODE(marker.lstat().st_mode) == 0o600


def test_valid_job_after_the_bad_ones_is_still_accepted(table):
    results, late, _ = table
    assert results["valid-after.yaml"].spec.name == "valid-after"
    assert results["same-name-1.yaml"].spec.name == "twin"
    assert late == []  # nothing taken twice


def test_file_still_being_written_yields_nothing(table):
    results, late, _ = table
    assert "still-writing.yaml" not in results and late == []


def test_symlink_target_is_never_touched(table):
    _, _, inbox_dir = table
    assert (inbox_dir.parent / "outside.yaml").read_text() == VALID
    assert (inbox_dir / "link-to-passwd.yaml").is_symlink()


# ---- fuzz ----------------------------------------------------------------------------------

KEYS = ["name", "phases", "phase", "args", "env", "recovery", "retention", "runner", "nanochat", "priority",
        "gpu", "model_tag", "keep_last", "stall_timeout", "depth", "device_batch_size", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["base", "mid", "sft", "10m", "builtin", "nanochat"]))
documents = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)), max_leaves=20)
contents = st.one_of(
    st.binary(max_size=400),
    st.text(alphabet="ab: -[]{}&*!|>'\"#\n\t\\%@`,?0123456789", max_size=300).map(str.encode),
    documents.map(lambda doc: yaml.safe_dump(doc).encode()),
)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=contents)
def test_any_bytes_yield_exactly_a_spec_or_an_error(tmp_path, content):
    settings = Settings(home=tmp_path / "fuzz", settle_time=0.001)
    settings.inbox_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    inbox = Inbox(settings, threading.Event())  # not started: the watcher's report is given by hand
    name = f"f{time.monotonic_ns()}.yaml"
    (settings.inbox_dir / name).write_bytes(content)
    inbox.note_event(name, "ready")
    (result,) = take_until(inbox, 1, timeout=2)  # an empty file settles for settle_time first
    assert result.path.name == name
    assert (result.spec is None) != (result.error is None)
    if result.error:
        assert "\n" not in result.error
    (settings.inbox_dir / name).unlink()
