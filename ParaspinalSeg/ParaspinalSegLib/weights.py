"""Weights format: a ``safetensors`` file of tensors plus a JSON config next to it.

A model is stored as two files with the same stem::

    bsesnet_default.safetensors   the state dict (safetensors: plain tensors, no code, no pickle)
    bsesnet_default.json          everything needed to rebuild and use it (see ``WeightsConfig``)

The JSON records the architecture (``NetworkConfig.to_dict()``), the model input (pixel spacing,
size), the intensity normalisation, the label table version the model was trained on, the label
values the training data annotated (``structures_learned``), a description of the training data,
metrics, and the SHA-256 of the ``.safetensors`` file. The loader checks the file format and the
checksum *before* deserialising anything, and never executes code from either file.

``read_weights_config`` needs only the standard library (the Slicer module shows model information
in a Python without torch); ``save_weights`` and ``load_weights`` import torch lazily.

One room (past 500 lines) on purpose: the format, its writer and its loader change together (a field
added to the config is written by ``save_weights`` and checked by ``read_weights_config``); the JSON's
field-by-field checks live in :mod:`weights_schema`.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from . import __version__ as LIBRARY_VERSION
from .anatomy import BY_VALUE, LABEL_TABLE_VERSION, NUM_CLASSES
from .errors import ParaspinalSegError, WeightsError, import_torch
from .resources import resource
from .weights_schema import MAX_CONFIG_BYTES, ConfigProblem, check_config, estimated_parameters, parse_config_text
from .serialisation import json_ready

#: Value of the JSON ``"format"`` field that marks a ParaspinalSeg weights config.
FORMAT_NAME = "paraspinalseg-weights"
#: Version of the JSON layout this code writes; it reads this version and older ones.
FORMAT_VERSION = 1

#: The model shipped with the extension (may be absent in a development checkout).
DEFAULT_WEIGHTS = resource("Models/bsesnet_default.json")

PathLike = Union[str, Path]
#: Suffixes a weights path may have (the pickle ones are recognised in order to be refused with a reason).
_WEIGHTS_SUFFIXES = (".json", ".safetensors", ".pt", ".pth", ".bin", ".ckpt")

_REQUIRED_KEYS = (
    "format",
    "format_version",
    "architecture",
    "model_input",
    "normalisation",
    "label_table_version",
    "structures_learned",
    "weights_file",
    "weights_sha256",
)

# First bytes of files torch.save writes: a zip archive (default since torch 1.6) or a bare pickle.
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_BYTE = 0x80
# safetensors itself refuses JSON headers larger than this.
_MAX_HEADER_BYTES = 100_000_000


@dataclass
class WeightsConfig:
    """The JSON config of a weights file, as read from disk (plain data: no torch needed)."""

    architecture: dict[str, Any]
    model_input: dict[str, Any]
    normalisation: dict[str, Any]
    label_table_version: str
    structures_learned: list[int]
    weights_file: str
    weights_sha256: str
    name: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    library_version: str = ""
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    #: Where the JSON was read from (not stored in the file).
    json_path: Optional[Path] = None

    @property
    def weights_path(self) -> Path:
        """Absolute path of the ``.safetensors`` file (``weights_file`` is relative to the JSON)."""
        base = self.json_path.parent if self.json_path is not None else Path.cwd()
        return (base / self.weights_file).resolve()

    @property
    def model_version(self) -> str:
        """Short identifier shown to users and written next to results: name plus checksum prefix."""
        return f"{self.name or 'unnamed'} ({self.weights_sha256[:12]})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON content (without ``json_path``)."""
        d = dataclasses.asdict(self)
        d.pop("json_path")
        return d

    def network_config(self):
        """The architecture as a ``network.NetworkConfig`` (imports torch via ``network``)."""
        return _network_config_from_dict(self.architecture, self.json_path)

    def summary(self) -> str:
        """A few lines describing the model, for the Slicer panel and ``--help`` style output."""
        learned = ", ".join(BY_VALUE[v].name for v in self.structures_learned if v in BY_VALUE)
        lines = [
            f"model {self.model_version}",
            f"input {self.model_input.get('size')} px at {self.model_input.get('spacing_mm')} mm, "
            f"{str(self.model_input.get('window', 'field_of_view')).replace('_', '-')} window",
            f"structures learned: {learned}",
        ]
        if self.training.get("description"):
            lines.append(f"training data: {self.training['description']}")
        if self.metrics:
            shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.metrics.items()
                              if v is not None and not isinstance(v, (dict, list)))
            if shown:
                lines.append(f"metrics: {shown}")
        lines += self._cross_validation_lines()
        if self.created:
            lines.append(f"created {self.created} with ParaspinalSeg {self.library_version}")
        return "\n".join(lines)

    def _cross_validation_lines(self) -> list[str]:
        """One line per cross-validation recorded at export (``training.cross_validation``): mean and
        per-structure Dice, so users see the measured accuracy without opening the model card."""
        cvs = self.training.get("cross_validation")
        if not isinstance(cvs, dict):
            return []
        # A single CV is recorded flat (its metrics dict); several finished CVs by folder name.
        entries = {"": cvs} if "mean_dice" in cvs else {k: v for k, v in cvs.items() if isinstance(v, dict)}
        lines = []
        for label, cv in entries.items():
            mean = cv.get("mean_dice")
            if isinstance(mean, bool) or not isinstance(mean, (int, float)):
                continue
            k, folds = cv.get("k"), cv.get("folds_run")
            # The training record is free-form data from a file: anything unexpected is left out, not fatal.
            scope = f"{k}-fold" if isinstance(folds, list) and len(folds) == k else f"folds {folds} of {k}"
            parts = _dice_parts(cv.get("per_structure"))
            # Structures scored against labels derived by rule (training.derive_labels) are never in the mean.
            derived = _dice_parts(cv.get("per_structure_derived"))
            over = f" over the {len(parts)} manually labelled structures" if derived and parts else ""
            head = f"cross-validation{' ' + label if label else ''} ({scope}, {cv.get('slices', '?')} slices): mean Dice {100 * mean:.1f} %{over}"
            line = head + (f" ({', '.join(parts)})" if parts else "")
            if derived:
                line += f"; against derived labels, not manual outlines: {', '.join(derived)}"
            # training.train checks a CV against the exported model's data and configuration.
            if cv.get("matches_model") is False:
                reasons = cv.get("mismatch")
                reasons = [str(r) for r in reasons] if isinstance(reasons, list) and reasons else ["data or configuration differ"]
                line += " — NOT a measure of these weights: " + "; ".join(reasons)
            elif cv.get("matches_model") is None:
                line += " — not checked against these weights' data and configuration"
            lines.append(line)
        return lines


