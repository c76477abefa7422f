"""Put a model folder into a Hugging Face hub cache laid out as huggingface_hub lays it out, for offline tests.

``models--<org>--<name>/blobs/<sha256>`` holds each file once, ``snapshots/<commit>/<file>`` links to the blob
(relative symlink, as ``hf_hub_download`` writes it) and ``refs/main`` names the commit. huggingface_hub's own
``scan_cache_dir`` reads the result back as one cached repository (tests/test_model_resolution.py checks it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

#: A fixed 40-hex commit id for the fake snapshot (any 40 hex digits are a valid commit hash to huggingface_hub).
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def save_to_hub_cache(model_dir: Path, cache: Path, hub_id: str, *, only: tuple[str, ...] | None = None) -> Path:
    """Copy ``model_dir``'s files into ``cache`` under ``hub_id``; return the snapshot folder.

    ``only`` keeps just the named files (e.g. ``("config.json",)`` for a config-only look-up left in the cache).
    """
    repo = Path(cache) / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)  # no newline, as huggingface_hub writes it
    for src in sorted(Path(model_dir).iterdir()):
        if not src.is_file() or (only is not None and src.name not in only):
            continue
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    return snapshot
