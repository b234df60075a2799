"""Phantom lungs joined by aerated tissue at a junction line, with the sides of the truth.

Shared by the anterior- and posterior-junction tests: both paint an aerated bridge between the
two lungs on the middle slices, then give each bridge voxel to the lung on its side of the gap.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Tuple

import numpy as np

#: HU of the aerated bridge: normal parenchyma.
BRIDGE_HU = -850


class JoinedLungs(NamedTuple):
    array: np.ndarray  # the CT array with the bridge painted in
    right: np.ndarray  # right-lung truth, with the bridge voxels on its side
    left: np.ndarray
    mid_x: float  # array column between the two lungs where the truth splits the bridge


def join_lungs(phantom, half_span: Tuple[int, int], pick_rows: Callable[[np.ndarray], np.ndarray],
               max_hu: float = np.inf) -> JoinedLungs:
    """The phantom's CT with an aerated bridge between its lungs, and the truth that goes with it.

    ``half_span`` (below, above): slices around the lungs' middle slice that get a bridge;
    ``pick_rows`` chooses, from the rows where both lungs exist on a slice, those bridged;
    voxels at or above ``max_hu`` (bone) are never bridged.
    """
    right, left = phantom.right_lung.copy(), phantom.left_lung.copy()
    zs = np.nonzero(phantom.lungs.any(axis=(1, 2)))[0]
    bridge = np.zeros_like(right)
    for z in zs[len(zs) // 2 - half_span[0] : len(zs) // 2 + half_span[1]]:
        for y in pick_rows(np.nonzero(right[z].any(axis=1) & left[z].any(axis=1))[0]):
            bridge[z, y, np.nonzero(right[z, y])[0].max() : np.nonzero(left[z, y])[0].min() + 1] = True
    bridge &= ~phantom.lungs & (phantom.ct.array < max_hu)
    array = phantom.ct.array.copy()
    array[bridge] = BRIDGE_HU
    x = np.arange(array.shape[2])[None, None, :]
    mid = 0.5 * (np.nonzero(right)[2].max() + np.nonzero(left)[2].min())
    right |= bridge & (x <= mid)
    left |= bridge & (x > mid)
    return JoinedLungs(array, right, left, mid)
