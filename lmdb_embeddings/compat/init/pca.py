"""Principal axes of a feature table streamed chunk by chunk (numpy, float64): the PCA initialisations.

The upstream managers called ``sklearn.decomposition.PCA(n).fit_transform`` on all features
at once. Here the mean and the centred scatter matrix are merged chunk by chunk (Chan et
al.), so memory holds one chunk and a ``(features, features)`` matrix, and the axes come from
``numpy.linalg.eigh``, with scikit-learn's sign convention: each component's largest-magnitude
loading is positive. The projections' standard deviation (ddof 0, as ``ndarray.std``) is
analytic: ``sqrt(eigenvalue / n)``, so rows can be projected and normalised in a second pass.
"""

from __future__ import annotations

import numpy as np

from ...errors import InvalidInputError

STD_EPS = 1e-8  # the upstream normalisation: (p - p.mean(0)) / (p.std(0) + 1e-8)


class StreamingMoments:
    """Count, mean and centred scatter of the rows seen so far, merged group by group (Chan et al.).

    ``full``: the whole ``(width, width)`` scatter matrix (the PCA); otherwise its diagonal only,
    each column's sum of squared deviations (the manager's statistics).
    """

    def __init__(self, full: bool = True):
        self.full = full
        self.n = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        k = len(x)
        if k == 0:
            return
        mean = x.mean(0)
        centred = x - mean
        scatter = centred.T @ centred if self.full else (centred * centred).sum(0)
        if self.n == 0:
            self.n, self.mean, self.scatter = k, mean, scatter
            return
        if x.shape[1] != len(self.mean):
            raise InvalidInputError(f"feature chunks of different widths ({len(self.mean)} and {x.shape[1]})")
        total = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        spread = np.outer(delta, delta) if self.full else delta * delta
        self.scatter = self.scatter + scatter + spread * (self.n * k / total)
        self.n = total


class PrincipalAxes:
    """The first ``n_components`` principal axes of the rows summarised by ``moments``."""

    def __init__(self, moments: StreamingMoments, n_components: int):
        if moments.n == 0:
            raise InvalidInputError("the feature manager returned no features: nothing to run the PCA on")
        width = len(moments.mean)
        if n_components > min(moments.n, width):
            raise InvalidInputError(f"PCA with {n_components} components needs at least that many samples and "
                                    f"feature columns; got {moments.n} samples of width {width}")
        eigenvalues, eigenvectors = np.linalg.eigh(moments.scatter)
        order = np.argsort(eigenvalues)[::-1][:n_components]
        axes = eigenvectors[:, order]
        largest = np.argmax(np.abs(axes), axis=0)
        signs = np.sign(axes[largest, np.arange(n_components)])
        signs[signs == 0] = 1.0
        self.mean = moments.mean
        self.axes = axes * signs
        self.std = np.sqrt(np.maximum(eigenvalues[order], 0.0) / moments.n)

    def normalised(self, x: np.ndarray) -> np.ndarray:
        """Projections of ``x`` scaled to zero mean and unit standard deviation per component (float64)."""
        return ((x - self.mean) @ self.axes) / (self.std + STD_EPS)
