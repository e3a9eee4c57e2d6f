"""Which tests face the ComfyUI host, and which host a run uses.

scripts/test.sh runs the whole suite on ComfyUI 0.3.75 and then the host-facing tests again on
ComfyUI v0.33.0 (a second venv and tree, scripts/env_comfy033.sh), selected with ``--host-only``.

Host-facing = the test imports ComfyUI's modules or starts the real server, i.e. the file imports
tests/comfy_host.py directly or through a helper in tests/ (lora_checks.py: LoRA files loaded the way
the host's LoraLoader does, ...). HOST_FACING is found from the sources (nothing to keep listed); their
tests carry the ``host`` marker (``-m host`` works too).
``--host-only`` does not even import the other test files (named explicitly, they are deselected).
The pytest header names the host tree and its version.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import comfy_host

_TESTS = Path(__file__).resolve().parent


def _imports(path: Path, modules: set[str]) -> bool:
    """Whether the file imports any of `modules` (top-level or inside a function)."""
    names = "|".join(sorted(map(re.escape, modules)))
    pattern = rf"^\s*(?:import|from)\s+(?:{names})\b"
    return re.search(pattern, path.read_text(encoding="utf-8", errors="replace"), re.M) is not None


def _host_facing_files() -> frozenset[str]:
    """Test files that import tests/comfy_host.py directly or through a helper module in tests/ that
    imports it (lora_checks.py, ...): found from the sources, so a new host-facing file is included
    without being listed anywhere."""
    helpers = {"comfy_host"}
    others = [p for p in _TESTS.glob("*.py") if not p.name.startswith("test_") and p.name != "conftest.py"]
    grown = True
    while grown:
        grown = False
        for p in others:
            if p.stem not in helpers and _imports(p, helpers):
                helpers.add(p.stem)
                grown = True
    return frozenset(p.name for p in _TESTS.glob("test_*.py") if _imports(p, helpers))


HOST_FACING = _host_facing_files()


def pytest_addoption(parser):
    parser.addoption("--host-only", action="store_true", default=False,
                     help="run only the host-facing test files (those importing tests/comfy_host.py, see "
                          "tests/conftest.py); "
                          "scripts/test.sh uses it for the second host, ComfyUI v0.33.0")


def pytest_configure(config):
    config.addinivalue_line("markers", "host: imports ComfyUI or starts the real host (tests/conftest.py)")


def _is_test_file(path) -> bool:
    return path.suffix == ".py" and path.name.startswith("test_")


def pytest_ignore_collect(collection_path, config):
    if config.getoption("--host-only") and _is_test_file(collection_path) \
            and collection_path.name not in HOST_FACING:
        return True
    return None


def pytest_collection_modifyitems(config, items):
    keep, dropped = [], []
    for item in items:
        if item.path.name in HOST_FACING:
            item.add_marker(pytest.mark.host)
            keep.append(item)
        else:
            dropped.append(item)
    if config.getoption("--host-only") and dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_report_header(config):
    d = comfy_host.comfyui_dir()
    where = f"{d} (version {comfy_host.comfyui_version() or 'unknown'})" if comfy_host.comfyui_available() else f"{d} (absent)"
    return [f"ComfyUI host: {where}" + ("; --host-only" if config.getoption("--host-only") else "")]


@pytest.fixture()
def full_disk(tmp_path):
    """A folder on a full 1 MB tmpfs (tests/full_disk.py): `.path`, and `.free()` deletes the filler."""
    import types

    import full_disk as disk

    mnt = tmp_path / "disk"
    filler = disk.fill(mnt)
    yield types.SimpleNamespace(path=mnt, free=filler.unlink)
    disk.unmount(mnt)
