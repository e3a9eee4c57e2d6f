"""ComfyUI nodes of the APT LoRA Trainer pack (V3 schema, registered via `comfy_entrypoint`)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .node_defs import NODES
from .runs import register_routes


class AptLoraTrainerExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> AptLoraTrainerExtension:
    return AptLoraTrainerExtension()


# Routes must be on PromptServer.instance.routes before the server adds them (at import time).
register_routes()

__all__ = ["AptLoraTrainerExtension", "comfy_entrypoint", "NODES"]
