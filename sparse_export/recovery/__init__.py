"""Recovery after pruning: training the kept weights with every pruned weight held at exactly zero."""
