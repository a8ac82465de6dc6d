"""Which configuration and which slices a model (or a cross-validation) was trained with, as fingerprints.

A cross-validation stands for the exported model only when both match: the CV's folds were trained with
the same configuration, and its slices (scored and ``--train-also``) are the slices the model trained on.
``training.cv`` records its :func:`provenance` in ``cv_metrics.json``; ``training.train --cv-report``
checks every report against the model it exports (:func:`check_cv_reports`) and records the verdict, which
the model card (``weights.WeightsConfig.summary``) shows next to the metrics.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

from ParaspinalSegLib.serialisation import json_ready

#: Config keys that change how a run is watched, not the model it produces.
_NOT_MODEL_KEYS = ("val_every", "checkpoint_every")


def _sha256(obj: Any) -> str:
    text = json.dumps(json_ready(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """SHA-256 of the configuration's model-relevant keys (canonical JSON)."""
    return _sha256({k: v for k, v in config.items() if k not in _NOT_MODEL_KEYS})


def provenance(config: Mapping[str, Any], trained_on: Sequence[Any]) -> dict[str, Any]:
    """``{"config_sha256", "data_sha256", "slices"}`` for a model trained with ``config`` on ``trained_on``
    (slice records; only their source and case id count, in no particular order)."""
    cases = sorted(f"{r.source}/{r.case_id}" for r in trained_on)
    return {"config_sha256": config_fingerprint(config), "data_sha256": _sha256(cases), "slices": len(cases)}


def cv_mismatch(cv_metrics: Mapping[str, Any], model: Mapping[str, Any]) -> list[str]:
    """Why a cross-validation does not stand for the model with provenance ``model`` (empty: it does)."""
    recorded = cv_metrics.get("provenance")
    if not isinstance(recorded, Mapping):
        return ["the cross-validation recorded no configuration/data fingerprint (made before they were recorded)"]
    reasons = []
    if recorded.get("config_sha256") != model["config_sha256"]:
        reasons.append("it was run with a different training configuration")
    if recorded.get("data_sha256") != model["data_sha256"]:
        reasons.append(f"it covers other slices ({recorded.get('slices', '?')} vs the model's {model['slices']})")
    return reasons


def check_cv_reports(reports: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any],
                     trained_on: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Each report with ``matches_model`` (bool) and, when False, ``mismatch`` (the reasons) added."""
    model = provenance(config, trained_on)
    out = {}
    for name, metrics in reports.items():
        reasons = cv_mismatch(metrics, model)
        out[name] = {**metrics, "matches_model": not reasons, **({"mismatch": reasons} if reasons else {})}
    return out
