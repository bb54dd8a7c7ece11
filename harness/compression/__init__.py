"""The compression layer: trained runs evaluated again after compression (int8, ONNX Runtime...) through
the method registry, with their agreement, size and latency. Imports the layers below it only.
"""
