"""Metrics on labelled test sets and the evaluation of a detector."""