def _dice_parts(per: Any) -> list[str]:
    """``"<structure> <Dice %>"`` for each well-formed entry of a recorded ``per_structure`` block."""
    return [f"{BY_VALUE[int(v)].name} {100 * d['dice']:.1f}" for v, d in (per.items() if isinstance(per, dict) else ())
            if str(v).isdigit() and int(v) in BY_VALUE and isinstance(d, dict)
            and isinstance(d.get("dice"), (int, float)) and not isinstance(d.get("dice"), bool)]


# ----------------------------------------------------------------------------------------------------
# Paths


def _paths(path: PathLike) -> tuple[Path, Path]:
    """(json path, safetensors path) for a path given as ``.json``, ``.safetensors`` or a bare stem."""
    p = Path(path).expanduser()
    if p.suffix == ".json":
        return p, p.with_suffix(".safetensors")
    if p.suffix in _WEIGHTS_SUFFIXES[1:]:
        return p.with_suffix(".json"), p
    return p.with_name(p.name + ".json"), p.with_name(p.name + ".safetensors")


def _resolve_default(path: Optional[PathLike]) -> Path:
    if path is not None:
        return Path(path)
    if not DEFAULT_WEIGHTS.is_file():
        raise WeightsError(
            f"no shipped weights found at {DEFAULT_WEIGHTS}; pass --weights (or choose a weights file "
            "in the module panel) with a model trained by `python -m training`"
        )
    return DEFAULT_WEIGHTS


# ----------------------------------------------------------------------------------------------------
# Reading the config (standard library only)


