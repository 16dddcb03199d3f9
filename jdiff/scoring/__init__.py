"""Challenge scoring: the Hist colour metric and the final-score formula."""

from jdiff.scoring.final import METRICS, FinalScore, final_score
from jdiff.scoring.hist import hist_score

__all__ = ["METRICS", "FinalScore", "final_score", "hist_score"]
