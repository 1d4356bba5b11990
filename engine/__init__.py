"""Shared engine code for train.py, evaluate.py and predict.py: batching, checkpoints, metrics."""
