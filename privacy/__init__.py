"""How answers are made private, independent of any query language.

OpenDP mechanisms (the only place in civicdp that draws noise), contribution
bounding, accuracy (confidence intervals), privacy losses and budgets as exact
values, and their composition. Imports nothing else of civicdp.
"""
