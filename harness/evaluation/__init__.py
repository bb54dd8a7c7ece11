"""The evaluation layer: a task's metrics (the registry a report and a comparison read) and the
predictions of a model on a split. Imports the data layer and the foundation only.
"""
