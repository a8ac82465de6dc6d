"""What a weights JSON config may contain, field by field, checked before anything is built or allocated.

A weights config comes from a file a user was given, so every field is checked for its type (``true``
is not a number, ``1.0`` not a count), its range (an architecture that would build a multi-GB network,
an input grid of a million pixels) and its nesting (a file of ten thousand ``[`` must not exhaust the
parser). :func:`parse_config_text` parses strictly (no ``NaN``/``Infinity``, no duplicate keys, bounded
size and depth); :func:`check_config` checks the fields and returns the first problem as one sentence
naming the field (``architecture.base_width must be …, got …``). Standard library only: the Slicer
module reads configs in a Python without torch.

The ranges are generous bounds on what the library can run, not the shipped values: ``base_width`` up
to 64 with ``depth`` up to 6 already means about 140 M parameters.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from typing import Any, Mapping, Optional

from .network_config import NetworkConfig
from .preprocessing import WINDOW_FIELD_OF_VIEW, WINDOWS, NormalisationConfig

#: Largest config file read (real configs are a few kB; the training record may add some).
MAX_CONFIG_BYTES = 8 * 1024 * 1024
#: Deepest nesting of lists/objects accepted anywhere in the file.
MAX_DEPTH = 24

#: architecture field → (type, minimum, maximum); ``bool`` fields have no range.
ARCHITECTURE_FIELDS: dict[str, tuple[type, Optional[float], Optional[float]]] = {
    "in_channels": (int, 1, 1),  # the segmenter feeds one image channel
    "num_classes": (int, 2, 64),
    "base_width": (int, 1, 64),
    "depth": (int, 3, 6),
    "use_bsn": (bool, None, None),
    "use_sag": (bool, None, None),
    "deep_supervision": (bool, None, None),
    "prelim_width": (int, 1, 256),
    "detector_width": (int, 1, 256),
    "detector_hidden": (int, 1, 4096),
    "detector_pool": (int, 1, 32),
    "negative_slope": (float, 0.0, 1.0),
    "sag_apply": (str, None, None),
}
MODEL_INPUT_FIELDS: dict[str, tuple[type, Optional[float], Optional[float]]] = {
    "spacing_mm": (float, 0.05, 10.0),
    "size": (int, 16, 1024),
    "window": (str, None, None),
}
NORMALISATION_FIELDS: dict[str, tuple[type, Optional[float], Optional[float]]] = {
    "method": (str, None, None),
    "low": (float, 0.0, 100.0),
    "high": (float, 0.0, 100.0),
}
#: Estimated parameters above which an architecture is refused before it is built.
MAX_PARAMETERS = 200_000_000


class ConfigProblem(ValueError):
    """One problem with a weights config, as a sentence without the file name."""


def _refuse_constant(name: str) -> Any:
    raise ConfigProblem(f"the file holds {name}, which is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigProblem(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _depth(obj: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, d = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_config_text(data: bytes) -> Any:
    """Parse a config file's bytes strictly; :class:`ConfigProblem` says why not."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigProblem(f"it is {len(data)} bytes long; a weights config is at most {MAX_CONFIG_BYTES}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigProblem(f"it is not UTF-8 text ({exc})") from None
    # Cheap bound before the parser recurses: no JSON nesting deeper than the brackets it opens.
    if max(text.count("["), text.count("{")) > MAX_DEPTH and _bracket_depth(text) > MAX_DEPTH:
        raise ConfigProblem(f"it nests lists/objects more than {MAX_DEPTH} deep")
    try:
        raw = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ConfigProblem(f"it is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigProblem(f"it nests lists/objects more than {MAX_DEPTH} deep") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts (4300)
        raise ConfigProblem(f"it holds a value that cannot be read as a number: {exc}") from None
    if _depth(raw) > MAX_DEPTH:
        raise ConfigProblem(f"it nests lists/objects more than {MAX_DEPTH} deep")
    return raw


def _bracket_depth(text: str) -> int:
    """Deepest bracket nesting outside strings (a bound on the JSON nesting)."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth -= 1
    return deepest


def _type_name(t: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[t]


def _check_value(where: str, value: Any, kind: type, low: Optional[float], high: Optional[float]) -> None:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    span = "" if low is None or high is None else f" in {low:g}..{high:g}" if low != high else f" equal to {low:g}"
    if not ok:
        raise ConfigProblem(f"{where} must be {_type_name(kind)}{span}, got {_show(value)}")
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigProblem(f"{where} must be {_type_name(kind)}{span}, got {_show(value)}")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_object(where: str, obj: Any, fields: Mapping[str, tuple[type, Optional[float], Optional[float]]],
                  required: tuple[str, ...]) -> None:
    if not isinstance(obj, dict):
        raise ConfigProblem(f"{where} must be a JSON object, got {_show(obj)}")
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise ConfigProblem(f"unknown {where} keys: {', '.join(unknown)} (weights made by a newer or different ParaspinalSeg?)")
    missing = [k for k in required if k not in obj]
    if missing:
        raise ConfigProblem(f"{where} lacks {', '.join(missing)}")
    for key, value in obj.items():
        try:
            _check_value(f"{where}.{key}", value, *fields[key])
        except ConfigProblem as exc:
            raise ConfigProblem(f"invalid {where}: {exc}") from None


#: The network's own defaults (a config may leave a field out): read from NetworkConfig, never restated.
_ARCH_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(NetworkConfig)}


def _arch(arch: Mapping[str, Any], key: str) -> int:
    return int(arch.get(key, _ARCH_DEFAULTS[key]))


def estimated_parameters(arch: Mapping[str, Any]) -> int:
    """An upper estimate of the network's parameter count from its architecture fields (no torch):
    encoder and decoder 3×3 convs dominate; the detectors and heads are added generously."""
    base, depth = _arch(arch, "base_width"), _arch(arch, "depth")
    c_in = _arch(arch, "in_channels")
    total = 0
    for level in range(depth):
        c = base * 2 ** level
        total += 9 * (c_in * c + c * c)  # encoder level
        if level < depth - 1:
            total += 4 * 2 * c * c + 9 * (2 * c * c + c * c)  # up-convolution and decoder level
        c_in = c
    width, hidden, pool = (_arch(arch, k) for k in ("detector_width", "detector_hidden", "detector_pool"))
    classes = _arch(arch, "num_classes")
    total += classes * (9 * 3 * width + 9 * width * width + width * pool * pool * hidden + hidden * 4)
    total += 9 * (base * 4 + base * 2 ** (depth - 1)) * _arch(arch, "prelim_width")
    return total


def check_config(raw: Any, *, known_architecture: Optional[set[str]] = None) -> None:
    """Check every field of a parsed weights config; raise :class:`ConfigProblem` for the first problem.

    ``known_architecture`` replaces the architecture field list (the network's own, when torch is there).
    """
    if not isinstance(raw, dict):
        raise ConfigProblem("it is not a JSON object")
    for key, kind in (("format", str), ("weights_file", str), ("weights_sha256", str)):
        if key in raw and not isinstance(raw[key], kind):
            raise ConfigProblem(f"{key} must be a string, got {_show(raw[key])}")
    if "format_version" in raw:
        _check_value("format_version", raw["format_version"], int, 1, 1_000_000)
    if "label_table_version" in raw and (isinstance(raw["label_table_version"], bool)
                                         or not isinstance(raw["label_table_version"], (str, int))):
        raise ConfigProblem(f"label_table_version must be a string, got {_show(raw['label_table_version'])}")
    for key in ("name", "created", "library_version"):
        if key in raw and (not isinstance(raw[key], str) or len(raw[key]) > 200):
            raise ConfigProblem(f"{key} must be a string of at most 200 characters, got {_show(raw[key])}")
    for key in ("training", "metrics"):
        if key in raw and not isinstance(raw[key], dict):
            raise ConfigProblem(f"{key} must be a JSON object, got {_show(raw[key])}")

    arch_fields = dict(ARCHITECTURE_FIELDS)
    if known_architecture is not None:
        arch_fields = {k: v for k, v in arch_fields.items() if k in known_architecture}
    _check_object("architecture", raw.get("architecture"), arch_fields, ())
    arch = raw["architecture"]
    params = estimated_parameters(arch)
    if params > MAX_PARAMETERS:
        raise ConfigProblem(
            f"architecture describes a network of about {params / 1e6:.0f} M parameters (base_width "
            f"{_arch(arch, 'base_width')}, depth {_arch(arch, 'depth')}); at most {MAX_PARAMETERS / 1e6:.0f} M are loaded"
        )
    _check_object("model_input", raw.get("model_input"), MODEL_INPUT_FIELDS, ("spacing_mm", "size"))
    # A weights file without the key predates it: the field-of-view window (see preprocessing.ModelInput).
    window = raw["model_input"].get("window", WINDOW_FIELD_OF_VIEW)
    if window not in WINDOWS:
        raise ConfigProblem(f"model_input.window must be one of {', '.join(WINDOWS)}, got {_show(window)}")
    size, depth = raw["model_input"]["size"], _arch(arch, "depth")
    if size % 2 ** (depth - 1):
        raise ConfigProblem(f"model_input.size {size} is not a multiple of {2 ** (depth - 1)} (2**(depth-1) for depth {depth})")
    norm = raw.get("normalisation")
    _check_object("normalisation", norm, NORMALISATION_FIELDS, ("low", "high"))
    if norm.get("method", NormalisationConfig.method) != NormalisationConfig.method:
        raise ConfigProblem(f"normalisation.method must be \"percentile\", got {_show(norm['method'])}")
    if not norm["low"] < norm["high"]:
        raise ConfigProblem(f"normalisation.low ({norm['low']}) must be below normalisation.high ({norm['high']})")
    learned = raw.get("structures_learned")
    if learned is not None and (not isinstance(learned, list) or len(learned) > 64
                                or any(isinstance(v, bool) or not isinstance(v, int) for v in learned)):
        raise ConfigProblem(f"structures_learned must be a list of label values, got {_show(learned)}")
