"""Linear probes: how linearly decodable a quantity is from a latent code.

Used to check the face latent's disentanglement (VASA-1 sec 3.1): ground-truth head pose
should be decodable from z_pose and NOT from z_dyn, while mouth opening, blinks and gaze
should be decodable from z_dyn.

A probe is closed-form ridge regression on standardised features, scored by R^2 on
held-out samples:

    fit:    W = argmin (1/n) ||Y_c - X_s W||^2 + alpha ||W||^2
              = (X_s^T X_s + n alpha I)^-1 X_s^T Y_c
            X_s: features standardised with the TRAIN mean / std, Y_c: centred targets.
            alpha (scale-free, per sample) is picked from `DEFAULT_ALPHAS` by the
            training samples' cross-validated error: grouped k-fold when their groups
            are given, else exact leave-one-out (closed form from one SVD).
    score:  R^2_d = 1 - sum_i (y_id - yhat_id)^2 / sum_i (y_id - mean_i y_id)^2 per target
            dimension d, on the held-out samples (their own mean: sklearn's convention).
            1 = perfect, 0 = no better than the held-out mean, < 0 = worse. NaN where a
            held-out target is constant (R^2 is undefined there).

Frames of one clip are strongly correlated, so samples are split by GROUP (clip): a probe
scored on frames of clips it was fitted on would reward memorising clips. `group_kfold`
makes such folds when there is no separate training set; `kfold_probe` pools the
out-of-fold predictions and scores them once.

Everything here is numpy float64: probes are small (thousands of samples, <= a few
hundred features) and the normal equations want the precision.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Candidate per-sample ridge strengths: from barely regularised to heavily shrunk.
DEFAULT_ALPHAS = tuple(10.0 ** np.arange(-6, 3))


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [N] or [N, D], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite values")
    return a


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Coefficient of determination per target dimension: [N] or [N, D] x 2 -> [D].

    NaN for a dimension whose y_true is constant.
    """
    y_true, y_pred = _as_2d(y_true, "y_true"), _as_2d(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"r2_score: shapes differ: {y_true.shape} vs {y_pred.shape}")
    ss_res = np.sum((y_true - y_pred) ** 2, axis=0)
    ss_tot = np.sum((y_true - y_true.mean(axis=0)) ** 2, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    # A constant target (relative to its magnitude) has no variance to explain.
    scale = np.maximum(np.abs(y_true).max(axis=0), 1.0)
    return np.where(ss_tot > (1e-12 * scale) ** 2 * len(y_true), r2, np.nan)


@dataclasses.dataclass(frozen=True)
class RidgeModel:
    """A fitted ridge probe: predict(x) = ((x - x_mean) / x_scale) @ w + y_mean."""

    x_mean: np.ndarray  # [F]
    x_scale: np.ndarray  # [F]
    w: np.ndarray  # [F, D]
    y_mean: np.ndarray  # [D]
    alpha: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """[N, F] -> [N, D]."""
        x = _as_2d(x, "x")
        if x.shape[1] != self.w.shape[0]:
            raise ValueError(f"probe was fitted on {self.w.shape[0]} features, got {x.shape[1]}")
        return ((x - self.x_mean) / self.x_scale) @ self.w + self.y_mean


def _loo_errors(u: np.ndarray, s: np.ndarray, y: np.ndarray, lam: float) -> float:
    """Mean squared leave-one-out residual of ridge(lam) with an intercept (closed form).

    With X = U S V^T (centred), the hat matrix is U diag(s^2 / (s^2 + lam)) U^T plus 1/n
    for the intercept; the LOO residual of sample i is r_i / (1 - h_ii).
    """
    n = y.shape[0]
    shrink = s * s / (s * s + lam)  # [r]
    fitted = u @ (shrink[:, None] * (u.T @ y))  # [n, D]
    leverage = np.sum(u * u * shrink[None, :], axis=1) + 1.0 / n  # [n]
    resid = (y - fitted) / np.maximum(1.0 - leverage, 1e-12)[:, None]
    return float(np.mean(resid * resid))


def _grouped_cv_errors(xs: np.ndarray, yc: np.ndarray, groups: np.ndarray,
                       alphas: Sequence[float], k: int) -> np.ndarray:
    """Mean squared held-out error of ridge(alpha) per alpha, over `group_kfold` folds.

    One SVD per fold serves every alpha. xs, yc: standardised features / centred targets.
    """
    errors = np.zeros(len(alphas))
    for train, test in group_kfold(groups, k):
        a, b = xs[train], yc[train]
        a_mean, b_mean = a.mean(axis=0), b.mean(axis=0)
        u, s, vt = np.linalg.svd(a - a_mean, full_matrices=False)
        uty = u.T @ (b - b_mean)  # [r, D]
        projected = (xs[test] - a_mean) @ vt.T  # [m, r]
        for i, alpha in enumerate(alphas):
            coef = (s / (s * s + alpha * len(train)))[:, None] * uty
            errors[i] += np.sum((yc[test] - projected @ coef - b_mean) ** 2)
    return errors / yc.size


def fit_ridge(
    x: np.ndarray, y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS, *,
    groups: np.ndarray | None = None, folds: int = 5,
) -> RidgeModel:
    """Fits a ridge probe x [N, F] -> y [N] or [N, D].

    alpha (from `alphas`; one value skips the selection) minimises the exact
    leave-one-out error, or, when `groups` [N] (e.g. the clip of each frame) holds >= 2
    groups, the error of `folds`-fold cross-validation by group: neighbouring frames of a
    clip are near duplicates, and leaving out single frames would reward memorising clips
    (too little regularisation for a probe scored on other clips). Features with zero
    training variance are kept at scale 1 (they contribute nothing).
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"fit_ridge: {x.shape[0]} feature rows but {y.shape[0]} target rows")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"fit_ridge needs >= 3 samples, got {n}")
    alphas = tuple(float(a) for a in alphas)
    if not alphas or min(alphas) <= 0:
        raise ValueError(f"alphas must be a non-empty sequence of positive values, got {alphas}")
    if groups is not None and np.shape(groups) != (n,):
        raise ValueError(f"groups must be [N={n}], got shape {np.shape(groups)}")
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    x_scale = x.std(axis=0)
    x_scale = np.where(x_scale > 1e-12 * np.maximum(np.abs(x_mean), 1.0), x_scale, 1.0)
    xs, yc = (x - x_mean) / x_scale, y - y_mean
    u, s, vt = np.linalg.svd(xs, full_matrices=False)
    num_groups = 0 if groups is None else len(np.unique(groups))
    if len(alphas) == 1:
        alpha = alphas[0]
    elif num_groups >= 2:
        errors = _grouped_cv_errors(xs, yc, np.asarray(groups), alphas, min(folds, num_groups))
        alpha = alphas[int(np.argmin(errors))]
    else:
        errors = [_loo_errors(u, s, yc, a * n) for a in alphas]
        alpha = alphas[int(np.argmin(errors))]
    w = vt.T @ ((s / (s * s + alpha * n))[:, None] * (u.T @ yc))
    return RidgeModel(x_mean, x_scale, w, y_mean, alpha)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Reads a regressor's outputs in the units of its target.

    A probe (or any regressor fitted by least squares on noisy inputs) shrinks toward the
    mean: on data like its calibration set, E[prediction | y] = intercept + slope * y with
    slope < 1 (regression dilution), so a face whose gaze is 15 degrees off the mean reads
    as about 15 * slope. `apply` inverts that line, (prediction - intercept) / slope, so
    that E[reading | y] = y there: an offset reads as itself. Fit it on held-out data
    (in-sample predictions shrink less than those on new data).
    """

    intercept: np.ndarray  # [D]
    slope: np.ndarray  # [D]
    r: np.ndarray  # [D] Pearson r of predictions and targets on the calibration set

    def apply(self, predictions: np.ndarray) -> np.ndarray:
        """[N, D] (or [N] for D = 1) -> calibrated readings, the same shape."""
        p = _as_2d(predictions, "predictions")
        out = (p - self.intercept) / self.slope
        return out.reshape(np.shape(predictions))


def calibrate(predictions: np.ndarray, targets: np.ndarray,
              min_slope: float = 0.05) -> Calibration:
    """The least-squares line of predictions [N, D] on targets [N, D] (per dimension).
    ValueError where a target is constant or the slope is below min_slope (the regressor
    does not follow that target: inverting would blow its noise up)."""
    p, y = _as_2d(predictions, "predictions"), _as_2d(targets, "targets")
    if p.shape != y.shape or len(p) < 3:
        raise ValueError(f"calibrate needs >= 3 matching rows, got {p.shape} and {y.shape}")
    yc, pc = y - y.mean(0), p - p.mean(0)
    var_y = np.sum(yc * yc, axis=0)
    if np.any(var_y <= 1e-12 * np.maximum(np.abs(y).max(0), 1.0) ** 2 * len(y)):
        raise ValueError("calibrate: a target dimension is constant")
    slope = np.sum(yc * pc, axis=0) / var_y
    if np.any(slope < min_slope):
        raise ValueError(f"calibrate: slopes {np.round(slope, 3).tolist()} below {min_slope}: "
                         "the predictions do not follow the targets")
    r = np.sum(yc * pc, axis=0) / np.sqrt(var_y * np.maximum(np.sum(pc * pc, axis=0), 1e-300))
    return Calibration(p.mean(0) - slope * y.mean(0), slope, r)


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """Held-out R^2 of a regression probe."""

    r2: tuple[float, ...]  # per target dimension (NaN: constant held-out target)
    names: tuple[str, ...]  # target dimension names
    num_train: int
    num_test: int
    alpha: float  # chosen ridge strength (the median over folds for `kfold_probe`)

    @property
    def mean_r2(self) -> float:
        """Mean over the dimensions where R^2 is defined (NaN if none is)."""
        vals = [v for v in self.r2 if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    def to_json(self) -> dict:
        clean = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
        return {
            "r2_mean": clean(self.mean_r2),
            "r2": {n: clean(v) for n, v in zip(self.names, self.r2)},
            "num_train": self.num_train,
            "num_test": self.num_test,
            "alpha": self.alpha,
        }


def _names(names: Sequence[str] | None, d: int) -> tuple[str, ...]:
    names = tuple(names) if names is not None else tuple(f"dim{i}" for i in range(d))
    if len(names) != d:
        raise ValueError(f"{len(names)} names for {d} target dimensions")
    return names


def linear_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
    names: Sequence[str] | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
    groups_train: np.ndarray | None = None,
) -> ProbeResult:
    """Fits on (x_train, y_train), returns R^2 on (x_test, y_test).

    x: [N, F], y: [N] or [N, D] (the same D for train and test). groups_train: the
    training samples' groups for choosing alpha (see `fit_ridge`).
    """
    y_test = _as_2d(y_test, "y_test")
    model = fit_ridge(x_train, y_train, alphas, groups=groups_train)
    if model.w.shape[1] != y_test.shape[1]:
        raise ValueError(f"train targets have {model.w.shape[1]} dims, test {y_test.shape[1]}")
    r2 = r2_score(y_test, model.predict(x_test))
    return ProbeResult(tuple(float(v) for v in r2), _names(names, y_test.shape[1]),
                       int(np.shape(x_train)[0]), int(y_test.shape[0]), model.alpha)


def group_kfold(
    groups: np.ndarray, k: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train indices, test indices) folds where no group is on both sides of a fold.

    groups: [N] group id per sample (e.g. the clip a frame comes from). Groups are shuffled
    (seeded) and dealt round-robin into k folds, so folds hold about N / k samples when
    groups are of similar size; every sample is in exactly one test fold.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise ValueError(f"groups must be [N], got shape {groups.shape}")
    unique = np.unique(groups)
    if k < 2 or len(unique) < k:
        raise ValueError(f"group k-fold needs k >= 2 and >= k groups; got k={k} with "
                         f"{len(unique)} groups")
    order = np.random.default_rng(seed).permutation(unique)
    fold_of_group = {g: i % k for i, g in enumerate(order)}
    fold = np.array([fold_of_group[g] for g in groups])
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def kfold_probe(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, *, k: int = 5, seed: int = 0,
    names: Sequence[str] | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
) -> ProbeResult:
    """Cross-validated probe on one set: R^2 of the pooled out-of-fold predictions.

    For when no separate training set exists. Folds come from `group_kfold` (k is capped
    at the number of groups); num_train is the mean training-fold size.
    """
    x, y, groups = _as_2d(x, "x"), _as_2d(y, "y"), np.asarray(groups)
    folds = group_kfold(groups, min(k, len(np.unique(groups))), seed)
    pred = np.empty_like(y)
    chosen = []
    for train_idx, test_idx in folds:
        model = fit_ridge(x[train_idx], y[train_idx], alphas, groups=groups[train_idx])
        pred[test_idx] = model.predict(x[test_idx])
        chosen.append(model.alpha)
    r2 = r2_score(y, pred)
    return ProbeResult(tuple(float(v) for v in r2), _names(names, y.shape[1]),
                       int(round(np.mean([len(t) for t, _ in folds]))), int(len(y)),
                       float(np.median(chosen)))


# ----------------------------------------------------------------------------- classification


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of equal entries. predicted: class ids [N] or scores [N, C] (argmax)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.ndim == 2:
        predicted = np.argmax(predicted, axis=-1)
    if predicted.shape != labels.shape or labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"accuracy needs predictions and labels of one shape [N > 0], got "
                         f"{predicted.shape} and {labels.shape}")
    return float(np.mean(predicted == labels))


