"""Smoke test of `python -m benchmarks.speed` on the tiny model (CPU): every row runs and reports
finite positive times. Not a timed test: nothing here asserts a speed."""

from __future__ import annotations

import json
import math
import re

import pytest

import comfy_host
from benchmarks import speed

STEPS, WARMUP = 2, 1
BASE = ["--device", "cpu", "--model", "tiny", "--resolution", "64", "--rank", "8",
        "--steps", str(STEPS), "--warmup", str(WARMUP), "--threads", "1"]


def _comfy_expected() -> bool:
    return comfy_host.comfyui_available() or comfy_host.host_required()


def _check_timed_row(row):
    assert row["status"] == "ok", (row["key"], row["reason"])
    assert len(row["times_ms"]) == STEPS and len(row["warmup_ms"]) == WARMUP
    for v in row["times_ms"] + [row["median_ms"], row["min_ms"], row["max_ms"]]:
        assert math.isfinite(v) and v > 0, (row["key"], v)
    assert row["setup_s"] is not None and row["setup_s"] >= 0


def test_speed_benchmark_tiny_cpu_every_row(tmp_path):
    out = tmp_path / "speed.json"
    code = speed.main(BASE + ["--gradient-checkpointing", "off", "--no-flops", "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, [(r["key"], r["reason"]) for r in result["rows"] if r["status"] == "error"]

    rows = {r["key"]: r for r in result["rows"]}
    forward_rows = [rid for rid, (_, _, kind) in speed.ROWS.items() if kind == "forward"]
    assert len(forward_rows) >= 2
    expected = forward_rows + [f"{rid}@gc_off" for rid in speed.STEP_ROWS]
    assert sorted(rows) == sorted(expected)
    for key in expected:
        if key.startswith("comfy@") and not _comfy_expected():
            assert rows[key]["status"] == "not_measured" and rows[key]["reason"]
            continue
        _check_timed_row(rows[key])

    ratios = {q["name"] for q in result["ratios"]}
    assert {"APT / DreamBooth", "APT / (DreamBooth + prior)", "naive (LoRA step + prior) / APT"} <= ratios
    for q in result["ratios"]:
        assert math.isfinite(q["value"]) and q["value"] > 0
    # Targets are for an H100 at 1024²: on the tiny CPU model every one reads "not measured".
    assert result["targets"] and all(t["status"] == "not measured" for t in result["targets"])
    assert result["machine"]["cpu"] and result["machine"]["versions"]["torch"]
    assert result["command"].startswith("python -m benchmarks.speed ")
    one_off = result["one_off"]
    assert one_off["model preparation: build UNet (random init on device)"] > 0
    assert one_off["caching: encode one image + caption (cold)"] > 0
    assert "| apt |" in result["markdown"]


def test_speed_benchmark_sequential_with_checkpointing_and_flops(tmp_path):
    """The GPU path's schedule (one shared UNet, rows one after the other, each restoring it),
    gradient checkpointing, the FLOP count and the per-row memory probe."""
    out = tmp_path / "speed.json"
    code = speed.main(BASE + ["--gradient-checkpointing", "on", "--schedule", "sequential",
                              "--variants", "dreambooth,apt,naive_prior", "--skip-caching",
                              "--json", str(out)])
    result = json.loads(out.read_text())
    assert code == 0, [(r["key"], r["reason"]) for r in result["rows"] if r["status"] == "error"]
    assert [r["key"] for r in result["rows"]] == ["dreambooth@gc_on", "apt@gc_on", "naive_prior@gc_on"]
    for row in result["rows"]:
        _check_timed_row(row)
        assert row["flops"] > 0
        assert "left_unet_dirty" not in row["notes"]
    # APT adds a no-grad prior forward to the DreamBooth step: more FLOPs, whatever the timings.
    flops = {r["id"]: r["flops"] for r in result["rows"]}
    assert flops["apt"] > flops["dreambooth"]
    assert flops["naive_prior"] > flops["dreambooth"]


def test_unknown_variant_is_rejected():
    with pytest.raises(SystemExit):
        speed.parse_args(["--device", "cpu", "--variants", "apt,warp_drive"])


def test_profile_regions_read_the_cpu_side_entry_not_the_gpu_annotation():
    """On CUDA, key_averages() lists a labelled region twice: the CPU-side range (CPU time, kernel
    time inside it) and a GPU-timeline annotation (no CPU time, span with gaps). The report reads
    the first, whichever order they come in."""
    from types import SimpleNamespace as E

    from benchmarks.profile_step import region_times

    cpu_side = E(key="unet forward: fine-tuned", cpu_time_total=1_113_000.0, count=2, device_time_total=84_688.0)
    annotation = E(key="unet forward: fine-tuned", cpu_time_total=0.0, count=2, device_time_total=1_055_200.0)
    aten = E(key="aten::mm", cpu_time_total=5.0, count=1, device_time_total=1.0)
    for events in ([cpu_side, annotation, aten], [annotation, cpu_side, aten]):
        regions = region_times(events, steps=2)
        assert set(regions) == {"unet forward: fine-tuned"}
        r = regions["unet forward: fine-tuned"]
        assert r["per_step_ms"] == pytest.approx(556.5)
        assert r["device_ms_per_step"] == pytest.approx(42.344)
        assert r["calls_per_step"] == 1
    # on CPU only the CPU-side entry exists
    assert region_times([cpu_side], 2)["unet forward: fine-tuned"]["device_ms_per_step"] == pytest.approx(42.344)


def test_preview_flops_counts_the_sdxl_layout_and_its_committed_table_is_current(tmp_path):
    """The preview-cost count runs on the meta device; at 1024 px it reproduces the committed table
    (the tooltip's figures), and its UNet forward equals the speed run's FLOP count."""
    from benchmarks import preview_flops

    out = tmp_path / "preview.md"
    assert preview_flops.main(["--resolution", "1024", "--markdown", str(out)]) == 0
    committed = (preview_flops.REPO_ROOT / "benchmarks" / "results" / "preview_flops_sdxl1024.md").read_text()
    numbers = lambda text: [float(x) for x in re.findall(r"\d+\.\d+|\d+", text.split("| what")[1])]  # noqa: E731
    assert numbers(out.read_text()) == pytest.approx(numbers(committed), rel=0.02)  # torch's counter may move a hair
    assert "| UNet forward, batch 1 | 6.76 |" in committed  # = speed_sdxl_h100.md's forward rows: 6.76 T


def _module_constants(path) -> dict:
    """The literal module-level assignments of a file, read without importing it (nodes/ needs ComfyUI)."""
    import ast

    consts = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            names = [e.id for e in target.elts] if isinstance(target, ast.Tuple) else [getattr(target, "id", None)]
            try:
                values = ast.literal_eval(node.value)
            except ValueError:
                continue
            consts.update(zip(names, values) if isinstance(target, ast.Tuple) else {names[0]: values})
    return consts


def test_preview_flops_counts_the_previews_the_node_renders():
    """The cost table's sampler steps, prompts and interval are the node's own (a change there
    must be counted again)."""
    from benchmarks import preview_flops

    nodes = preview_flops.REPO_ROOT / "nodes"
    previews = _module_constants(nodes / "previews.py")
    assert preview_flops.PREVIEW_STEPS == previews["STEPS"]
    assert preview_flops.PREVIEW_PROMPTS == 1 + len(previews["NEW_CONTEXTS"])  # the first caption + new contexts
    every = re.search(r'io\.Int\.Input\("preview_every".*?default=(\d+)', (nodes / "node_defs.py").read_text(), re.S)
    assert preview_flops.PREVIEW_EVERY == int(every.group(1))
