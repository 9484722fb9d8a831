"""A witness: the oversight body's memory of the checkpoints it has seen.

It cosigns a new checkpoint only if it is signed by the log's key and consistent with
everything the witness saw before: never two different roots for one size, never a
smaller log after a larger one, and a larger log only with proof that it extends the
last one (a consistency proof, or a bundle holding all the entries).
"""

from __future__ import annotations

import time
from pathlib import Path

from civicdp.audit.bundle import TamperDetected, verify_bundle
from civicdp.audit.checkpoint import Checkpoint
from civicdp.audit.merkle import verify_consistency
from civicdp.audit.signing import SigningKey, VerifierKey


class WitnessRefused(Exception):
    """The witness will not cosign; the message says why."""


class Witness:
    def __init__(self, state_dir: Path, name: str = "civicdp-witness") -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "seen").mkdir(exist_ok=True)
        self.key = SigningKey.load_or_create(self.dir / "witness.key", name)

    def seen(self) -> dict[int, Checkpoint]:
        return {int(p.stem): Checkpoint.parse(p.read_text()) for p in (self.dir / "seen").glob("*.txt")}

    def latest(self) -> Checkpoint | None:
        seen = self.seen()
        return seen[max(seen)] if seen else None

    def cosign(self, checkpoint: Checkpoint, keys: list[VerifierKey], *, proof: list[bytes] | None = None,
               bundle: Path | None = None, now: int | None = None) -> Checkpoint:
        if not checkpoint.verified_by(keys):
            raise WitnessRefused("the checkpoint is not signed by the log's public key you gave")
        seen = self.seen()
        same = seen.get(checkpoint.size)
        if same is not None and same.root != checkpoint.root:
            raise WitnessRefused(
                f"the log shows a different root for size {checkpoint.size:,} than the one witnessed before: "
                "it forked or rewrote its history")
        latest = seen[max(seen)] if seen else None
        if latest is not None and checkpoint.origin != latest.origin:
            raise WitnessRefused(f"this witness follows {latest.origin!r}, not {checkpoint.origin!r}")
        if latest is not None and checkpoint.size < latest.size:
            raise WitnessRefused(
                f"the checkpoint has {checkpoint.size:,} entries but the witness already saw {latest.size:,}: "
                "a log only grows (truncated or rolled back)")
        if latest is not None and checkpoint.size > latest.size:
            self._check_extends(latest, checkpoint, keys, proof, bundle)
        cosigned = checkpoint.cosigned_by(self.key, int(time.time()) if now is None else now)
        (self.dir / "seen" / f"{checkpoint.size:012d}.txt").write_text(cosigned.text())
        return cosigned

    @staticmethod
    def _check_extends(latest: Checkpoint, checkpoint: Checkpoint, keys: list[VerifierKey],
                       proof: list[bytes] | None, bundle: Path | None) -> None:
        if bundle is not None:
            try:
                report = verify_bundle(bundle, keys, trusted=latest)
            except TamperDetected as exc:
                raise WitnessRefused(f"the bundle does not verify: {exc}") from None
            if report.head.size != checkpoint.size or report.head.root != checkpoint.root:
                raise WitnessRefused("the bundle's head is not the checkpoint to cosign")
            return
        if proof is None:
            raise WitnessRefused(
                f"the witness last saw {latest.size:,} entries: give a consistency proof from {latest.size} to "
                f"{checkpoint.size} (civicdp audit prove --first {latest.size} --second {checkpoint.size}) "
                "or a bundle")
        if not verify_consistency(latest.size, checkpoint.size, latest.root, checkpoint.root, proof):
            raise WitnessRefused(
                f"the consistency proof from {latest.size:,} to {checkpoint.size:,} entries does not verify: "
                "the new log does not extend the one witnessed before")