@dataclasses.dataclass(frozen=True)
class ClassifierResult:
    """Held-out accuracy of a linear classification probe, with its majority baseline."""

    accuracy: float
    chance: float  # accuracy of always predicting the most frequent TRAINING class
    num_classes: int  # classes seen in training
    num_train: int
    num_test: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def classifier_probe(
    x_train: np.ndarray, labels_train: np.ndarray, x_test: np.ndarray,
    labels_test: np.ndarray, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
    groups_train: np.ndarray | None = None,
) -> ClassifierResult:
    """Ridge regression onto one-hot targets, argmax = class (a closed-form linear classifier).

    Test samples of classes never seen in training count as errors. groups_train: see
    `fit_ridge`.
    """
    labels_train, labels_test = np.asarray(labels_train), np.asarray(labels_test)
    classes, train_ids = np.unique(labels_train, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"a classification probe needs >= 2 training classes, got {classes}")
    model = fit_ridge(x_train, np.eye(len(classes))[train_ids], alphas, groups=groups_train)
    predicted = classes[np.argmax(model.predict(x_test), axis=-1)]
    majority = classes[np.argmax(np.bincount(train_ids))]
    return ClassifierResult(
        accuracy=accuracy(predicted, labels_test),
        chance=float(np.mean(labels_test == majority)),
        num_classes=int(len(classes)),
        num_train=int(len(labels_train)),
        num_test=int(len(labels_test)),
    )
