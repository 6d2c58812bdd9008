"""``acceptance_threshold="auto"``: a threshold the target sets for itself, without labels.

A hand-picked threshold means one thing on one model and another on the next: a 270M model is rarely
more than 60% sure of a step, a 7B model often 95%. What does transfer is the question the threshold
stands for: *would the target be content to have written this step?* The target answers it for free
on every verified step. Its verification pass already says, token by token, whether each token of the
draft's step is the target's own first choice; a step where every token is is a step the target
writes itself, and its score (grounding and confidence, computed the same way as for any step) is a
sample of how the target's own steps score. The threshold in force is a low quantile of those scores:
a draft step passes when it scores about as well as the target's own steps do.

The scores come from every verified step whatever its verdict, so which steps were accepted does not
bias them. Until enough have been seen, the estimate is shrunk towards a prior (0.5), and it keeps only
recent steps.

A calibrator belongs to one generation (``decoding.threshold_calibrator``): a call's threshold, and so
its text, never depends on what other calls did. It starts at the prior on every call, so "auto" suits
long outputs; ``ChatSpecGuard.calibrate`` runs prompts through one calibrator up front and returns the
threshold they settle on, to be fixed as ``acceptance_threshold``. This is for the 'mean' and 'min'
confidence methods, whose scale varies by model; the default 'ratio' needs no calibration.
"""

from __future__ import annotations

import threading
from collections import deque

PRIOR_THRESHOLD = 0.5
"""The threshold before any observation: the fixed default."""
PRIOR_WEIGHT = 16
"""How many observations the prior counts as."""
WINDOW = 512
"""Most recent target-agreed step scores kept per calibrator."""


class ThresholdCalibrator:
    """A running low quantile of the scores of steps the target would have written itself."""

    def __init__(self, quantile: float, prior: float = PRIOR_THRESHOLD, window: int = WINDOW) -> None:
        self.quantile = quantile
        self.prior = prior
        self._scores: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._scores)

    def observe(self, score: float) -> None:
        if score == score:  # NaN scores (nothing measurable) teach nothing
            with self._lock:
                self._scores.append(score)

    def threshold(self) -> float:
        with self._lock:
            scores = sorted(self._scores)
        n = len(scores)
        if n == 0:
            return self.prior
        position = self.quantile * (n - 1)  # linear interpolation between order statistics
        low = int(position)
        high = min(low + 1, n - 1)
        estimate = scores[low] + (scores[high] - scores[low]) * (position - low)
        return (PRIOR_WEIGHT * self.prior + n * estimate) / (PRIOR_WEIGHT + n)
