"""Scheduled, signed aggregate feeds for agencies: definitions, approvals, periods, releases,
and the scheduler that runs them.
"""