def read_weights_config(path: Optional[PathLike] = None, *, check_label_table: bool = True) -> WeightsConfig:
    """Read and validate the JSON config of a weights file, without importing torch.

    ``path`` may name the ``.json``, the ``.safetensors`` or the common stem; ``None`` means the
    shipped model (:data:`DEFAULT_WEIGHTS`). Raises :class:`WeightsError` naming the problem: JSON
    missing, not valid JSON, not a ParaspinalSeg weights config, fields missing or of the wrong
    type, a newer format version, or (unless ``check_label_table=False``) a label table version
    different from this code's.
    """
    given = _resolve_default(path)
    json_path, weights_path = _paths(given)
    _refuse_non_weights_path(given, json_path)
    if not json_path.is_file():
        if given.suffix != ".json" and weights_path.is_file():
            _refuse_pickle(weights_path)
            raise WeightsError(
                f"weights config missing: {json_path} not found next to {weights_path} "
                "(a model is a .safetensors file plus a .json config with the same name)"
            )
        raise WeightsError(f"weights file not found: {given}")
    try:
        size = json_path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigProblem(f"it is {size} bytes long; a weights config is at most {MAX_CONFIG_BYTES}")
        raw = parse_config_text(json_path.read_bytes())
    except OSError as exc:
        raise WeightsError(f"weights config {json_path} cannot be read: {exc}") from exc
    except ConfigProblem as exc:
        raise WeightsError(f"weights config {json_path} is refused: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise WeightsError(
            f"{json_path} is not a ParaspinalSeg weights config (expected \"format\": \"{FORMAT_NAME}\")"
        )
    missing = [k for k in _REQUIRED_KEYS if k not in raw]
    if missing:
        raise WeightsError(f"weights config {json_path} lacks required fields: {', '.join(missing)}")
    version = raw["format_version"]
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise WeightsError(
            f"weights config {json_path} has format version {version}; this ParaspinalSeg "
            f"({LIBRARY_VERSION}) reads up to {FORMAT_VERSION}: update ParaspinalSeg"
        )
    try:
        check_config(raw)
        if raw["architecture"].get("num_classes", NUM_CLASSES) != NUM_CLASSES:
            raise ConfigProblem(
                f"architecture.num_classes must be {NUM_CLASSES} (background and the nine structures of label "
                f"table {LABEL_TABLE_VERSION}), got {raw['architecture']['num_classes']}"
            )
    except ConfigProblem as exc:
        raise WeightsError(f"weights config {json_path}: {exc}") from None
    if not isinstance(version, int) or version < 1:
        raise WeightsError(f"weights config {json_path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"weights config {json_path} has format version {version}; this ParaspinalSeg "
            f"({LIBRARY_VERSION}) reads up to {FORMAT_VERSION}: update ParaspinalSeg"
        )
    for key in ("architecture", "model_input", "normalisation"):
        if not isinstance(raw[key], dict):
            raise WeightsError(f"weights config {json_path}: \"{key}\" must be a JSON object")
    for key in ("training", "metrics"):
        if key in raw and not isinstance(raw[key], dict):
            raise WeightsError(f"weights config {json_path}: \"{key}\" must be a JSON object")
    _check_model_input(raw["model_input"], json_path)
    learned = raw["structures_learned"]
    if (
        not isinstance(learned, list)
        or not learned
        or not all(isinstance(v, int) and not isinstance(v, bool) and v in BY_VALUE for v in learned)
    ):
        raise WeightsError(
            f"weights config {json_path}: \"structures_learned\" must be a non-empty list of label values "
            f"{sorted(BY_VALUE)}, got {learned!r}"
        )
    sha = raw["weights_sha256"]
    if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise WeightsError(f"weights config {json_path}: \"weights_sha256\" is not a SHA-256 hex digest")
    wf = raw["weights_file"]
    if not isinstance(wf, str) or not wf or Path(wf).name != wf:
        # A bare file name only: the config may not point anywhere outside its own folder.
        raise WeightsError(f"weights config {json_path}: \"weights_file\" must be a file name next to the JSON, got {wf!r}")
    table = str(raw["label_table_version"])
    if check_label_table and table != LABEL_TABLE_VERSION:
        raise WeightsError(
            f"label table version mismatch: weights {json_path.name} were trained with label table "
            f"version {table}, this ParaspinalSeg uses version {LABEL_TABLE_VERSION}; "
            "the label values would mean different structures (retrain or use matching weights)"
        )
    return WeightsConfig(
        architecture=raw["architecture"],
        model_input=raw["model_input"],
        normalisation=raw["normalisation"],
        label_table_version=table,
        structures_learned=sorted(set(learned)),
        weights_file=wf,
        weights_sha256=sha,
        name=str(raw.get("name", json_path.stem)),
        training=raw.get("training", {}),
        metrics=raw.get("metrics", {}),
        created=str(raw.get("created", "")),
        library_version=str(raw.get("library_version", "")),
        format=raw["format"],
        format_version=version,
        json_path=json_path.resolve(),
    )


