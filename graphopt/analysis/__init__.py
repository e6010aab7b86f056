"""What passes ask of a graph: linear sites, calibration capture, residual stream, pruning graph, sensitivity, diff, inspect."""
