"""APT LoRA Trainer: a ComfyUI custom node pack (loaded by ComfyUI from custom_nodes/).

ComfyUI imports this file as a package under a path-derived name. The training core `apt_core` is
a top-level package next to this file: it is imported once with this folder briefly on sys.path
(removed again, so the repository's other top-level folders never shadow anything in the host).
The nodes live in the subpackage `nodes` and are always imported relatively (a top-level `nodes`
is ComfyUI's own). Outside ComfyUI (e.g. pytest importing this folder as a package) nothing runs.
"""

import importlib
import importlib.util
import logging
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))

# Browser extension (live indicator chart on the APT Trainer node): every .js file here is served
# under /extensions/<pack>/ and loaded by the frontend.
WEB_DIRECTORY = "./js"


def _import_core():
    added = _ROOT not in sys.path
    if added:
        sys.path.insert(0, _ROOT)
    try:
        core = importlib.import_module("apt_core")
    finally:
        if added:
            sys.path.remove(_ROOT)
    where = os.path.dirname(os.path.abspath(getattr(core, "__file__", "") or ""))
    if where != os.path.join(_ROOT, "apt_core"):
        logging.warning("APT LoRA Trainer: using apt_core from %s instead of %s (another copy was "
                        "imported first)", where, os.path.join(_ROOT, "apt_core"))
    return core


if importlib.util.find_spec("comfy_api") is not None:
    _import_core()
    # V3 entry point: ComfyUI's nodes.load_custom_node calls it and registers get_node_list().
    from .nodes import comfy_entrypoint  # noqa: E402,F401

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
