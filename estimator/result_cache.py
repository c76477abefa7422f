"""Finished estimates on disk, so that a repeated ``ftadvisor estimate`` answers without torch or transformers.

A terminal estimate pays for importing torch + transformers + peft and tracing a slice (seconds) every time,
although the same request was answered before. This cache stores the ``Estimate`` as JSON
(``cache_dir()/estimates/<key>.json``) under a key made of everything the answer depends on:

- the request, every field (``EstimateRequest.model_dump(mode="json")``);
- the model: the catalog id, or the resolved path of a ``config.json`` / model folder, and the SHA-256 of the
  config's contents (an edited config.json is a new key);
- the versions of the libraries the figures come from (torch, transformers, peft, bitsandbytes, accelerate),
  read with ``importlib.metadata`` from the installed distributions' metadata, which imports none of them;
- ``estimator.result.ESTIMATOR_VERSION`` (bump it when the figures change meaning) and the SHA-256 of the estimator's own source
  files and of the shipped tables it reads (model catalog, GPU table): any code or data change invalidates every
  entry by itself, so an edit never serves a stale figure even when nobody bumped the version.

Only what the lookup needs is imported here (pydantic, the request model, the catalog reader); a miss returns
None and the caller computes the estimate. Hub ids (fetched online) are not cached: their config is only known
after the fetch. ``FTADVISOR_RESULT_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from estimator.request import EstimateRequest

#: The libraries whose behaviour the figures come from (meta models, peft adapters, fake-tensor trace, NF4).
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")

#: Entries kept; beyond it the oldest (by modification time) are removed. An estimate is 5-20 KiB.
MAX_ENTRIES = 4096

_PACKAGE_DIR = Path(__file__).resolve().parent


def enabled() -> bool:
    return os.environ.get("FTADVISOR_RESULT_CACHE", "1") != "0"


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """Installed version of each library in ``LIBRARIES`` (None when absent), without importing any of them."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _data_files() -> list[Path]:
    from estimator import catalog

    return [Path(catalog.CATALOG_FILE), Path(catalog.GPUS_FILE)]


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """SHA-256 of every ``estimator/**/*.py`` file and the shipped tables the estimator reads (names + bytes).

    Read once per process: a process serves the code it imported.
    """
    digest = hashlib.sha256()
    files = sorted(p for p in _PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    for path in files + _data_files():
        digest.update((path.relative_to(_PACKAGE_DIR).as_posix() if path.is_relative_to(_PACKAGE_DIR)
                       else path.name).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<missing>")
    return digest.hexdigest()


def _model_identity(ref: str) -> dict[str, str] | None:
    """Which model ``ref`` names and the hash of its config contents, resolved as ``catalog.resolve_model`` does
    (catalog id or catalog hub id first, then a path) but without validating the config (that imports
    transformers): a file that cannot be read or parsed gives None, and the estimator itself reports it."""
    from estimator.catalog import config_key, list_models

    ref = (ref or "").strip()
    if not ref:
        return None
    lowered = ref.lower()
    for entry in list_models():
        if ref == entry.id or lowered == entry.id.lower() or (entry.hub_id and lowered == entry.hub_id.lower()):
            return {"source": "catalog", "id": entry.id, "config": entry.config_key}
    path = Path(ref).expanduser()
    if not path.exists():
        return None  # a hub id (not cached) or a typo (the estimator names it)
    resolved = path.resolve()
    config_file = resolved / "config.json" if resolved.is_dir() else resolved
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return {"source": "path", "id": str(resolved), "config": config_key(config)}


def key_parts(req: EstimateRequest) -> dict[str, Any] | None:
    """Everything the estimate of ``req`` depends on, as plain JSON data (None: this request is not cached)."""
    model = _model_identity(req.model)
    if model is None:
        return None
    return {
        "request": req.model_dump(mode="json"),
        "model": model,
        "libraries": library_versions(),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "estimator_version": _estimator_version(),
        "source": source_hash(),
    }


def _estimator_version() -> int:
    from estimator.result import ESTIMATOR_VERSION

    return ESTIMATOR_VERSION


def key_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _folder() -> Path:
    from ftcore.paths import cache_dir

    folder = cache_dir() / "estimates"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def lookup(req: EstimateRequest) -> tuple[str | None, dict | None]:
    """``(key, estimate JSON)`` for ``req``: the stored ``Estimate.model_dump(mode="json")`` on a hit, None on a
    miss; the key is None when the request is not cacheable (then ``store`` does nothing)."""
    if not enabled():
        return None, None
    parts = key_parts(req)
    if parts is None:
        return None, None
    key = key_of(parts)
    path = _folder() / f"{key}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return key, None
    except (OSError, UnicodeDecodeError, ValueError):
        path.unlink(missing_ok=True)  # a torn or foreign file: compute again
        return key, None
    if not isinstance(stored, dict) or stored.get("key") != key or not isinstance(stored.get("estimate"), dict):
        path.unlink(missing_ok=True)
        return key, None
    return key, stored["estimate"]


def store(key: str | None, estimate_json: dict) -> None:
    """Write one estimate (atomically: a reader never sees half a file), then keep at most ``MAX_ENTRIES``."""
    if key is None or not enabled():
        return
    folder = _folder()
    path = folder / f"{key}.json"
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps({"key": key, "estimate": estimate_json}), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full or read-only disk costs the next call its speed, not its answer
        return
    _prune(folder)


def _prune(folder: Path) -> None:
    entries = [e for e in os.scandir(folder) if e.name.endswith(".json")]
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort(key=lambda e: e.stat().st_mtime_ns)
    for entry in entries[: len(entries) - MAX_ENTRIES]:
        Path(entry.path).unlink(missing_ok=True)


def clear() -> None:
    """Remove every stored estimate (tests and benchmarks)."""
    for path in _folder().glob("*.json"):
        path.unlink(missing_ok=True)
