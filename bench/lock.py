"""One process per run: an exclusive file lock held for the run's life."""
from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


class RunLock:
    """One process per run: an exclusive lock (flock) on SCRATCH/<experiment>/<run_id>.lock, held for the run's
    life. The kernel drops a lock when its process ends however it ends (killed, crashed, preempted), so a lock
    file left by a dead process is no lock: the next process takes it at once. A second process on a live run
    says so in one line and waits; it then finds the record and skips the run. The file names its holder."""

    def __init__(self, path: Path, run_id: str):
        self.path, self.run_id, self.fd = path, run_id, None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    print(f"{self.run_id}: already running ({holder}, lock {self.path}); waiting for it to finish",
                          flush=True)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                print(f"warning: the scratch folder {self.path.parent} takes no file locks ({error.strerror}); "
                      f"two processes on run {self.run_id} would not be kept apart", flush=True)
                return self
            except BaseException:
                os.close(fd)
                raise
            # The holder removes the file as it lets go: a lock on a file no longer at the path guards nothing.
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # releases the lock
            self.fd = None
