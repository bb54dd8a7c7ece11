"""The execution layer: how many runs are executed: grids, their schedule across devices and
workers, the executors (serial, local processes, submitit/SLURM) and the regression grids. Imports the
layers below it only.
"""
