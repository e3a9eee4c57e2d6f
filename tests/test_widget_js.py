"""Runs the browser extension's JavaScript tests (js/tests/*.test.mjs) with Node's own test runner.

They cover the live chart's plotting logic (js/apt_chart_model.js) and the ComfyUI extension
(js/apt_widget.js) behind stubs of the host's scripts/app.js and scripts/api.js. Needs `node` (>= 18);
skipped without it, except in CI (CI set), where a missing node is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JS_TESTS = sorted((ROOT / "js" / "tests").glob("*.test.mjs"))


def _node() -> str | None:
    found = shutil.which("node")
    if found:
        return found
    return "/usr/bin/node" if os.access("/usr/bin/node", os.X_OK) else None


def test_js_test_files_exist():
    names = {p.name for p in JS_TESTS}
    assert {"chart_model.test.mjs", "widget.test.mjs"} <= names, names


def test_node_test_runner_passes():
    node = _node()
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is required in CI to run js/tests (install Node.js >= 18)")
        pytest.skip("node is not installed: js/tests not run")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = int(version.lstrip("v").split(".")[0]) if version.startswith("v") else 0
    if major < 18:
        msg = f"node {version} is too old for `node --test` (needs >= 18)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    # explicit files rather than the directory: newer Node versions treat arguments as globs
    proc = subprocess.run([node, "--test", *map(str, JS_TESTS)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"node --test failed ({version}):\n{out[-20000:]}"
    assert "# fail 0" in out, out[-5000:]
