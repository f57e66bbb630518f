"""Datasets (MVTec AD, BTAD, plain folders; local or S3), image decoding, synthetic data.

Submodules are imported directly (``mspray.data.datasets`` needs no torch).
"""
