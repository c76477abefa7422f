"""The built wheel works away from the checkout: installed without -e into a temporary target, run from a
temporary folder, it finds its catalog, GPU table and rules (package ``ftadvisor_data``) and answers
``python -m ftadvisor models`` / ``estimate`` with the same figures as the checkout, and ``ftadvisor app`` serves
the installed Streamlit app (``ui/entry/app.py``), not the checkout's.

The wheel is built from a copy of the working tree through setuptools' PEP 517 hook (what ``pip wheel`` and
``python -m build`` call), with no network: setuptools is already in the environment.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from jobs_helpers import free_port

REPO = Path(__file__).resolve().parents[1]

#: Not part of a source tree: environments, caches, build output, run folders, screenshots.
_NOT_SOURCE = (".venv", ".git", "var", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
               ".pytest_cache", "docs")

#: Llama-2-7B's published total (Touvron et al. 2023; the catalog's published_params).
LLAMA2_7B_PARAMS = 6_738_415_616


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding the wheel installed with ``pip install --no-deps --target`` (no -e, no .pth)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    dist = tmp / "dist"
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                            "print(build_meta.build_wheel(sys.argv[1]))", str(dist)],
                           cwd=src, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = dist / build.stdout.strip().splitlines()[-1]
    assert wheel.is_file(), build.stdout[-2000:]
    target = tmp / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                          str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr[-3000:]
    return target


def _away(installed: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An empty working folder and an environment with only the installed target added to the path."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    return cwd, dict(os.environ, PYTHONPATH=str(installed), FTADVISOR_HOME=str(tmp_path / "home"))


def _run(installed: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``python ARGS`` (e.g. ``-m ftadvisor models``) away from the checkout, on the installed target."""
    cwd, env = _away(installed, tmp_path)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_ships_every_data_file(installed):
    shipped = REPO / "data"
    expected = {p.relative_to(shipped).as_posix() for p in shipped.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and (p.suffix != ".py" or p.name == "__init__.py")}
    got = {p.relative_to(installed / "ftadvisor_data").as_posix()
           for p in (installed / "ftadvisor_data").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert expected - got == set(), "add the missing file types to [tool.setuptools.package-data] in pyproject"
    assert "models/llama-2-7b/config.json" in got and "gpus.csv" in got and "rules.yaml" in got


def test_installed_packages_are_imported_from_the_target_not_the_checkout(installed, tmp_path):
    probe = ("import ftadvisor, ftcore.paths as p, estimator, advisor, runner, ftadvisor_data; "
             "print(ftadvisor.__file__); print(p.__file__); print(estimator.__file__); print(advisor.__file__); "
             "print(runner.__file__); print(ftadvisor_data.__file__); print(p.data_path()); print(p.is_checkout())")
    res = _run(installed, tmp_path, "-c", probe)
    assert res.returncode == 0, res.stderr[-3000:]
    *files, data_root, checkout = res.stdout.strip().splitlines()
    assert all(Path(f).is_relative_to(installed) for f in files), files
    assert Path(data_root) == installed / "ftadvisor_data" and checkout == "False"


def test_python_m_ftadvisor_models_from_any_folder(installed, tmp_path):
    res = _run(installed, tmp_path, "-m", "ftadvisor", "models", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    models = {m["id"]: m for m in json.loads(res.stdout)}
    assert models["llama-2-7b"]["published_params"] == LLAMA2_7B_PARAMS
    catalog = yaml.safe_load((REPO / "data" / "models" / "catalog.yaml").read_text(encoding="utf-8"))
    assert set(models) == set(catalog)


def _scalars(obj):
    """Every number and string in a JSON document, however it is nested."""
    if isinstance(obj, dict):
        for value in obj.values():
            yield from _scalars(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _scalars(value)
    else:
        yield obj


def test_python_m_ftadvisor_estimate_from_any_folder(installed, tmp_path):
    args = ("-m", "ftadvisor", "estimate", "--model", "llama-2-7b", "--method", "lora", "--json")
    res = _run(installed, tmp_path, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    est = json.loads(res.stdout)
    assert LLAMA2_7B_PARAMS in set(_scalars(est))
    # what the tool writes went to FTADVISOR_HOME, nothing next to the installed packages
    assert (tmp_path / "home").is_dir() and not (installed / "var").exists()
    # the same figures as the checkout gives (same home, so the trace cache is shared)
    env = dict(os.environ, FTADVISOR_HOME=str(tmp_path / "home"))
    here = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stderr[-3000:]
    assert est == json.loads(here.stdout)


#: Streamlit's server answers its health route with this body once it serves (streamlit 1.67: web/server/starlette/starlette_routes.py).
HEALTH_OK = b"ok"
APP_START_BOUND_S = 90  # health answered 1.4 s after the start on the shared 2-core box; generous for CI


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as r:
        assert r.status == 200, url
        return r.read()


def test_ftadvisor_app_serves_the_installed_app_from_any_folder(installed, tmp_path):
    cwd, env = _away(installed, tmp_path)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ftadvisor", "app", "--port", str(port)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + APP_START_BOUND_S
        while True:
            assert proc.poll() is None, f"ftadvisor app exited with {proc.returncode}: {proc.stderr.read()[-3000:]}"
            try:
                health = _get(f"http://127.0.0.1:{port}/_stcore/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "the app did not answer /_stcore/health in time"
                time.sleep(0.2)
        assert health == HEALTH_OK
        page = _get(f"http://127.0.0.1:{port}/")
        assert b'<div id="root">' in page and b"<script" in page  # Streamlit's single-page shell
        # the server runs the installed entry script, from its own folder (its .streamlit config), not the checkout
        servers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "streamlit" in c.cmdline()]
        assert len(servers) == 1, [c.cmdline() for c in psutil.Process(proc.pid).children(recursive=True)]
        entry = installed / "ui" / "entry"
        assert str(entry / "app.py") in servers[0].cmdline() and Path(servers[0].cwd()) == entry
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def test_installed_app_script_renders_its_first_page(installed, tmp_path):
    """The installed entry script itself runs (the health check above does not run it: Streamlit runs the script
    when a browser session connects): Streamlit's AppTest runs it away from the checkout, the router finds the
    installed pages and the Advisor page renders without an exception."""
    probe = ("import sys; from streamlit.testing.v1 import AppTest; "
             "at = AppTest.from_file(sys.argv[1], default_timeout=120).run(); "
             "import ui; print(ui.__file__); print(len(at.exception)); print(at.title[0].value if at.title else '')")
    res = _run(installed, tmp_path, "-c", probe, str(installed / "ui" / "entry" / "app.py"))
    assert res.returncode == 0, res.stderr[-3000:]
    ui_file, exceptions, title = res.stdout.strip().splitlines()[-3:]
    assert Path(ui_file).is_relative_to(installed), ui_file
    assert exceptions == "0", res.stdout[-3000:]
    assert title == "Advisor"  # ui/app_pages/advise.py, the default page


def test_pyproject_lists_every_package_and_the_wheel_has_every_module(installed):
    """pyproject names its packages one by one: a new sub-package left out of the list would be missing from the
    wheel, with nothing failing until someone imports it away from the checkout."""
    import tomllib
    from setuptools import find_packages

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = set(find_packages(REPO, include=["ftcore*", "advisor*", "estimator*", "runner*", "ftadvisor*", "ui*"]))
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    ours = [p for pkg in ("ftcore", "advisor", "estimator", "runner", "ftadvisor", "ui")
            for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    missing = [str(p.relative_to(REPO)) for p in ours if not (installed / p.relative_to(REPO)).is_file()]
    assert not missing, f"the wheel lacks {missing}"
