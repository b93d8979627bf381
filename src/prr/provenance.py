"""Where a result came from: GPU, library versions, commit and a digest of the sources that ran (a low-level
module: the benchmarks and the CLI's ``--json`` outputs both record it)."""

from __future__ import annotations

import os
import platform
import subprocess
import time

import torch

__all__ = ["environment", "git_commit", "source_digest"]


def git_commit() -> str:
    env = os.environ.get("PRR_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_digest(root: str | None = None) -> str:
    """SHA-1 over the package's .py files (relative path + bytes, sorted): names the code that ran even where
    there is no git checkout (the GPU machine gets a copy of the tree) or the commit label was mistyped.
    ``python -c "from prr.provenance import source_digest; print(source_digest())"`` on a checkout gives the
    same digest for the same sources."""
    import hashlib

    root = root or os.path.dirname(os.path.abspath(__file__))  # the prr package
    h = hashlib.sha1()
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).replace(os.sep, "/").encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read() + b"\0")
    return h.hexdigest()[:12]


def environment() -> dict:
    """GPU, versions, commit and source digest of this run (saved with every benchmark and `--json`)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None

    dev = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "gpu": torch.cuda.get_device_name(0) if dev else None,
        "sms": dev.multi_processor_count if dev else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "source_sha1": source_digest(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
