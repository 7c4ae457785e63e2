"""Decisions read off measured curves: the divergence rule, the split recommendation (K_t and prior
layers), and what a split costs. Imports the estimator only."""
