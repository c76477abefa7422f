"""One model resolution (runner.models): catalog id -> hub id -> local hub cache -> (online) download.

The hub cache is a temporary folder laid out as huggingface_hub lays it out (tests/hubcache.py), holding a tiny
real model under a catalog model's hub id; HF_HUB_OFFLINE=1 throughout (conftest), so nothing reaches the network.
The tiny model is not Llama-2-7B: what is checked is that the run trains the cached files the hub id names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ftadvisor.cli import main
from hubcache import COMMIT, save_to_hub_cache
from runner import models
from runner.errors import RunnerError

ROOT = Path(__file__).resolve().parents[1]
CATALOG = yaml.safe_load((ROOT / "data" / "models" / "catalog.yaml").read_text(encoding="utf-8"))
CACHED_ID = "llama-2-7b"
CACHED_HUB_ID = CATALOG[CACHED_ID]["hub_id"]  # meta-llama/Llama-2-7b-hf, read from the catalog file itself
UNCACHED_ID = "llama-2-13b"
UNCACHED_HUB_ID = CATALOG[UNCACHED_ID]["hub_id"]


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_model_dir):
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    snapshot = save_to_hub_cache(tiny_model_dir, cache, CACHED_HUB_ID)
    return cache, snapshot


@pytest.fixture
def offline_cache(hub_cache, monkeypatch, tmp_path):
    cache, snapshot = hub_cache
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FTADVISOR_HOME", str(tmp_path / "home"))
    return cache, snapshot


def test_the_fake_cache_reads_back_with_huggingface_hubs_own_scanner(hub_cache):
    from huggingface_hub import scan_cache_dir

    cache, _ = hub_cache
    repos = {r.repo_id: r for r in scan_cache_dir(cache).repos}
    assert set(repos) == {CACHED_HUB_ID}
    (revision,) = repos[CACHED_HUB_ID].revisions
    assert revision.commit_hash == COMMIT and "main" in revision.refs
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.file_name for f in revision.files}


def test_catalog_id_resolves_to_its_cached_snapshot_offline(offline_cache):
    _, snapshot = offline_cache
    got = models.check_model_available(CACHED_ID)
    assert (got.kind, got.catalog_id, got.hub_id, got.cached) == ("hub", CACHED_ID, CACHED_HUB_ID, True)
    assert got.folder == snapshot and got.ready
    assert models.resolve_model_dir(CACHED_ID) == snapshot
    assert "local hub cache" in got.describe()


@pytest.mark.parametrize("ref", [CACHED_HUB_ID, CACHED_HUB_ID.lower(), CACHED_ID.upper()])
def test_hub_id_and_any_case_resolve_to_the_same_snapshot(offline_cache, ref):
    _, snapshot = offline_cache
    got = models.resolve_model(ref, download=False)
    assert got.folder == snapshot and got.hub_id == CACHED_HUB_ID  # the catalog's spelling names the cache folder


def test_hf_home_is_honoured_when_hf_hub_cache_is_not_set(hub_cache, monkeypatch):
    cache, snapshot = hub_cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(cache.parent))  # huggingface_hub: HF_HUB_CACHE defaults to $HF_HOME/hub
    assert models.hub_cache_dir() == cache
    assert models.resolve_model_dir(CACHED_HUB_ID) == snapshot


def test_offline_and_not_cached_is_refused_naming_the_hub_id_and_the_fix(offline_cache):
    with pytest.raises(RunnerError) as err:
        models.check_model_available(UNCACHED_ID)
    assert err.value.field == "model" and err.value.exit_code == 2
    assert UNCACHED_HUB_ID in str(err.value) and "offline" in str(err.value)
    assert f"hf download {UNCACHED_HUB_ID}" in err.value.fix and "local model folder" in err.value.fix


def test_a_config_only_snapshot_is_not_a_cached_model(offline_cache, tiny_model_dir):
    cache, _ = offline_cache
    # what a config-only look-up (AutoConfig.from_pretrained) leaves in the cache: config.json and nothing else
    save_to_hub_cache(tiny_model_dir, cache, "someorg/config-only", only=("config.json",))
    assert models.cached_snapshot("someorg/config-only") is None
    with pytest.raises(RunnerError, match="someorg/config-only is not in the local hub cache"):
        models.check_model_available("someorg/config-only")


def test_a_sharded_snapshot_missing_a_shard_is_incomplete(tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    with pytest.raises(RunnerError, match="1 weight shard.*model-00002-of-00002.safetensors"):
        models.check_model_dir(folder)


def test_shape_only_catalog_entry_and_unknown_names_are_refused(offline_cache):
    assert CATALOG["gpt3-175b"]["hub_id"] is None
    with pytest.raises(RunnerError, match="shape-only catalog entry"):
        models.check_model_available("gpt3-175b")
    with pytest.raises(RunnerError, match="not a catalog id, an existing folder or a hub id"):
        models.check_model_available("llama-2-7")


def test_local_folder_and_demo_id_work_as_before(offline_cache, tiny_model_dir):
    got = models.check_model_available(str(tiny_model_dir))
    assert got.kind == "folder" and got.folder == tiny_model_dir.resolve()
    demo = models.parse_model_ref("SmolLM2-135M")
    assert demo.kind == "demo"  # the demo id means the shipped GGUF, never a hub look-up


# ---- online paths, with the hub replaced by stand-ins (no network) ------------------------------------------
def _online(monkeypatch, cache: Path):
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    monkeypatch.setattr(models, "_hub_online", lambda: True)


def _siblings(sizes: dict[str, int]):
    from huggingface_hub.hf_api import RepoSibling

    return [RepoSibling(rfilename=name, size=size) for name, size in sizes.items()]


class _Info:
    def __init__(self, sizes):
        self.siblings = _siblings(sizes)


def test_gated_repository_names_the_licence_page_and_the_login(monkeypatch, tmp_path):
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError

    _online(monkeypatch, tmp_path / "hub")
    url = f"https://huggingface.co/api/models/{UNCACHED_HUB_ID}"

    def gated(self, repo_id, **kw):
        raise GatedRepoError("403 gated", response=httpx2.Response(403, request=httpx2.Request("GET", url)))

    monkeypatch.setattr(HfApi, "model_info", gated)
    with pytest.raises(RunnerError) as err:
        models.check_model_available(UNCACHED_ID)
    assert f"https://huggingface.co/{UNCACHED_HUB_ID}" in err.value.fix
    assert "hf auth login" in err.value.fix and "huggingface-cli login" in err.value.fix and "HF_TOKEN" in err.value.fix


def test_disk_space_is_checked_against_the_repository_size_before_downloading(monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    _online(monkeypatch, tmp_path / "hub")
    # a 13B-sized listing (sizes made up for the test, pickled and .py files among them); the disk has 1 GiB free
    sizes = {"model-00001-of-00002.safetensors": 9_948_693_272, "model-00002-of-00002.safetensors": 6_032_886_960,
             "pytorch_model-00001-of-00003.bin": 9_948_728_430, "config.json": 587, "tokenizer.model": 499_723,
             "modeling_custom.py": 1000}
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kw: _Info(sizes))
    # only the safetensors, config and tokenizer files count: 9_948_693_272 + 6_032_886_960 + 587 + 499_723
    assert models.repo_download_bytes(UNCACHED_HUB_ID) == 15_982_080_542

    class _Usage:
        free = 1024**3

    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: _Usage())
    downloads = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: downloads.append(k) or "")
    with pytest.raises(RunnerError, match=r"needs 14.88 GiB .* 1.00 GiB free") as err:
        models.resolve_model(UNCACHED_ID)
    assert "HF_HUB_CACHE" in err.value.fix
    assert [d for d in downloads if not d.get("local_files_only")] == []  # refused before any download


def test_a_repository_without_safetensors_is_refused(monkeypatch, tmp_path):
    from huggingface_hub import HfApi

    _online(monkeypatch, tmp_path / "hub")
    monkeypatch.setattr(HfApi, "model_info",
                        lambda self, repo_id, **kw: _Info({"pytorch_model.bin": 10, "config.json": 5}))
    with pytest.raises(RunnerError, match="no safetensors weights"):
        models.check_model_available("someorg/pickled-only")


def test_download_fetches_only_safetensors_config_and_tokenizer_and_reports_progress(monkeypatch, tmp_path,
                                                                                     tiny_model_dir):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    cache = tmp_path / "hub"
    _online(monkeypatch, cache)
    repo_files = ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                  "pytorch_model.bin", "modeling_evil.py", "flax_model.msgpack", "README.md"]
    monkeypatch.setattr(HfApi, "model_info", lambda self, repo_id, **kw: _Info({f: 100 for f in repo_files}))
    calls = []

    def fake_snapshot_download(repo_id, **kw):  # what huggingface_hub does, minus the network
        calls.append(kw)
        if kw.get("local_files_only"):
            from huggingface_hub.errors import LocalEntryNotFoundError
            raise LocalEntryNotFoundError("not cached")
        bar = kw["tqdm_class"](total=300, unit="B", desc="Downloading bytes")
        for _ in range(3):
            bar.update(100)
        bar.close()
        return str(save_to_hub_cache(tiny_model_dir, cache, repo_id))

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    job = models.Download(UNCACHED_ID).start().wait(30)
    assert job.finished and job.error is None, job.error
    assert job.result.folder == cache / f"models--{UNCACHED_HUB_ID.replace('/', '--')}" / "snapshots" / COMMIT
    assert (job.done_bytes, job.total_bytes, job.fraction) == (300, 300, 1.0)
    (download,) = [c for c in calls if not c.get("local_files_only")]
    assert download["cache_dir"] == cache
    fetched = set(filter_repo_objects(repo_files, allow_patterns=download["allow_patterns"]))
    assert fetched == {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}


def test_log_progress_prints_a_line_per_tenth(capsys):
    import sys

    report = models.log_progress("download x", out=sys.stdout)
    for done in range(0, 101, 5):
        report(done * 1024**3 // 100, 1024**3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "download x: 0.00 GiB of 1.00 GiB (0%)" and lines[-1].endswith("(100%)")
    assert len(lines) == 11  # 0%, 10%, ..., 100%


# ---- the CLI: refused before anything is queued; a catalog id with a cached snapshot trains --------------------
@pytest.fixture(scope="module")
def sums_dataset(tmp_path_factory):
    rows = [{"prompt": f"What is {a} plus {b}?", "completion": f" {a + b}"} for a in range(6) for b in range(4)]
    path = tmp_path_factory.mktemp("sums") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _runs_dir_is_empty(home: Path) -> bool:
    runs = home / "runs"
    if not runs.exists():
        return True
    from runner.jobs.registry import Registry, default_registry_path

    folders = [p for p in runs.iterdir() if p.is_dir()]
    registry = default_registry_path(runs)
    return not folders and (not registry.exists() or not Registry(registry).list())


def test_cli_run_offline_not_cached_exits_2_and_queues_nothing(offline_cache, sums_dataset, tmp_path, capsys):
    code = main(["run", "--model", UNCACHED_ID, "--method", "lora", "--dataset", str(sums_dataset), "--detach"])
    err = capsys.readouterr().err
    assert code == 2
    assert UNCACHED_HUB_ID in err and f"hf download {UNCACHED_HUB_ID}" in err
    assert _runs_dir_is_empty(tmp_path / "home")


def test_cli_sweep_offline_not_cached_exits_2_and_queues_nothing(offline_cache, sums_dataset, tmp_path, capsys):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": UNCACHED_ID, "method": "lora", "dataset": {"path": str(sums_dataset)}}))
    assert main(["runs", "sweep", str(spec), "--ranks", "2,4", "--detach"]) == 2
    assert UNCACHED_HUB_ID in capsys.readouterr().err
    assert _runs_dir_is_empty(tmp_path / "home")


def test_cli_run_of_a_cached_catalog_id_trains_the_cached_weights(offline_cache, sums_dataset, tmp_path, capsys):
    _, snapshot = offline_cache
    code = main(["run", "--model", CACHED_ID, "--method", "lora", "--dataset", str(sums_dataset),
                 "--max-steps", "2", "--device", "cpu", "--precision", "fp32", "--seq-len", "32", "--rank", "2",
                 "--save-steps", "100", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    rec = json.loads(out.out)
    run_dir = Path(rec["output_dir"])
    assert json.loads((run_dir / "spec.json").read_text())["model"] == CACHED_ID
    assert "local hub cache" in out.err
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    # peft records the folder the base was loaded from: the cached snapshot of the catalog's hub id
    assert Path(adapter["base_model_name_or_path"]).resolve() == snapshot.resolve()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"


def test_export_refuses_a_model_name_the_resolution_does_not_know(tmp_path, sums_dataset, capsys):
    # the bundle runs elsewhere (weights need not be here), but a shape-only catalog entry can never be trained
    for model, expected in (("gpt3-175b", "shape-only catalog entry"),
                            ("llama-2-7", "not a catalog id, an existing folder or a hub id")):
        spec = tmp_path / f"{model}.json"
        spec.write_text(json.dumps({"model": model, "method": "lora", "dataset": {"path": str(sums_dataset)}}))
        assert main(["export", str(spec), "--output", str(tmp_path / f"out-{model}")]) == 2
        err = capsys.readouterr().err
        assert expected in err and "fix:" in err
        assert not (tmp_path / f"out-{model}").exists()
