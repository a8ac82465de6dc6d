#!/usr/bin/env python
"""Make the sample slice the README's first command runs on: an in-phase image derived from MyoSegmenTUM.

The sample is a NEW file, not a copy: the Dixon water and fat images of one axial slice are added
(in-phase ≈ water + fat, the contrast of a conventional gradient-echo image in which fat is bright),
rounded to int16, cropped to the body with a margin, and written as a gzip-compressed NRRD with its
geometry (LPS grid from the source header; Slicer shows it with patient right on the left).

Source: ``<repo>/../shared/data/myosegmentum_lpm`` (converted from GitHub johnnydfci/LPM_Segmentator,
Apache-2.0; images from the MyoSegmenTUM spine database, Burian E et al., BMC Musculoskelet Disord
2019;20:152, doi:10.1186/s12891-019-2528-x; labels by Zhang Z et al., Radiol Artif Intell 2025,
doi:10.1148/ryai.240833). Credit both in the README. Subject TUM01 is part of the development data the
shipped model may be trained on; say so where the sample is used.

Usage::

    python tools/make_sample.py --out /tmp/sample.nrrd            # try it
    python tools/make_sample.py                                   # write into ParaspinalSeg/Resources/Sample/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "myosegmentum_lpm"
#: An intervertebral disc level (no marrow fat on the fat image; the source does not record which disc).
DEFAULT_CASE = "TUM01_z10"
# Name used by the README's first command.
DEFAULT_OUT = REPO / "ParaspinalSeg" / "Resources" / "Sample" / "TUM01_sample_inphase.nrrd"
#: Pixels kept around the body when cropping.
MARGIN = 8


def make_sample(data_dir: Path, case: str, out: Path, crop: bool = True) -> Path:
    """Write the in-phase sample of ``case`` (e.g. ``TUM01_z10``) from ``data_dir`` to ``out``; returns ``out``."""
    import SimpleITK as sitk

    water_path = data_dir / f"{case}_img.nii.gz"
    fat_path = data_dir / f"{case}_fat.nii.gz"
    for p in (water_path, fat_path):
        if not p.is_file():
            raise SystemExit(f"make_sample: {p} not found (is ../shared/data next to the repository?)")
    water = sitk.ReadImage(str(water_path), sitk.sitkFloat64)
    fat = sitk.ReadImage(str(fat_path), sitk.sitkFloat64)
    if water.GetSize() != fat.GetSize() or not np.allclose(water.GetOrigin(), fat.GetOrigin()):
        raise SystemExit("make_sample: water and fat images are not on the same grid")
    inphase = sitk.GetArrayFromImage(water) + sitk.GetArrayFromImage(fat)  # (k, j, i), k = 1
    if inphase.max() > np.iinfo(np.int16).max:
        raise SystemExit("make_sample: in-phase values exceed int16")
    array = np.round(inphase).astype(np.int16)

    start = [0, 0, 0]  # (i, j, k)
    if crop:
        body = array[0] > 0.05 * array.max()
        rows, cols = np.nonzero(body)
        j0, j1 = max(rows.min() - MARGIN, 0), min(rows.max() + MARGIN + 1, array.shape[1])
        i0, i1 = max(cols.min() - MARGIN, 0), min(cols.max() + MARGIN + 1, array.shape[2])
        array = array[:, j0:j1, i0:i1]
        start = [int(i0), int(j0), 0]

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(water.GetSpacing())
    image.SetDirection(water.GetDirection())
    image.SetOrigin(water.TransformIndexToPhysicalPoint(start))  # the crop keeps every voxel where it was
    image.SetMetaData(
        "ParaspinalSeg_sample",
        f"in-phase (Dixon water + fat) of {case}, MyoSegmenTUM spine (Burian et al. 2019) via "
        "LPM_Segmentator (Apache-2.0); derived by tools/make_sample.py",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(out), True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="myosegmentum_lpm folder")
    parser.add_argument("--case", default=DEFAULT_CASE, help="slice to use, e.g. TUM01_z10")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="NRRD file to write")
    parser.add_argument("--no-crop", action="store_true", help="keep the full 400 x 400 field of view")
    args = parser.parse_args(argv)
    out = make_sample(args.data, args.case, args.out, crop=not args.no_crop)
    print(f"{out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
