"""Packaging metadata: pyproject.toml ([project] + Comfy Registry [tool.comfy]), requirements.txt
(what ComfyUI-Manager installs from a git clone), node_list.json (how ComfyUI-Manager's scanner learns
the V3 node names) and the example-workflow folder. No host needed except for the last test, which
parses pyproject.toml with ComfyUI's own comfy_config parser (skipped when the host tree is missing).
"""

from __future__ import annotations

import json
import re
import tomllib
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
