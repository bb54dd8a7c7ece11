"""The search layer: hyper-parameter studies (Optuna) over the grid machinery, their study files and
their reports. The top layer under the command lines; imports every layer below it.
"""
