"""What a non-editable install ships."""

from __future__ import annotations

import re

from support import REPO


def test_every_package_directory_is_listed_for_the_distribution():
    """pyproject.toml lists packages by hand: a new subpackage left out of the list
    would be missing from a wheel (an editable install would not notice)."""
    listed = re.search(r"^packages = \[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.M).group(1)
    packages = {name.strip().strip('"') for name in listed.split(",")}
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts) for init in (REPO / "offlog").rglob("__init__.py")
    }
    assert packages == on_disk
