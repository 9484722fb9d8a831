"""The witness cosigns only checkpoints consistent with everything it saw before."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from civicdp.audit.checkpoint import Checkpoint
from civicdp.audit.merkle import MerkleTree, leaf_hash
from civicdp.audit.signing import KeyError_, SigningKey, VerifierKey
from civicdp.audit.witness import Witness, WitnessRefused
from tests.audit.logs import ORIGIN, bundle, checkpoints_for, entry

KEY = SigningKey.generate(ORIGIN)
LINES = [entry(i) for i in range(30)]
TREE = MerkleTree(leaf_hash(line) for line in LINES)


def head(size: int, key: SigningKey = KEY, lines: list[bytes] = LINES) -> Checkpoint:
    return checkpoints_for(lines, key, [size])[0]


def test_cosigns_a_growing_log_given_consistency_proofs(tmp_path: Path) -> None:
    witness = Witness(tmp_path / "w")
    first = witness.cosign(head(10), [KEY.verifier])
    assert first.cosigned_by_key(witness.key.verifier) and first.verified_by([KEY.verifier])
    second = witness.cosign(head(25), [KEY.verifier], proof=TREE.consistency_proof(10, 25))
    assert second.cosigned_by_key(witness.key.verifier)
    assert Checkpoint.parse(second.text()).cosigned_by_key(witness.key.verifier)  # survives a round trip
    assert witness.latest().size == 25  # type: ignore[union-attr]
    witness.cosign(head(25), [KEY.verifier])  # the same checkpoint again is fine


def test_refuses_two_roots_for_one_size(tmp_path: Path) -> None:
    witness = Witness(tmp_path / "w")
    witness.cosign(head(20), [KEY.verifier])
    forked = [entry(i, decision="denied") if i == 4 else line for i, line in enumerate(LINES)]
    with pytest.raises(WitnessRefused, match="different root for size 20"):
        witness.cosign(head(20, lines=forked), [KEY.verifier])


def test_refuses_a_smaller_log_after_a_larger_one(tmp_path: Path) -> None:
    witness = Witness(tmp_path / "w")
    witness.cosign(head(20), [KEY.verifier])
    with pytest.raises(WitnessRefused, match="a log only grows"):
        witness.cosign(head(15), [KEY.verifier])


def test_refuses_growth_without_or_with_a_bad_proof(tmp_path: Path) -> None:
    witness = Witness(tmp_path / "w")
    witness.cosign(head(10), [KEY.verifier])
    with pytest.raises(WitnessRefused, match="give a consistency proof"):
        witness.cosign(head(20), [KEY.verifier])
    forked = [entry(i, decision="denied") if i == 4 else line for i, line in enumerate(LINES)]
    forked_tree = MerkleTree(leaf_hash(line) for line in forked)
    with pytest.raises(WitnessRefused, match="does not verify"):
        witness.cosign(head(20, lines=forked), [KEY.verifier], proof=forked_tree.consistency_proof(10, 20))
    with pytest.raises(WitnessRefused, match="not signed by the log"):
        witness.cosign(head(20, key=SigningKey.generate(ORIGIN)), [KEY.verifier],
                       proof=TREE.consistency_proof(10, 20))


def test_accepts_a_bundle_as_proof_and_the_cli_explains_refusals(tmp_path: Path) -> None:
    from civicdp.server.entry import app

    state = tmp_path / "w"
    runner = CliRunner()
    key = KEY.verifier.encode()
    (tmp_path / "ten.txt").write_text(head(10).text())
    assert runner.invoke(app, ["audit", "witness", str(tmp_path / "ten.txt"), "--public-key", key,
                               "--state", str(state)]).exit_code == 0
    good = bundle(tmp_path / "b.zip", LINES, checkpoints_for(LINES, KEY, [10, 20, 30]))
    result = runner.invoke(app, ["audit", "witness", str(good), "--public-key", key, "--state", str(state),
                                 "--out", str(tmp_path / "cosigned.txt")])
    assert result.exit_code == 0, result.output
    assert Checkpoint.parse((tmp_path / "cosigned.txt").read_text()).size == 30
    (tmp_path / "old.txt").write_text(head(20).text())
    refused = runner.invoke(app, ["audit", "witness", str(tmp_path / "old.txt"), "--public-key", key,
                                  "--state", str(state)])
    assert refused.exit_code == 1 and "REFUSED" in refused.output and "only grows" in refused.output


def test_verifier_keys_round_trip_and_reject_alterations() -> None:
    text = KEY.verifier.encode()
    assert VerifierKey.parse(text) == KEY.verifier
    name, key_id, public = text.split("+", 2)
    for bad in (f"other+{key_id}+{public}", f"{name}+00000000+{public}", f"{name}+{key_id}", "nonsense"):
        with pytest.raises(KeyError_):
            VerifierKey.parse(bad)


def test_the_key_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "k" / "signing.key"
    created = SigningKey.load_or_create(path, ORIGIN)
    assert path.stat().st_mode & 0o777 == 0o600
    assert SigningKey.load_or_create(path, ORIGIN).verifier == created.verifier
