"""The training layer: a run's plan (every check before any work), the runner that trains, resumes and
records it, teachers' cached outputs, the live logging sinks and the run bundles that move runs between
stores. Imports the layers below it only (measurement, model, runs, evaluation, data, foundation).
"""
