"""The signed audit log as stored: appending entries, the Merkle tiles, checkpoints and their
consistency, and the reconciliation of the ledger and releases with the log.
"""
