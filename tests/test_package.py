"""The files that ship beside the package: its license and changelog."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_license_is_bsd_3_clause():
    text = (ROOT / "LICENSE").read_text()
    assert "Redistribution and use in source and binary forms" in text
    assert "Neither the name of the copyright holder" in text       # the third clause
    assert "Copyright (c) 2026, the lce_compile authors" in text


def test_changelog_names_the_removal_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in text and "## 0.1.0" in text
    assert "0.2.0" in text
