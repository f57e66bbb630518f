"""Fitting a detector as one sequence of named steps, run in process or on Ray."""
