"""Trust: findings about plans, coverage and target specs, gates, version chains, and reports about states."""
