"""The state every part shares: the database and its tables, settings and the state's identity,
accounts and API keys, the budget ledger, the dataset registry and its checks, domain errors.
"""
