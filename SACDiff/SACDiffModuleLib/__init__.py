"""Helpers of the SACDiff Slicer module (kept in a package so that Slicer does not scan them as modules)."""
