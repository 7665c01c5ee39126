"""Helpers the tests share (not tests themselves): projects, MLflow stores, fakes, sample data."""
