#!/usr/bin/env python3
"""Error bars for the accuracy benchmark: a paired bootstrap over test examples.

Every row of a table (a bundle setting, an int8 or f16 baseline) is compared with the individual
models on the SAME resampled test examples: per task, B resamples (with replacement) of the test
indices are drawn once, with a fixed seed, and every row's accuracy and the individual model's
accuracy are computed on each resample. The normalized accuracy of a resample is their ratio; the
mean normalized accuracy of a resample is the mean of the per-task ratios (tasks are resampled
independently). The 95% interval is the 2.5th and 97.5th percentile over the B resamples.

Pairing removes the part of the noise that the two rows share (the same hard examples), so the
interval of a difference between two rows is much narrower than the two intervals side by side:
two rows are "within noise" of each other when the 95% interval of the paired difference of
their mean normalized accuracy contains 0.

`python3 stats.py` runs a self-check on synthetic predictions.
"""

import numpy as np

RESAMPLES = 1000
SEED = 20261206


class Bootstrap:
    """Resampled test indices per task, shared by every row of one table."""

    def __init__(self, labels, individual_pred, resamples=RESAMPLES, seed=SEED):
        """`labels` and `individual_pred`: {task: int array of the test set}."""
        self.tasks = list(labels)
        self.labels = {t: np.asarray(labels[t]) for t in self.tasks}
        self.individual = {t: np.asarray(individual_pred[t]) for t in self.tasks}
        rng = np.random.default_rng(seed)
        self.idx = {t: rng.integers(0, len(self.labels[t]), (resamples, len(self.labels[t])))
                    for t in self.tasks}
        self.base_acc = {t: self.resampled_accuracy(t, self.individual[t]) for t in self.tasks}
        self.samples = {}

    def resampled_accuracy(self, task, pred):
        correct = (np.asarray(pred) == self.labels[task]).astype(np.float64)
        return correct[self.idx[task]].mean(1)

    def row(self, name, pred):
        """Statistics of one row given its predictions {task: int array}; keeps its samples."""
        stats = {"accuracy_ci": {}, "normalized_ci": {}, "agreement": {}}
        norm = []
        for t in self.tasks:
            p = np.asarray(pred[t])
            acc = self.resampled_accuracy(t, p)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = acc / self.base_acc[t]
            norm.append(ratio)
            stats["accuracy_ci"][t] = interval(acc)
            stats["normalized_ci"][t] = interval(ratio)
            stats["agreement"][t] = float(np.mean(p == self.individual[t]))
        mean = np.mean(norm, axis=0)
        self.samples[name] = mean
        stats["normalized_mean_ci"] = interval(mean)
        stats["agreement_mean"] = float(np.mean(list(stats["agreement"].values())))
        return stats

    def difference(self, a, b):
        """95% interval of (mean normalized of row a) - (that of row b), paired."""
        return interval(self.samples[a] - self.samples[b])


def interval(samples):
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [float("nan"), float("nan")]
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def within_noise(ci):
    return ci[0] <= 0.0 <= ci[1]


def _self_check():
    """Synthetic check: a copy of the individual predictions is exactly 1 with a zero-width
    interval; a row that is right on 5% fewer examples has an interval around 0.95 that excludes
    1; a row that differs from it on 0.2% of examples is within noise of it."""
    rng = np.random.default_rng(0)
    n = 2000
    labels = {"a": rng.integers(0, 2, n), "b": rng.integers(0, 5, n)}
    ind = {t: np.where(rng.random(n) < 0.8, labels[t], (labels[t] + 1) % 5) for t in labels}
    boot = Bootstrap(labels, ind, resamples=500, seed=1)
    same = boot.row("same", ind)
    assert same["normalized_mean_ci"] == [1.0, 1.0], same
    assert same["agreement_mean"] == 1.0
    worse = {}
    for t in labels:
        w = ind[t].copy()
        right = np.flatnonzero(w == labels[t])
        w[right[: int(0.05 * n)]] = (labels[t][right[: int(0.05 * n)]] + 1) % 2 + 7
        worse[t] = w
    stats = boot.row("worse", worse)
    low, high = stats["normalized_mean_ci"]
    assert low < 0.9375 < high < 1.0, stats["normalized_mean_ci"]
    close = {}
    for t in labels:
        c = worse[t].copy()
        wrong, right = np.flatnonzero(c != labels[t]), np.flatnonzero(c == labels[t])
        c[wrong[:4]] = labels[t][wrong[:4]]
        c[right[:4]] = 9
        close[t] = c
    boot.row("close", close)
    assert within_noise(boot.difference("close", "worse")), boot.difference("close", "worse")
    assert not within_noise(boot.difference("worse", "same"))
    print("stats.py self-check passed")


if __name__ == "__main__":
    _self_check()
