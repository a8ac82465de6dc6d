"""Central lumbar spinal stenosis grade from the dural-sac cross-sectional area (DSCSA) on an axial slice.

The canal segment (label 2) is the dural (thecal) sac as seen on the slice, so its CSA is the DSCSA that
the stenosis literature measures. The cut-offs are the widely used quantitative ones:

* **absolute stenosis**: DSCSA < 75 mm²;
* **relative stenosis**: 75 mm² ≤ DSCSA < 100 mm²;
* **normal**: DSCSA ≥ 100 mm².

Sources: Schönström N, Bolender NF, Spengler DM. The pathomorphology of spinal stenosis as seen on CT scans
of the lumbar spine. Spine 1985;10:806–811 (100 mm² / 75 mm²); Bolender NF, Schönström NS, Spengler DM.
Role of computed tomography and myelography in the diagnosis of central spinal stenosis. J Bone Joint Surg
Am 1985;67:240–246; Hamanishi C, Matukura N, Fujita M, Tomihara M, Tanaka S. Cross-sectional area of the
stenotic lumbar dural tube measured from the transverse views of magnetic resonance imaging. J Spinal
Disord 1994;7:388–393 (the same cut-offs on MRI).

This is an area grade, not the qualitative Schizas grade (A–D, from CSF versus rootlets), and it is only
meaningful on a disc-level slice (the narrowest part of the canal); the grade is a measurement aid, not a
diagnosis. Pure Python: runs in Slicer's Python.
"""

from __future__ import annotations

import math
from typing import Optional

__all__ = [
    "RELATIVE_STENOSIS_BELOW_MM2",
    "ABSOLUTE_STENOSIS_BELOW_MM2",
    "GRADES",
    "stenosis_grade",
]

#: DSCSA below this (mm²) is relative stenosis (Schönström 1985; Hamanishi 1994).
RELATIVE_STENOSIS_BELOW_MM2 = 100.0
#: DSCSA below this (mm²) is absolute stenosis (Schönström 1985; Hamanishi 1994).
ABSOLUTE_STENOSIS_BELOW_MM2 = 75.0

#: The grades, from no narrowing to the most severe.
GRADES: tuple[str, ...] = ("normal", "relative", "absolute")


def stenosis_grade(dural_sac_csa_mm2: Optional[float]) -> Optional[str]:
    """``"normal"``, ``"relative"`` or ``"absolute"`` for a dural-sac CSA in mm²; None when there is no area.

    A value exactly at a cut-off belongs to the milder grade (the published criteria are "less than").
    Raises ValueError for a negative or non-finite area.
    """
    if dural_sac_csa_mm2 is None:
        return None
    area = float(dural_sac_csa_mm2)
    if not math.isfinite(area) or area < 0:
        raise ValueError(f"dural-sac CSA must be a finite area >= 0 mm², got {dural_sac_csa_mm2!r}")
    if area < ABSOLUTE_STENOSIS_BELOW_MM2:
        return "absolute"
    if area < RELATIVE_STENOSIS_BELOW_MM2:
        return "relative"
    return "normal"
