#!/usr/bin/env python3
"""Cost of creating small files on a file system, fresh and right after many deletions.

    scripts/profile/create-after-deletes.py DIR [FILES] [DELETED]

Creates FILES (3,000) files of 1 KiB in DIR/a and reports the time per file; then creates and
deletes DELETED (20,000) files, creates FILES more in DIR/b and reports again. On ext4 without a
journal the second figure is many times the first: the inode allocator skips every recently
deleted inode (fs/ext4/ialloc.c, recently_deleted), see scripts/bench-on-fresh-fs.sh.
"""
import os
import shutil
import sys
import time


def make(d, n):
    os.makedirs(d, exist_ok=True)
    t0 = time.monotonic()
    for i in range(n):
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(b"x" * 1024)
    return time.monotonic() - t0


def main():
    base = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    deleted = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
    print(f"fresh, {n} files: {make(os.path.join(base, 'a'), n) * 1e6 / n:.1f} us per file")
    make(os.path.join(base, "junk"), deleted)
    shutil.rmtree(os.path.join(base, "junk"))
    t = make(os.path.join(base, "b"), n)
    print(f"after deleting {deleted} files: {t * 1e6 / n:.1f} us per file")
    shutil.rmtree(os.path.join(base, "a"))
    shutil.rmtree(os.path.join(base, "b"))


if __name__ == "__main__":
    main()
