"""Packaging metadata: pyproject.toml ([project] + Comfy Registry [tool.comfy]), requirements.txt
(what ComfyUI-Manager installs from a git clone), node_list.json (how ComfyUI-Manager's scanner learns
the V3 node names) and the example-workflow folder. No host needed except for the last test, which
parses pyproject.toml with ComfyUI's own comfy_config parser (skipped when the host tree is missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
# comfy registry node id rules: < 100 chars, alphanumerics and - _ ., no consecutive specials,
# no leading digit/special
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def requirements() -> list[str]:
    out = []
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def test_project_section(pyproject):
    p = pyproject["project"]
    assert NODE_ID.match(p["name"]) and len(p["name"]) < 100, p["name"]
    assert "comfyui" not in p["name"].lower(), "the registry asks not to put 'ComfyUI' in the node id"
    assert SEMVER.match(p["version"]), p["version"]
    assert p["description"].strip() and len(p["description"]) < 300
    lic = p["license"]
    assert isinstance(lic, dict) and (lic.get("text") or lic.get("file")), "license = { text = ... } or { file = ... }"
    if lic.get("file"):
        assert (REPO / lic["file"]).is_file()
    assert p.get("requires-python")


def test_dependencies_do_not_pin_torch_and_match_requirements_txt(pyproject):
    deps = pyproject["project"]["dependencies"]
    assert not {_name(d) for d in deps} & TORCH_FAMILY, "the host (ComfyUI) owns torch: never list it"
    assert not {_name(r) for r in requirements()} & TORCH_FAMILY
    assert sorted(d.replace(" ", "") for d in deps) == sorted(r.replace(" ", "") for r in requirements()), \
        "pyproject [project].dependencies and requirements.txt differ"
    for d in deps:
        assert "==" not in d, f"{d}: exact pins in a custom node fight the user's other packs"


def test_tool_comfy_section(pyproject):
    c = pyproject["tool"]["comfy"]
    assert isinstance(c["PublisherId"], str) and c["PublisherId"].strip()
    assert c["DisplayName"].strip()
    assert isinstance(c["Icon"], str)
    assert not c["Icon"] or c["Icon"].startswith("https://"), "Icon must be a URL"
    assert isinstance(c["includes"], list)
    for inc in c["includes"]:
        assert (REPO / inc).exists(), inc
    with Image.open(REPO / "docs" / "icon.png") as icon:  # the icon the Icon URL is to point at
        assert icon.width <= 800 and icon.height <= 400
    assert c.get("requires-comfyui", "").startswith(">=")


def test_web_directory_is_declared_exactly_once(pyproject):
    """WEB_DIRECTORY (keyed by folder name) and [tool.comfy].web (keyed by project name) would both be
    served by ComfyUI 0.3.75 for any clone not named exactly like the project: every .js twice."""
    init = (REPO / "__init__.py").read_text(encoding="utf-8")
    m = re.search(r'^WEB_DIRECTORY\s*=\s*["\'](.+?)["\']', init, re.MULTILINE)
    assert m and (REPO / m.group(1)).is_dir()
    assert "web" not in pyproject["tool"]["comfy"]
    assert list((REPO / m.group(1)).glob("*.js"))


def test_node_list_json_names_the_v3_nodes():
    nl = json.loads((REPO / "node_list.json").read_text(encoding="utf-8"))
    src = (REPO / "nodes" / "node_defs.py").read_text(encoding="utf-8")
    ids = set(re.findall(r'node_id="([A-Za-z0-9_]+)"', src))
    assert ids and set(nl) == ids, (sorted(nl), sorted(ids))
    assert all(isinstance(v, str) and v for v in nl.values())
    # the scanner's own patterns find nothing in the pack, which is why node_list.json exists
    for py in list(REPO.glob("*.py")) + list((REPO / "nodes").glob("*.py")):
        assert "NODE_CLASS_MAPPINGS" not in py.read_text(encoding="utf-8") or py.name == "__init__.py"


def test_no_runtime_pip_install():
    offenders = []
    for folder in ("nodes", "apt_core", "js"):
        for f in (REPO / folder).rglob("*"):
            if f.suffix in (".py", ".js") and re.search(r"pip(\.main|\s+install|['\"],\s*['\"]install)",
                                                        f.read_text(encoding="utf-8")):
                offenders.append(str(f.relative_to(REPO)))
    assert not (REPO / "install.py").exists(), "no install.py: the registry forbids installing at runtime"
    assert not offenders, offenders


def test_workflow_folder_holds_only_templates_and_thumbnails():
    files = sorted(p.name for p in (REPO / "workflows").iterdir())
    stems = {Path(f).stem for f in files}
    assert files and all(Path(f).suffix in (".json", ".jpg") for f in files), files
    for s in stems:
        assert f"{s}.json" in files and f"{s}.jpg" in files, f"{s}: needs <name>.json and <name>.jpg"
        json.loads((REPO / "workflows" / f"{s}.json").read_text(encoding="utf-8"))
        with Image.open(REPO / "workflows" / f"{s}.jpg") as im:
            assert im.format == "JPEG"


def test_comfyui_parses_the_pyproject(pyproject):
    """ComfyUI's own parser (comfy_config, the registry's schema) reads the same values."""
    import comfy_host as ch

    root = ch.require_comfyui()
    import sys

    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(str(REPO))
    assert cfg.project.name == pyproject["project"]["name"]
    assert cfg.project.version == pyproject["project"]["version"]
    assert cfg.tool_comfy.publisher_id == pyproject["tool"]["comfy"]["PublisherId"]
    assert cfg.tool_comfy.display_name == pyproject["tool"]["comfy"]["DisplayName"]
    assert cfg.tool_comfy.web is None
    assert cfg.project.supported_comfyui_version == pyproject["tool"]["comfy"]["requires-comfyui"]
    assert "OS Independent" in cfg.project.supported_os


# ---- what a user downloads ---------------------------------------------------------------------
# ComfyUI-Manager `git clone`s the repository (every tracked file lands in custom_nodes); the Comfy
# Registry ships the zip that comfy-cli's `comfy node pack` / `publish` builds: the tracked files
# minus what .comfyignore matches (plus pyproject's `includes`).
MAX_TRACKED_BYTES = 25_000_000
MAX_ZIP_BYTES = 20_000_000
DEVELOPER_ONLY = ("tests/", "js/tests/", "benchmarks/", "quality/", "scripts/", ".ci/", "requirements-dev.txt")


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f and (REPO / f).is_file()]


def test_tracked_files_stay_a_slim_pack():
    sizes = {f: (REPO / f).stat().st_size for f in tracked_files()}
    total = sum(sizes.values())
    biggest = sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
    assert total <= MAX_TRACKED_BYTES, f"tracked files: {total / 1e6:.1f} MB > 25 MB; biggest: {biggest}"


def comfy_cli() -> str | None:
    exe = os.environ.get("APT_COMFY_CLI") or str(REPO / ".cache" / "comfy-cli" / "bin" / "comfy")
    return exe if Path(exe).is_file() else None


@pytest.fixture(scope="module")
def registry_zip(tmp_path_factory) -> Path:
    """The zip the registry tooling builds from the tracked files as they are in the working tree."""
    exe = comfy_cli()
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes", "on"):
            pytest.fail("comfy-cli is missing (scripts/fetch_comfy_cli.sh installs it into .cache/comfy-cli)")
        pytest.skip("comfy-cli not installed (bash scripts/fetch_comfy_cli.sh)")
    src = tmp_path_factory.mktemp("registry") / "apt-lora-trainer"
    for f in tracked_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run(["git", "add", "-A"], cwd=src, check=True)
    env = {**os.environ, "HOME": str(src.parent / "home")}
    r = subprocess.run([exe, "--skip-prompt", "--no-enable-telemetry", "node", "pack"], cwd=src, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and (src / "node.zip").is_file(), r.stdout + r.stderr
    return src / "node.zip"


def test_registry_zip_holds_what_a_user_needs_and_no_developer_files(registry_zip):
    with zipfile.ZipFile(registry_zip) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
    size = registry_zip.stat().st_size
    print(f"registry zip: {size / 1e6:.2f} MB, {len(names)} files")
    assert size <= MAX_ZIP_BYTES, f"{size / 1e6:.1f} MB"
    assert not [n for n in names if n.startswith(DEVELOPER_ONLY) or n.startswith(".")]
    shipped = set(names)
    needed = {"__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md", "node_list.json"}
    needed |= {f for f in tracked_files() if f.startswith(("nodes/", "apt_core/", "js/", "workflows/"))
               and not f.startswith("js/tests/")}  # the widget's node tests stay in git
    # the pictures and pages the README links to (relative links), e.g. docs/*.png
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = [link for pair in re.findall(r"\]\(([^)#\s]+)\)|<img src=\"([^\"]+)\"", readme) for link in pair if link]
    needed |= {m for m in links if not re.match(r"[a-z]+:", m) and not m.startswith(DEVELOPER_ONLY)}
    assert not needed - shipped, sorted(needed - shipped)


@pytest.mark.integration
def test_registry_zip_loads_in_comfyui(registry_zip, tmp_path):
    """Unpacked as ComfyUI-Manager unpacks a registry download: the nodes load and the example
    workflows are listed, with nothing the zip left out."""
    import comfy_host as ch

    ch.require_comfyui()
    pack = tmp_path / "pack"
    with zipfile.ZipFile(registry_zip) as z:
        z.extractall(pack)
    with ch.ComfyServer(tmp_path / "comfy", pack_dir=pack) as server:
        info = server.get_json("/object_info")
        assert {"APTDatasetLoader", "APTCaption", "APTAtaSettings", "APTRegSettings", "APTTrainer"} <= set(info)
        assert not server.import_failed_lines()
        listed = server.get_json("/workflow_templates").get(ch.DEFAULT_PACK_LINK_NAME, [])
        assert sorted(listed) == sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
