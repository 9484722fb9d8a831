"""The `civicdp` command line: every command, the demo and the tour.
"""
