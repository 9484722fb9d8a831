"""``verify_bundle`` catches every kind of tampering the issue lists, every time."""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from civicdp.audit.bundle import TamperDetected, verify_bundle
from civicdp.audit.signing import SigningKey
from tests.audit.logs import ORIGIN, bundle, checkpoints_for, entry, signed_log

KEY = SigningKey.generate(ORIGIN)
OTHER = SigningKey.generate(ORIGIN)  # same name, another key: an impostor
SAMPLE = (0, 1, 17, 38, 39)  # first, early, middle, last-but-one, last


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, list[bytes]]:
    return signed_log(tmp_path / "good.zip", KEY)


def _rebundle(tmp_path: Path, lines: list[bytes], name: str, **kwargs: object) -> Path:
    """Tampered entries with the ORIGINAL signed checkpoints (what an attacker without the key can do)."""
    good = [entry(i) for i in range(40)]
    sizes = [10, 20, 30, 40]
    return bundle(tmp_path / name, lines, checkpoints_for(good, KEY, sizes), **kwargs)  # type: ignore[arg-type]


def test_an_untouched_bundle_verifies(log: tuple[Path, list[bytes]]) -> None:
    report = verify_bundle(log[0], [KEY.verifier])
    assert (report.entries, report.checkpoints, report.proofs, report.head.size) == (40, 4, 3, 40)


def test_flipping_any_single_byte_of_sampled_entries_is_caught(tmp_path: Path,
                                                                log: tuple[Path, list[bytes]]) -> None:
    _, lines = log
    cases = 0
    for index in SAMPLE:
        for position in range(len(lines[index])):
            for flip in (0x01, 0x80):
                changed = bytearray(lines[index])
                changed[position] ^= flip
                if bytes(changed) == b"\n" or b"\n" in changed:
                    changed[position] ^= 0x02 ^ flip  # a newline would split the line: flip another bit
                tampered = lines[:index] + [bytes(changed)] + lines[index + 1:]
                with pytest.raises(TamperDetected):
                    verify_bundle(_rebundle(tmp_path, tampered, "flip.zip"), [KEY.verifier])
                cases += 1
    assert cases > 1000


@pytest.mark.parametrize("index", SAMPLE)
def test_removing_inserting_or_swapping_entries_is_caught(tmp_path: Path, log: tuple[Path, list[bytes]],
                                                          index: int) -> None:
    _, lines = log
    removed = lines[:index] + lines[index + 1:]
    inserted = lines[:index] + [entry(index, action="query.estimate")] + lines[index:]
    swap = min(index, 38)
    swapped = lines[:swap] + [lines[swap + 1], lines[swap]] + lines[swap + 2:]
    for name, tampered in (("removed", removed), ("inserted", inserted), ("swapped", swapped)):
        with pytest.raises(TamperDetected):
            verify_bundle(_rebundle(tmp_path, tampered, f"{name}.zip"), [KEY.verifier])


def test_renumbered_entries_are_caught_by_the_tree_not_just_the_numbers(tmp_path: Path,
                                                                        log: tuple[Path, list[bytes]]) -> None:
    _, lines = log
    # Delete entry 5 and renumber the rest so every "seq" looks right: only the tree catches it.
    renumbered = [entry(i) if i < 5 else entry(i, detail={"loss_micro": 100_001 + i, "query_hash": f"{i + 1:064x}"})
                  for i in range(39)]
    with pytest.raises(TamperDetected, match="changed, removed, inserted or reordered|truncated"):
        verify_bundle(_rebundle(tmp_path, renumbered, "renumbered.zip"), [KEY.verifier])


def test_truncation_is_caught(tmp_path: Path, log: tuple[Path, list[bytes]]) -> None:
    _, lines = log
    with pytest.raises(TamperDetected, match="truncated"):
        verify_bundle(_rebundle(tmp_path, lines[:35], "cut.zip"), [KEY.verifier])
    # A clean cut at an earlier checkpoint, later checkpoints dropped: self-consistent, so only the
    # checkpoint the officer already holds can expose it.
    held = checkpoints_for(lines, KEY, [40])[0]
    short = bundle(tmp_path / "short.zip", lines[:30], checkpoints_for(lines, KEY, [10, 20, 30]))
    verify_bundle(short, [KEY.verifier])
    with pytest.raises(TamperDetected, match="truncated or rolled back"):
        verify_bundle(short, [KEY.verifier], trusted=held)


def test_entries_after_the_last_checkpoint_are_not_vouched_for(tmp_path: Path,
                                                               log: tuple[Path, list[bytes]]) -> None:
    _, lines = log
    with pytest.raises(TamperDetected, match="after its last checkpoint"):
        verify_bundle(_rebundle(tmp_path, lines + [entry(40)], "extra.zip"), [KEY.verifier])