def _refuse_non_weights_path(given: Path, json_path: Path) -> None:
    """A path that exists but cannot be a weights file (a folder, an image) is named as such, not reported
    as "not found"."""
    if given.is_dir():
        raise WeightsError(f"{given} is a folder, not a weights file: give the model's .json config "
                           "(or its .safetensors tensors, with the .json beside them)")
    if given.exists() and given.suffix not in _WEIGHTS_SUFFIXES and not json_path.is_file():
        raise WeightsError(f"{given} exists but is not a weights file: a model is a .json config plus a "
                           ".safetensors file of the same name, written by the trainer")


def _check_model_input(mi: Mapping[str, Any], json_path: Path) -> None:
    size, spacing = mi.get("size"), mi.get("spacing_mm")
    if not isinstance(size, int) or size < 16:
        raise WeightsError(f"weights config {json_path}: model_input.size must be an integer >= 16, got {size!r}")
    if not isinstance(spacing, (int, float)) or not math.isfinite(spacing) or spacing <= 0:
        raise WeightsError(f"weights config {json_path}: model_input.spacing_mm must be a positive number, got {spacing!r}")


# ----------------------------------------------------------------------------------------------------
# Checking the tensor file (standard library only: no deserialisation)


def _refuse_pickle(path: Path, head: Optional[bytes] = None) -> None:
    if head is None:
        with open(path, "rb") as f:
            head = f.read(8)
    if head.startswith(_ZIP_MAGIC) or (head[:1] and head[0] == _PICKLE_PROTOCOL_BYTE):
        raise WeightsError(
            f"{path} is a PyTorch pickle checkpoint (torch.save), not a safetensors file; ParaspinalSeg "
            "never loads pickles because they can run code. Convert it with "
            "`safetensors.torch.save_file(torch.load(f, weights_only=True), ...)` or export it with the trainer"
        )


