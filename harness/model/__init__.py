"""The model layer: one training step of any variant (its objective, the optimiser step, the precision)
and the random inputs of a variant's shape, shared by the runner and the benchmarks. Imports the layers
below it only (runs, evaluation, data, foundation).
"""
