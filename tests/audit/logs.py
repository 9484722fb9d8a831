"""Small signed logs and bundles built with the audit library alone (no server)."""

from __future__ import annotations

import json
from pathlib import Path

from civicdp.audit.bundle import write_bundle
from civicdp.audit.checkpoint import Checkpoint
from civicdp.audit.merkle import MerkleTree, leaf_hash
from civicdp.audit.signing import SigningKey

ORIGIN = "civicdp.test/audit"


def entry(seq: int, **fields: object) -> bytes:
    body = {"seq": seq, "action": "query.run", "who": {"account": f"ana-{seq % 3}", "agency": "health"},
            "decision": "allowed", "detail": {"loss_micro": 100_000 + seq, "query_hash": f"{seq:064x}"}, **fields}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def checkpoints_for(lines: list[bytes], key: SigningKey, sizes: list[int]) -> list[Checkpoint]:
    tree = MerkleTree(leaf_hash(line) for line in lines)
    return [Checkpoint(ORIGIN, size, tree.root(size), ("time 2026-11-23T00:00:00Z",)).signed_by(key)
            for size in sizes]


def bundle(path: Path, lines: list[bytes], checkpoints: list[Checkpoint], with_proofs: bool = True) -> Path:
    tree = MerkleTree(leaf_hash(line) for line in lines)
    proofs = []
    if with_proofs:
        sizes = [c.size for c in checkpoints]
        proofs = [{"first": a, "second": b, "path": [h.hex() for h in tree.consistency_proof(a, b)]}
                  for a, b in zip(sizes, sizes[1:]) if b <= len(tree)]
    write_bundle(path, lines, [c.text() for c in checkpoints], proofs)
    return path


def signed_log(path: Path, key: SigningKey, n: int = 40, every: int = 10) -> tuple[Path, list[bytes]]:
    lines = [entry(i) for i in range(n)]
    sizes = sorted({*range(every, n + 1, every), n})
    return bundle(path, lines, checkpoints_for(lines, key, sizes)), lines
