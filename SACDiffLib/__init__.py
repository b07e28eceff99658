"""SACDiff: scan-aware, consistency-enhanced diffusion for unsupervised anomaly detection in chest CT.

The method of Zheng et al., MIDL 2026, as a library: one file per step of the method (see README, "Method to
file map"). Imports no Slicer and no Qt.
"""

__version__ = "0.1.0"
