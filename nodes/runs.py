"""Live state of training runs, keyed by the trainer node's id, and the HTTP routes that expose it.

The key is the node's *execution id* - its `unique_id` in the prompt, which is also what ComfyUI's
own messages carry: "7" for a node on the top level of the workflow, "12:5" for node 5 inside the
subgraph whose instance on the top level is node 12 ("12:30:5" when nested deeper). The frontend
computes the same id for a node (ComfyUI_frontend `getExecutionIdByNode`); js/apt_widget.js does
it by walking from the node's graph up to the root graph. In URLs the id may be percent-encoded
("12%3A5"); aiohttp decodes it.

GET  /apt/runs                     -> {node_id: summary} of every run this server has seen
GET  /apt/runs/{node_id}?since=N   -> state + history (only events with step > N when `since` given);
                                      a node without a run: 200 {"node_id", "status": "idle",
                                      "history": []}
POST /apt/runs/{node_id}/stop      -> graceful stop after the current step: checkpoint + LoRA saved,
                                      the node finishes normally (Cancel instead marks it cancelled)
(ComfyUI also serves them under /api/...)
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("apt_lora_trainer")

ACTIVE = ("starting", "encoding", "training", "stopping")


@dataclass
class RunState:
    node_id: str
    prompt_id: str | None = None
    status: str = "starting"  # starting|encoding|training|stopping|finished|stopped|cancelled|error
    lora_name: str = ""
    step: int = 0
    total_steps: int = 0
    resumed_from: int = 0
    message: str = ""
    checkpoint: str | None = None
    started: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    history: list[dict] = field(default_factory=list)
    previews: list[dict] = field(default_factory=list)  # PreviewImage dicts + "view": /view query params
    stop_requested: bool = False
    _stop_callback: Callable[[], None] | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {"node_id": self.node_id, "prompt_id": self.prompt_id, "status": self.status,
                "lora_name": self.lora_name, "step": self.step, "total_steps": self.total_steps,
                "resumed_from": self.resumed_from, "message": self.message, "checkpoint": self.checkpoint,
                "started": self.started, "updated": self.updated, "stop_requested": self.stop_requested,
                "loss": last.get("loss"), "gamma": last.get("gamma"), "it_per_s": last.get("it_per_s"),
                "eta_s": last.get("eta_s")}

    def to_dict(self, since: int | None = None) -> dict[str, Any]:
        hist = self.history if since is None else [h for h in self.history if h.get("step", 0) > since]
        return {**self.summary(), "history": list(hist), "previews": list(self.previews)}


class RunRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._runs: dict[str, RunState] = {}

    def start(self, node_id: str, **fields) -> RunState:
        with self._lock:
            run = RunState(node_id=str(node_id), **fields)
            self._runs[str(node_id)] = run
            return run

    def get(self, node_id: str) -> RunState | None:
        with self._lock:
            return self._runs.get(str(node_id))

    def update(self, run: RunState, **fields) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(run, k, v)
            run.updated = time.time()

    def add_event(self, run: RunState, event: dict) -> None:
        with self._lock:
            run.history.append(event)
            run.step = int(event.get("step", run.step))
            run.updated = time.time()

    def set_stop_callback(self, run: RunState, callback: Callable[[], None] | None) -> None:
        with self._lock:
            run._stop_callback = callback
            pending = run.stop_requested
        if pending and callback is not None:
            callback()

    def request_stop(self, node_id: str) -> RunState | None:
        """Mark the run as stopping; returns it, or None when there is no active run."""
        with self._lock:
            run = self._runs.get(str(node_id))
            if run is None or run.status not in ACTIVE:
                return None
            run.stop_requested = True
            run.status = "stopping"
            run.updated = time.time()
            callback = run._stop_callback
        if callback is not None:
            callback()
        return run

    def all(self) -> dict[str, dict]:
        with self._lock:
            return {k: v.summary() for k, v in self._runs.items()}

    def snapshot(self, node_id: str, since: int | None = None) -> dict | None:
        with self._lock:
            run = self._runs.get(str(node_id))
            return None if run is None else run.to_dict(since)


RUNS = RunRegistry()
_registered = False


def send(event: str, data: dict) -> None:
    """PromptServer.send_sync (thread-safe) when a server runs; silently nothing otherwise."""
    server = _prompt_server()
    if server is None:
        return
    try:
        server.send_sync(event, data)
    except Exception:  # noqa: BLE001 - progress messages must never break training
        log.debug("apt: could not send %s", event, exc_info=True)


def _prompt_server():
    """PromptServer.instance inside a running ComfyUI, else None (never imports server.py itself)."""
    module = sys.modules.get("server")
    cls = getattr(module, "PromptServer", None) if module is not None else None
    return getattr(cls, "instance", None)


def register_routes() -> bool:
    """Add the /apt/runs routes to PromptServer.instance.routes (once). False when no server runs."""
    global _registered
    if _registered:
        return True
    server = _prompt_server()
    if server is None:  # imported outside a running ComfyUI (unit tests, tools)
        return False
    add_routes(server.routes)
    _registered = True
    return True


def add_routes(routes) -> None:
    """Register the handlers on an aiohttp RouteTableDef."""
    routes.get("/apt/runs")(handle_list)
    routes.get("/apt/runs/{node_id}")(handle_get)
    routes.post("/apt/runs/{node_id}/stop")(handle_stop)


async def handle_list(request):
    from aiohttp import web

    return web.json_response(RUNS.all())


async def handle_get(request):
    from aiohttp import web

    node_id = request.match_info["node_id"]
    since = request.query.get("since")
    try:
        since_step = int(since) if since not in (None, "") else None
    except ValueError:
        return web.json_response({"error": "since must be an integer step"}, status=400)
    snap = RUNS.snapshot(node_id, since_step)
    if snap is None:  # no run for this node (yet): a normal answer, not an error
        return web.json_response(idle_snapshot(node_id))
    return web.json_response(snap)


def idle_snapshot(node_id: str) -> dict[str, Any]:
    """What GET /apt/runs/{node_id} answers for a node that has no run on this server."""
    return {"node_id": str(node_id), "status": "idle", "history": []}


async def handle_stop(request):
    from aiohttp import web

    node_id = request.match_info["node_id"]
    run = RUNS.request_stop(node_id)
    if run is None:
        return web.json_response({"node_id": node_id, "stopping": False,
                                  "error": "no training run is active for this node"}, status=409)
    send("apt.status", run.summary())
    return web.json_response({"node_id": node_id, "stopping": True, "step": run.step})
