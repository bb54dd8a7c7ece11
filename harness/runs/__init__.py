"""The runs layer: what a run is (its settings, its id and the fingerprint of its code), its record, and the
results store that keeps runs on disk. Imports the evaluation and data layers and the foundation only.
"""
