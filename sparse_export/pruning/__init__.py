"""Pruning: pruners (functions of a weight and its Hessian), the layer-by-layer driver, the recipe, the
integer weight grid, and the `prune` job."""
