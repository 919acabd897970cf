"""The golden data kept in the repository is complete and unaltered (tests/golden/README.md)."""
import hashlib
import json

import pytest

from testkit.golden import GOLDEN_DIR, MissingGoldenData, golden_path


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listed():
    lines = golden_path("SHA256SUMS").read_text().splitlines()
    return dict(reversed(line.split(maxsplit=1)) for line in lines if line.strip())


def test_every_listed_file_is_present_and_unaltered():
    listed = _listed()
    assert len(listed) >= 40
    changed = [name for name, digest in listed.items() if _sha256(golden_path(name)) != digest]
    assert changed == [], f"golden files differ from SHA256SUMS: {changed}"


def test_no_unlisted_data_files():
    on_disk = {str(p.relative_to(GOLDEN_DIR)) for p in GOLDEN_DIR.rglob("*") if p.is_file()}
    assert on_disk - set(_listed()) == {"README.md", "SHA256SUMS"}


def test_fastattn_manifest_hashes_agree():
    manifest = json.loads(golden_path("fastattn", "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert _sha256(golden_path("fastattn", name)) == digest, name


def test_missing_file_fails_with_the_fix():
    with pytest.raises(MissingGoldenData, match="git checkout -- tests/golden"):
        golden_path("fastattn", "no_such_file.json")