def test_a_rewritten_history_resigned_with_the_real_key_is_caught_by_the_held_checkpoint(
        tmp_path: Path, log: tuple[Path, list[bytes]]) -> None:
    _, lines = log
    held = checkpoints_for(lines, KEY, [20])[0]
    rewritten = list(lines)
    rewritten[3] = entry(3, decision="denied")
    forged = bundle(tmp_path / "forged.zip", rewritten + [entry(40)],
                    checkpoints_for(rewritten + [entry(40)], KEY, [10, 20, 30, 41]))
    verify_bundle(forged, [KEY.verifier])  # internally consistent and validly signed ...
    with pytest.raises(TamperDetected, match="rewritten"):
        verify_bundle(forged, [KEY.verifier], trusted=held)  # ... but not the history the officer saw


def test_checkpoints_signed_by_another_key_are_refused(tmp_path: Path, log: tuple[Path, list[bytes]]) -> None:
    _, lines = log
    impostor = bundle(tmp_path / "impostor.zip", lines, checkpoints_for(lines, OTHER, [10, 20, 30, 40]))
    with pytest.raises(TamperDetected, match="not signed by the public key"):
        verify_bundle(impostor, [KEY.verifier])
    held = checkpoints_for(lines, OTHER, [20])[0]
    with pytest.raises(TamperDetected, match="trusted checkpoint is not signed"):
        verify_bundle(log[0], [KEY.verifier], trusted=held)


def test_a_changed_checkpoint_text_or_proof_is_caught(tmp_path: Path, log: tuple[Path, list[bytes]]) -> None:
    path, lines = log
    with zipfile.ZipFile(path) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    note = files["checkpoints/000000000020.txt"].decode()
    for old, new in (("\n20\n", "\n21\n"), ("time 2026", "time 2025")):
        changed = dict(files, **{"checkpoints/000000000020.txt": note.replace(old, new).encode()})
        with zipfile.ZipFile(tmp_path / "note.zip", "w") as archive:
            for n, data in changed.items():
                archive.writestr(n, data)
        with pytest.raises(TamperDetected):
            verify_bundle(tmp_path / "note.zip", [KEY.verifier])
    proofs = files["proofs.json"].decode()
    digit = proofs.index('"', proofs.index('"path"') + 10) + 1
    flipped = proofs[:digit] + ("0" if proofs[digit] != "0" else "1") + proofs[digit + 1:]
    with zipfile.ZipFile(tmp_path / "proof.zip", "w") as archive:
        for n, data in dict(files, **{"proofs.json": flipped.encode()}).items():
            archive.writestr(n, data)
    with pytest.raises(TamperDetected, match="consistency proof"):
        verify_bundle(tmp_path / "proof.zip", [KEY.verifier])


def test_damaged_or_foreign_files_get_a_plain_explanation(tmp_path: Path) -> None:
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(TamperDetected, match="not a readable zip"):
        verify_bundle(tmp_path / "junk.zip", [KEY.verifier])
    with pytest.raises(TamperDetected, match="no bundle"):
        verify_bundle(tmp_path / "missing.zip", [KEY.verifier])


def test_the_verify_command_runs_offline_with_only_the_public_key(tmp_path: Path, log: tuple[Path, list[bytes]],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from civicdp.server.entry import app

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("networking is unavailable in this test")

    for name in ("connect", "connect_ex", "sendto", "bind"):
        monkeypatch.setattr(socket.socket, name, no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    empty = tmp_path / "no-server-here"
    monkeypatch.setenv("CIVICDP_DATA_DIR", str(empty))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    key_file = tmp_path / "log.pub"
    key_file.write_text(KEY.verifier.encode() + "\n")
    runner = CliRunner()
    good = runner.invoke(app, ["audit", "verify", str(log[0]), "--public-key", str(key_file)])
    assert good.exit_code == 0, good.output
    assert "OK: 40 entries" in good.output
    lines = log[1]
    tampered = _rebundle(tmp_path, lines[:3] + lines[4:], "gap.zip")
    bad = runner.invoke(app, ["audit", "verify", str(tampered), "--public-key", KEY.verifier.encode()])
    assert bad.exit_code == 1
    assert "TAMPERING DETECTED" in bad.output and "deleted, inserted or reordered" in bad.output
    wrong = runner.invoke(app, ["audit", "verify", str(log[0]), "--public-key", OTHER.verifier.encode()])
    assert wrong.exit_code == 1 and "not signed by the public key" in wrong.output
    assert not empty.exists()  # nothing of a server was needed or created
