"""Shared I/O rules of every stage: clear errors, nothing half-written, visible progress."""
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


class UserInputError(ValueError):
    """Bad input from the user: the message names the file or key and the fix."""


def check_out_dir(out_dir: Path, overwrite: bool, key: str = "out_dir") -> None:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserInputError(
            f"{key}={out_dir} exists and is not empty; choose another {key} or pass overwrite=true"
        )


@contextlib.contextmanager
def atomic_dir(out_dir: Path, overwrite: bool = False, key: str = "out_dir") -> Iterator[Path]:
    """Yield a temporary directory beside `out_dir`; on success it replaces `out_dir`.

    On any error the temporary directory is removed and `out_dir` is left as it was.
    """
    out_dir = Path(out_dir).absolute()
    check_out_dir(out_dir, overwrite, key)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        trash = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.rename(out_dir, trash)
        os.rename(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def progress(items: Iterable[T], total: Optional[int], desc: str, every_s: float = 2.0) -> Iterator[T]:
    """Yield items, printing `desc i/total (rate/s)` to stderr at most every `every_s` seconds."""
    start = last = time.monotonic()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s or i == total:
            last = now
            rate = i / max(now - start, 1e-9)
            tail = f"/{total}" if total else ""
            print(f"{desc}: {i}{tail} ({rate:.1f}/s)", file=sys.stderr, flush=True)
