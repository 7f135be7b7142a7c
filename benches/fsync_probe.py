#!/usr/bin/env python3
"""How fast can this disk make N new small files durable, and which way of asking is fastest?

Each round creates N temp files (40 bytes each), makes them durable one of several ways, renames
them into place and fsyncs the directory once: the shape of a batch of sink writes. Run it on the
file system the sinks live on:  python3 benches/fsync_probe.py [DIR] [N]
"""
import os
import sys
import tempfile
import threading
import time

DIR = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="fsync-probe-", dir=".")
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000


def create(tag):
    files = []
    for i in range(N):
        tmp = os.path.join(DIR, f".t{i}.{tag}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, b"x" * 40)
        files.append((fd, tmp, os.path.join(DIR, f"t{i}")))
    return files


def place(files):
    for fd, tmp, target in files:
        os.rename(tmp, target)
        os.close(fd)
    d = os.open(DIR, os.O_RDONLY)
    os.fsync(d)
    os.close(d)


def fsync_each(files):
    for fd, _, _ in files:
        os.fsync(fd)


def hint(files):
    for fd, _, _ in files:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def threads(files, count=16):
    def work(j):
        for fd, _, _ in files[j::count]:
            os.fsync(fd)

    pool = [threading.Thread(target=work, args=(j,)) for j in range(count)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


WAYS = {
    "fsync one after another": fsync_each,
    "writeback hint, then fsync one after another": lambda f: (hint(f), fsync_each(f)),
    "fsync on 16 threads": threads,
    "writeback hint, then fsync on 16 threads (tokend)": lambda f: (hint(f), threads(f)),
    "one sync() for the batch": lambda f: os.sync(),
}

for round_ in range(2):
    for name, way in WAYS.items():
        files = create(f"{round_}{len(name)}")
        started = time.monotonic()
        way(files)
        place(files)
        print(f"{name}: {N / (time.monotonic() - started):,.0f} files/s")
