"""python_layer layers."""
