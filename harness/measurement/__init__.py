"""The measurement layer: parameters, FLOPs, latency, memory and training throughput of a variant, the
cost records of the store and a run's training bill. Imports the layers below it only (model, runs,
evaluation, data, foundation).
"""
