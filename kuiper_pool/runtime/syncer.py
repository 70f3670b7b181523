"""The syncer: a small process that makes the supervisor's state files durable, so that the
supervisor's loop never waits for a disk.

Why a process: ``fsync`` of a small state file costs 1-10 ms on an idle SSD, up to ~50 ms for
1 MiB (measured: docs/state.md), and far more on an SD card or a disk busy with other
writes; the loop serves every rule, has no threads by design, and with ``transport: nng``
must never fork. So the supervisor writes each changed file to a temporary name itself (into
the page cache: no wait for the disk) and hands the name over a non-blocking pipe to this
process, ``posix_spawn``'ed with ``python -I -S`` when state is first flushed. For each
name, in the order received, it fsyncs the file, renames it into place and fsyncs the
directory. A kill of the supervisor loses nothing handed over (this process finishes its
queue on EOF); a power loss loses at most what it had not synced yet.

This file runs as a script (nothing of kuiper_pool is imported into this process); its
input is ``<tmp>\\0<final>\\0`` records on stdin.
"""
import os
import signal
import sys


def sync_one(tmp: str, final: str) -> None:
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(os.path.dirname(final) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)  # the rename itself
    finally:
        os.close(dfd)


def main() -> None:
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # nothing of the supervisor's stays open here
    # an operator's signal to the whole process tree is the supervisor's to act on; this
    # process ends when the supervisor does (EOF on stdin), after what it was handed
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    pending = b""
    while True:
        data = os.read(0, 65536)
        if not data:
            return
        pending += data
        *records, pending = pending.split(b"\0")
        for tmp, final in zip(records[::2], records[1::2]):
            try:
                sync_one(os.fsdecode(tmp), os.fsdecode(final))
            except OSError as e:
                print(f"kuiper_pool state syncer pid {os.getpid()}: cannot write state to "
                      f"{os.fsdecode(final)}: {e.strerror or e}", flush=True)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if len(records) % 2:  # a record's first half: keep it for the next read
            pending = records[-1] + b"\0" + pending


if __name__ == "__main__":
    sys.exit(main())
