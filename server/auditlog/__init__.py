"""The signed audit log as stored: appending entries, the Merkle tiles, checkpoints and their
consistency, and the reconciliation of the ledger and releases with the log.

    slots, canonical     a request's slot; an entry's canonical form and leaf check
    alarms               the integrity alarms (shared by the processes on a database) and their refusals
    marks                what earlier checks established, authenticated: a start checks only what is new
    append               appending entries inside the transaction of what they record
    tree_store           the Merkle tree stored as tiles, shared by every process
    signing, integrity   the signing keys and kept checkpoint; the checks against signed checkpoints
    export, log          the export bundle; AuditLog: the tree, checkpoints, proofs, periodic checks
    evidence             what audit entries say about charges and releases
    budgets, answers     budgets against ledger and charges (the spend check); stored answers against hashes
    ledger_folds, kept   the ledger folded up to an entry; the reconciliation's evidence kept between starts
    reconcile, offline   the server's reconciliation of a database; ``civicdp audit reconcile``

Nothing here imports upwards: log.py runs the reconciliation it is given (``state_check``),
which the server wires in (civicdp.server.services.bootstrap), with the ledger's spend check.
"""
