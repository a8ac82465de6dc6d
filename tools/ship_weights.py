#!/usr/bin/env python
"""Make trained weights the shipped default: ``Resources/Models/bsesnet_default.{json,safetensors}``.

The tensor file is copied byte for byte (so its SHA-256, recorded in the config, stays valid) after the
source's checksum and tensors are verified by loading it; the config is the trainer's, with only ``name`` and
``weights_file`` changed to the shipped names. Both files are written next to their targets first and then
moved into place, tensors before config, so an interrupted run never leaves a config that describes other
tensors. After shipping new weights regenerate the golden reference (``python tools/make_golden.py``).

Usage::

    python tools/ship_weights.py runs/default/final.json              # into ParaspinalSeg/Resources/Models/
    python tools/ship_weights.py runs/default/final.json --out DIR    # elsewhere (tests, a trial)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ParaspinalSeg"))

from ParaspinalSegLib.weights import load_weights, read_weights_config  # noqa: E402

DEFAULT_OUT = REPO / "ParaspinalSeg" / "Resources" / "Models"
SHIPPED_NAME = "bsesnet_default"


def ship_weights(source: Path, out_dir: Path = DEFAULT_OUT, name: str = SHIPPED_NAME, description: str | None = None) -> Path:
    """Copy the weights ``source`` (a ``.json`` config) to ``out_dir/<name>.{safetensors,json}``; returns the JSON.

    ``description`` (optional) becomes ``training.description``, the "training data:" line of the model
    summary that the Slicer panel and ``paraspinalseg info`` show."""
    load_weights(source)  # checksum, format and tensors checked: never ship what the segmenter would refuse
    config = read_weights_config(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = Path(config.json_path).parent / config.weights_file
    raw = json.loads(Path(config.json_path).read_text(encoding="utf-8"))
    raw["name"], raw["weights_file"] = name, f"{name}.safetensors"
    if description:
        raw["training"]["description"] = description
    targets = [(out_dir / f"{name}.safetensors", tensors.read_bytes()),
               (out_dir / f"{name}.json", (json.dumps(raw, indent=2, allow_nan=False) + "\n").encode("utf-8"))]
    for target, data in targets:
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    shipped = out_dir / f"{name}.json"
    load_weights(shipped)  # the shipped pair loads exactly as the source did
    return shipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="trained weights config (.json) from training.train")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write into (default: the shipped models)")
    parser.add_argument("--description", help="one line on the training data, shown in the model summary")
    args = parser.parse_args(argv)
    shipped = ship_weights(args.source, args.out, description=args.description)
    config = read_weights_config(shipped)
    print(f"{shipped}: structures {config.structures_learned}, window {config.model_input.get('window', 'field_of_view')}, "
          f"sha256 {config.weights_sha256[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
