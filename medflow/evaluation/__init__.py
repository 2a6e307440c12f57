"""Evaluation: metrics with confidence intervals, scoring a split or a folder, Grad-CAM, the report."""
