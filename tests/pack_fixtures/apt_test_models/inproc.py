"""In-process loading of the pack and of this fixture for unit tests (no server).

`load_pack()` imports ComfyUI's modules (tests/comfy_host.import_comfy, CPU), then the repository
root as a package the way ComfyUI's `load_custom_node` does (spec from <root>/__init__.py under
its own name), so the pack's relative imports and its `nodes` subpackage are exercised exactly as
in the host, without clashing with ComfyUI's top-level `nodes` module.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PACK_NAME = "apt_lora_trainer_pack"
FIXTURE_NAME = "apt_test_models"


def _load(name: str, folder: Path):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_pack():
    """-> (comfy, pack module, fixture module)."""
    import comfy_host

    comfy = comfy_host.import_comfy()
    import comfy.model_management  # noqa: F401  (before the pack, like in the host)

    pack = _load(PACK_NAME, REPO)
    fixture = _load(FIXTURE_NAME, HERE)
    return comfy, pack, fixture


def pack_module(name: str):
    """A submodule of the pack's `nodes` package, e.g. pack_module("comfy_backbone")."""
    import importlib

    load_pack()
    return importlib.import_module(f"{PACK_NAME}.nodes.{name}")
