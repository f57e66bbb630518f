"""What the detector decides from normal images alone: threshold, calibration, near-duplicates."""
