"""Workload plans: many statistics, each with its target accuracy or weight, planned together within a budget."""