def check_safetensors_layout(data: bytes, path: PathLike = "<bytes>") -> dict[str, tuple[int, ...]]:
    """Check that ``data`` is a complete safetensors file by reading its JSON header only; return each
    tensor's shape (so the architecture can be compared before any tensor is allocated).

    Raises :class:`WeightsError` for a pickle checkpoint, random bytes, an unreadable header, a
    truncated file or trailing garbage. The header is plain JSON, so reading it runs no code.
    """
    path = Path(path)
    _refuse_pickle(path, data[:8])
    if len(data) < 8:
        raise WeightsError(f"{path} is not a safetensors file: it has only {len(data)} bytes (empty or truncated)")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > _MAX_HEADER_BYTES:
        raise WeightsError(
            f"{path} is not a safetensors file: it does not start with a safetensors header "
            "(another file type, or random/corrupt data)"
        )
    if 8 + n > len(data):
        raise WeightsError(
            f"{path} is truncated or corrupt: its safetensors header claims {n} bytes "
            f"but the file has only {len(data)}"
        )
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path} is not a safetensors file (corrupt header): {exc}") from exc
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a safetensors file (corrupt header: not a JSON object)")
    end = 0
    shapes: dict[str, tuple[int, ...]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            info["dtype"]
            shapes[name] = tuple(int(d) for d in info["shape"])
        except (TypeError, KeyError, ValueError) as exc:
            raise WeightsError(f"{path} is not a safetensors file (corrupt header entry {name!r})") from exc
        end = max(end, int(stop))
    expected = 8 + n + end
    if expected > len(data):
        raise WeightsError(
            f"{path} is truncated: its header describes {expected} bytes, the file has only {len(data)} "
            "(incomplete download or copy?)"
        )
    if expected < len(data):
        raise WeightsError(f"{path} is corrupt: {len(data) - expected} unexpected bytes after the tensor data")
    return shapes


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def verify_weights_file(config: WeightsConfig) -> bytes:
    """Read the tensor file of ``config``, check its layout and checksum, and return its bytes."""
    wpath = config.weights_path
    if not wpath.is_file():
        raise WeightsError(f"weights file not found: {wpath} (named in {config.json_path})")
    # Nothing is read that the architecture cannot need: at most 8 bytes per parameter, plus the header.
    size, limit = wpath.stat().st_size, 8 * estimated_parameters(config.architecture) + _MAX_HEADER_BYTES
    if size > limit:
        raise WeightsError(
            f"{wpath} has {size} bytes, more than the architecture in {config.json_path} can need "
            f"(at most {limit}); not a matching weights file"
        )
    data = wpath.read_bytes()
    check_safetensors_layout(data, wpath)
    actual = sha256_bytes(data)
    if actual != config.weights_sha256:
        raise WeightsError(
            f"checksum mismatch: {wpath.name} has SHA-256 {actual[:16]}…, its config {config.json_path.name if config.json_path else ''} "
            f"expects {config.weights_sha256[:16]}…; the file was modified or corrupted (tampered?) — "
            "re-download or re-export the model"
        )
    return data


# ----------------------------------------------------------------------------------------------------
# Saving and loading (torch)


def _network_config_from_dict(arch: Mapping[str, Any], where: Optional[Path] = None):
    from .network import NetworkConfig

    if dataclasses.is_dataclass(NetworkConfig):
        known = {f.name for f in dataclasses.fields(NetworkConfig)}
        unknown = sorted(set(arch) - known)
        if unknown:
            raise WeightsError(
                f"unknown architecture keys in {where or 'the weights config'}: {', '.join(unknown)} "
                "(weights made by a newer or different ParaspinalSeg?)"
            )
    try:
        return NetworkConfig.from_dict(dict(arch))
    except (TypeError, ValueError, KeyError) as exc:
        raise WeightsError(f"invalid architecture in {where or 'the weights config'}: {exc}") from exc


def resolve_device(device: Any = "cpu", cuda_index: Optional[int] = None):
    """``"cpu"``, ``"cuda"``/``"cuda:N"`` (error if unavailable), ``"auto"`` (CUDA if available) or a torch.device.

    ``cuda_index``: the GPU ``"auto"`` picks (the trainer passes torchrun's local rank); None = the current one.
    """
    torch = import_torch()
    if isinstance(device, torch.device):
        name = device.type
    else:
        name = str(device).strip().lower()
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if cuda_index is None else f"cuda:{int(cuda_index)}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ParaspinalSegError(
                "device 'cuda' was asked for but CUDA is not available (no NVIDIA GPU, or this PyTorch "
                f"{torch.__version__} is a CPU build); use device 'cpu' or 'auto'"
            )
        return torch.device(device if isinstance(device, torch.device) else name)
    if name == "cpu":
        return torch.device("cpu")
    raise ParaspinalSegError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'auto'")


