"""What may be read from the inbox, and how (promises 8 and 12).

Only regular files are opened: lstat first, then O_NOFOLLOW|O_NONBLOCK (a link is
never followed, a FIFO never blocks) and an fstat that must show the same file;
at most MAX_JOB_FILE_BYTES+1 bytes are read. The inbox directory itself must be
this user's and writable by nobody else. Also: which filesystems inotify cannot
hear. Watching and deciding are daemon/inbox.py's.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from daemon.spec import MAX_JOB_FILE_BYTES, JobFileError, read_at_most

# filesystems where files change without this kernel seeing it (the Windows side of
# WSL2, other NFS/SMB clients), so inotify stays silent about them: poll instead
SILENT_FILESYSTEMS = {"9p", "v9fs", "drvfs", "nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "sshfs",
                      "vboxsf", "vmhgfs", "fuse.vmhgfs-fuse", "prl_fs", "ceph", "glusterfs", "fuse.glusterfs",
                      "afs", "fuse.rclone", "fuse.s3fs", "gcsfuse", "fuse.gcsfuse"}

Signature = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns: one content version


class InboxError(Exception):
    """The inbox cannot be used as configured (the operator's setting, not a user's file)."""


def signature(st: os.stat_result) -> Signature:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileChanged(Exception):
    """The file changed while it was read."""


def read_regular_file(path: Path, st: os.stat_result) -> tuple[bytes, Signature]:
    """At most MAX_JOB_FILE_BYTES+1 bytes of a regular file, never following a link nor blocking.

    Raises JobFileError for what is not a readable regular file, FileChanged when the
    file is not the one lstat saw or changed during the read.
    """
    what = _kind(st.st_mode)
    if what == "a symbolic link":
        raise JobFileError(f"{path.name}: is a symbolic link; links in the inbox are not followed "
                           "(copy or move the file in)")
    if what != "a regular file":
        raise JobFileError(f"{path.name}: is {what}, not a regular file")
    if st.st_size > MAX_JOB_FILE_BYTES:
        raise JobFileError(f"{path.name}: is {st.st_size} bytes; a job file is at most "
                           f"{MAX_JOB_FILE_BYTES} bytes (a few lines)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise JobFileError(f"{path.name}: cannot read: {e.strerror or e}") from None
    try:
        before = os.fstat(fd)
        if signature(before) != signature(st) or not stat.S_ISREG(before.st_mode):
            raise FileChanged()  # replaced between lstat and open
        raw = read_at_most(fd, MAX_JOB_FILE_BYTES + 1)
        after = signature(os.fstat(fd))
    except OSError as e:
        raise JobFileError(f"{path.name}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if after != signature(st):
        raise FileChanged()
    return raw, after


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISREG, "a regular file"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "a special file"


def check_inbox_dir(inbox: Path) -> None:
    """Create the inbox 0700 if missing; refuse one that other users can write to (promise 12)."""
    try:
        inbox.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.stat(inbox)
    except OSError as e:
        raise InboxError(f"inbox {inbox}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InboxError(f"inbox {inbox} is not a directory")
    if st.st_uid != os.geteuid():
        raise InboxError(f"inbox {inbox} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}), "
                         "who could write jobs into it; use a directory of your own")
    if st.st_mode & 0o022:
        raise InboxError(f"inbox {inbox} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                         f"chmod 700 it")


def filesystem_type(path: Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem holding `path` ("ext4", "9p", ...), "" when unknown."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        fstype = fields[fields.index("-") + 1] if fields.index("-") + 1 < len(fields) else ""
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type
