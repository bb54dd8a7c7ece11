"""The digest of a file's bytes: one helper for the run weights, the feature files, the teacher
outputs and the code files a record names."""
from __future__ import annotations

import hashlib
from pathlib import Path


def file_hash(path: str | Path, algorithm: str = "sha1") -> str:
    """The hex digest of every byte of the file at ``path`` (read in blocks, never whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()
