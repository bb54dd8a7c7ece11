"""The data layer: the HCRN/DualVGR feature format and the questions, read and checked (everything from
outside is hostile until checked), the synthetic data sets, and the preparation of features from videos
(:mod:`harness.data.prepare`). Imports the foundation modules (``harness/*.py``) only.
"""
