"""estimator package."""
