"""How the ComfyUI frontend turns a node definition (a V1 /object_info entry) into sockets and widgets.

Frontend rules reproduced (ComfyUI frontend 1.32.9): see scripts/build_workflows.py's docstring.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
# Combo inputs whose options are the files on the user's disk: any value is acceptable in a shipped graph.
FILE_COMBOS = {("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name"),
               ("LoraLoaderModelOnly", "lora_name")}


class SchemaError(ValueError):
    """A spec or a saved graph does not fit the live node schema."""


def _input_kind(spec: list) -> tuple[str, dict, list | None]:
    """(type, options, combo options or None) of one /object_info input spec."""
    first = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(first, list):
        return "COMBO", opts, list(first)
    if first == "COMBO":
        return "COMBO", opts, list(opts.get("options", []))
    return str(first), opts, None


def ordered_inputs(info: dict) -> list[tuple[str, str, dict, list | None, bool]]:
    """[(name, type, options, combo options, optional)] in the frontend's order."""
    out = []
    order = info.get("input_order") or {s: list(info.get("input", {}).get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {})
        for name in order.get(section, []):
            if name in specs:
                t, opts, combo = _input_kind(specs[name])
                out.append((name, t, opts, combo, section == "optional"))
    return out


def has_control_widget(name: str, t: str, opts: dict) -> bool:
    if t != "INT":
        return False
    flag = opts.get("control_after_generate")
    return bool(flag) if flag is not None else name in ("seed", "noise_seed")


def is_widget(t: str, opts: dict) -> bool:
    return t in WIDGET_TYPES and not opts.get("forceInput")


def widget_layout(info: dict) -> list[tuple[str, str | None]]:
    """Positions of `widgets_values`: (input name, None) for a value, (input name, "control") for
    the control-after-generate value that follows it."""
    out: list[tuple[str, str | None]] = []
    for name, t, opts, _combo, _opt in ordered_inputs(info):
        if is_widget(t, opts):
            out.append((name, None))
            if has_control_widget(name, t, opts):
                out.append((name, "control"))
    return out


def default_value(t: str, opts: dict, combo: list | None) -> Any:
    if "default" in opts:
        return opts["default"]
    if t == "COMBO":
        return combo[0] if combo else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[t]


def check_value(node_type: str, name: str, t: str, opts: dict, combo: list | None, value: Any) -> str | None:
    """Why `value` does not fit the input, or None."""
    if t == "BOOLEAN":
        return None if isinstance(value, bool) else f"expected a boolean, got {value!r}"
    if t in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (t == "INT" and not isinstance(value, int)):
            return f"expected {t}, got {value!r}"
        lo, hi = opts.get("min"), opts.get("max")
        if lo is not None and value < lo or hi is not None and value > hi:
            return f"{value!r} outside [{lo}, {hi}]"
        return None
    if t == "STRING":
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if t == "COMBO":
        if not isinstance(value, str):
            return f"expected one of the options, got {value!r}"
        if (node_type, name) in FILE_COMBOS:
            return None
        return None if value in (combo or []) else f"{value!r} is not one of {combo}"
    return None


def types_match(out_type: str, in_type: str) -> bool:
    if out_type == in_type or "*" in (out_type, in_type):
        return True
    a = {t.strip() for t in str(out_type).split(",")}
    b = {t.strip() for t in str(in_type).split(",")}
    return bool(a & b)
