"""The occupancy-network metrics (ONet / ConvONet definitions) of a reconstructed shape.

- volumetric IoU: predicted against labelled occupancy at the query points of points.npz;
- Chamfer-L1: the mean of the two mean nearest-neighbour distances between points sampled on the
  mesh and the ground-truth surface points;
- normal consistency: the mean of the two mean |cos| between each point's normal and its nearest
  neighbour's;
- F-score at a distance τ (1% of the unit cube side by default): the harmonic mean of precision
  (mesh points within τ of the surface) and recall (surface points within τ of the mesh).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def volumetric_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Boolean occupancies of the same points -> IoU (1 when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0


def surface_metrics(pred_points: np.ndarray, pred_normals: np.ndarray, gt_points: np.ndarray,
                    gt_normals: np.ndarray, fscore_tau: float = 0.01) -> dict:
    """Points and unit normals (N, 3) sampled on the predicted surface and (M, 3) on the true one
    -> {chamfer_l1, normal_consistency, fscore, precision, recall}."""
    d_pred, i_pred = cKDTree(gt_points).query(pred_points)        # accuracy: mesh -> surface
    d_gt, i_gt = cKDTree(pred_points).query(gt_points)            # completeness: surface -> mesh
    cos_pred = np.abs((pred_normals * gt_normals[i_pred]).sum(-1))
    cos_gt = np.abs((gt_normals * pred_normals[i_gt]).sum(-1))
    precision, recall = float((d_pred <= fscore_tau).mean()), float((d_gt <= fscore_tau).mean())
    return {"chamfer_l1": float(0.5 * (d_pred.mean() + d_gt.mean())),
            "normal_consistency": float(0.5 * (cos_pred.mean() + cos_gt.mean())),
            "fscore": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "precision": precision, "recall": recall}