def _as_plain_dict(obj: Any, what: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{what} must be a dict or a dataclass, got {type(obj).__name__}")


def save_weights(
    model: Any,
    path: PathLike,
    *,
    structures_learned: Sequence[int],
    model_input: Any = None,
    normalisation: Any = None,
    training: Optional[Mapping[str, Any]] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    name: Optional[str] = None,
    architecture: Any = None,
) -> Path:
    """Write ``<stem>.safetensors`` and ``<stem>.json`` for ``model``; returns the JSON's path.

    ``path`` may end in ``.json``, ``.safetensors`` or be the bare stem. ``model_input`` and
    ``normalisation`` are dicts or dataclasses (``preprocessing.ModelInput``,
    ``preprocessing.NormalisationConfig``; ``None`` = their defaults). The
    architecture is taken from ``model.config`` unless given. ``structures_learned`` lists the label
    values the training data annotated (the segmenter reports only these).
    """
    import_torch()  # a clear install hint instead of a bare ImportError
    from safetensors.torch import save as st_save

    from .preprocessing import ModelInput, NormalisationConfig

    if model_input is None:
        model_input = ModelInput()
    if normalisation is None:
        normalisation = NormalisationConfig()
    json_path, weights_path = _paths(path)
    if weights_path.suffix != ".safetensors":
        weights_path = weights_path.with_suffix(".safetensors")
    arch = architecture if architecture is not None else getattr(model, "config", None)
    if arch is None:
        raise ValueError("save_weights: the model has no .config; pass architecture=NetworkConfig(...)")
    arch_dict = json_ready(_as_plain_dict(arch, "architecture"))
    learned = sorted({int(v) for v in structures_learned})
    if not learned or any(v not in BY_VALUE for v in learned):
        raise ValueError(f"structures_learned must be label values among {sorted(BY_VALUE)}, got {list(structures_learned)}")

    # Clone so tensors that share storage (tied weights, views) are written independently.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    data = st_save(tensors, metadata={"format": FORMAT_NAME, "label_table_version": LABEL_TABLE_VERSION})
    config = WeightsConfig(
        architecture=arch_dict,
        model_input=json_ready(_as_plain_dict(model_input, "model_input")),
        normalisation=json_ready(_as_plain_dict(normalisation, "normalisation")),
        label_table_version=LABEL_TABLE_VERSION,
        structures_learned=learned,
        weights_file=weights_path.name,
        weights_sha256=sha256_bytes(data),
        name=name or json_path.stem,
        training=json_ready(dict(training or {})),
        metrics=json_ready(dict(metrics or {})),
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        library_version=LIBRARY_VERSION,
        json_path=json_path.resolve(),
    )
    _check_model_input(config.model_input, json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    # Tensors first, config last: a config on disk always describes a complete tensor file.
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(weights_path)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    return json_path


class _Shapes(dict):
    """``{name: object with .shape}`` from tensors or from plain shapes, for :func:`_describe_mismatch`."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        super().__init__({k: _Shape(tuple(getattr(v, "shape", v))) for k, v in items.items()})


@dataclass
class _Shape:
    shape: tuple


def _describe_mismatch(expected: Mapping[str, Any], loaded: Mapping[str, Any], limit: int = 4) -> str:
    """Which tensor names are missing, unexpected or of another shape (in the model's own order)."""
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    shapes = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in loaded and tuple(loaded[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (("missing in file", missing), ("unexpected in file", unexpected), ("shape differs", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_weights(path: Optional[PathLike] = None, device: Any = "cpu"):
    """Load a model: returns ``(model in eval mode on device, WeightsConfig)``.

    ``path`` names the ``.json``, the ``.safetensors`` or their stem; ``None`` loads the shipped
    model. Checks, in order: config present and valid, label table version, tensor file present,
    safetensors layout (not a pickle, not truncated), SHA-256, architecture keys, and that every
    tensor name and shape matches the architecture. Each failure raises :class:`WeightsError`
    naming it. Nothing from either file is executed.
    """
    config = read_weights_config(path)
    torch_device = resolve_device(device)
    data = verify_weights_file(config)
    net_config = config.network_config()
    torch = import_torch()

    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from .network import build_network

    # The architecture is built on the "meta" device first (shapes only, no memory) and compared with
    # the file's header, so a config that does not fit its tensors is refused before anything is allocated.
    with torch.device("meta"):
        skeleton = build_network(net_config)
    problems = _describe_mismatch(_Shapes(skeleton.state_dict()), _Shapes(check_safetensors_layout(data, config.weights_path)))
    del skeleton
    if not problems:
        try:
            state = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise WeightsError(f"{config.weights_path} is not a readable safetensors file: {exc}") from exc
        model = build_network(net_config)
        expected = model.state_dict()
        problems = _describe_mismatch(expected, state)
    if problems:
        raise WeightsError(
            f"architecture mismatch: {config.weights_path.name} does not fit the architecture in "
            f"{config.json_path.name if config.json_path else 'its config'} ({problems}); was the "
            "architecture in the config edited, or the tensors exported from another configuration?"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # dtype problems and anything _describe_mismatch did not foresee
        raise WeightsError(f"architecture mismatch: {config.weights_path.name}: {exc}") from exc
    model.to(torch_device)
    model.eval()
    return model, config
