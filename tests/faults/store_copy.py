"""A copy of a study store as bnlab's next writable open would see it (used by the fault tests)."""
import os
import shutil

SUFFIXES = ("", "-journal", "-wal", "-shm")


def copy_store(path, scratch):
    """Copies the store at `path` and its journal or log into the (emptied) folder `scratch`;
    returns the copy's path. A transaction cut short leaves a hot journal, which a read-only
    connection cannot roll back ("attempt to write a readonly database"); a writable connection
    to the copy rolls it back, as bnlab's next open does, and leaves the original as it was."""
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    for suffix in SUFFIXES:
        if os.path.exists(path + suffix):
            shutil.copy(path + suffix, os.path.join(scratch, "study.sqlite" + suffix))
    return os.path.join(scratch, "study.sqlite")
