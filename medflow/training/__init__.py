"""Training: models, input pipelines, distribution strategies, the fit loop."""
