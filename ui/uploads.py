"""Store uploaded files safely: size-limited, under ``uploads_dir()``, with a sanitized name, never executed.

The stored name is ``<sha256 prefix>-<sanitized original name>``: the content hash keeps two uploads with the
same name apart, and the sanitizing keeps path separators, ``..`` and odd characters out of the file system.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ftcore.errors import UserError
from ftcore.paths import uploads_dir

MAX_DATASET_BYTES = 50 * 1024**2  # 50 MiB: matches server.maxUploadSize in .streamlit/config.toml
MAX_CONFIG_BYTES = 1024**2  # 1 MiB: a Hugging Face config.json is a few KiB; anything larger is not one
DATASET_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")  # the formats runner.train.data reads
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HASH_CHARS = 12  # 48 bits of the sha256: enough to keep distinct uploads apart in one folder


class UploadError(UserError):
    """An upload that was refused (too big, wrong type)."""


def safe_name(name: str, default: str = "upload") -> str:
    """A file name with only letters, digits, dot, dash and underscore; no folders, no leading dots."""
    base = Path(str(name).replace("\\", "/")).name
    base = _SAFE.sub("_", base).lstrip(".")
    return base[:100] or default


def save_upload(data: bytes, name: str, *, kind: str, max_bytes: int, suffixes: tuple[str, ...]) -> Path:
    """Write ``data`` under ``uploads_dir()/kind/`` and return the path. Raises UploadError on bad input."""
    if len(data) > max_bytes:
        raise UploadError(f"{kind} upload is {len(data):,} bytes; the limit is {max_bytes:,} bytes "
                          "(use a local path for bigger files)", field=kind)
    if not data:
        raise UploadError(f"{kind} upload is empty; choose a file with content", field=kind)
    clean = safe_name(name)
    if not clean.lower().endswith(suffixes):
        raise UploadError(f"{kind} upload must end with one of {', '.join(suffixes)} (got {clean!r})", field=kind)
    folder = (uploads_dir() / safe_name(kind)).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:_HASH_CHARS]
    path = (folder / f"{digest}-{clean}").resolve()
    if folder not in path.parents:  # cannot happen after safe_name; kept as the last line of defence
        raise UploadError(f"{kind} upload name {name!r} is not allowed", field=kind)
    path.write_bytes(data)
    return path


def save_config_upload(data: bytes) -> Path:
    """Store an uploaded config.json as ``uploads/configs/<sha>/config.json`` (a folder the estimator accepts)."""
    if len(data) > MAX_CONFIG_BYTES:
        raise UploadError(f"config.json is {len(data):,} bytes; a model config is a few KiB (limit "
                          f"{MAX_CONFIG_BYTES:,})", field="config.json")
    if not data.strip():
        raise UploadError("config.json is empty; upload the model's config.json", field="config.json")
    folder = uploads_dir() / "configs" / hashlib.sha256(data).hexdigest()[:_HASH_CHARS]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_bytes(data)
    return path
