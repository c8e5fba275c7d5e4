"""Recovery after pruning: the layer-wise least-squares re-fit and BatchNorm re-estimation."""
