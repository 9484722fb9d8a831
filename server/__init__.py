"""The civicdp service, in rooms (dependencies point down this list; docs/architecture.md):

    entry.py     the console script: CLI commands plus serve/demo
    cli/ | http/ the command line | the HTTP API (never each other)
    feeds/ | monitors/ | intake/   feeds, monitors, a steward's data intake (import, check, prepare)
    services/    the query service, steward/oversight operations, schemas, start-up
    auditlog/    the signed audit log as stored, checkpoints, reconciliation
    state/       database and tables, settings, identity, accounts and keys, ledger, registry
"""
