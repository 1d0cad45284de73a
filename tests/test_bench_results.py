"""The benchmarks' committed results describe runs, not the machine's folders: no value in
bench/results/*.json is a path of the machine that wrote it (a checkout is named by its commit)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
FOLDER = re.compile(r"^(?:/|~/|[A-Za-z]:\\)(?:home|tmp|work|root|Users|usr|var|opt|mnt|srv)\b")


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings(k) + strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_results_name_no_folder_of_the_machine(path):
    folders = [s for s in strings(json.loads(path.read_text())) if FOLDER.match(s)]
    assert not folders, f"{path.name} names folders of the machine that wrote it: {folders[:3]}"


def test_the_check_sees_a_folder():
    assert [s for s in strings({"a": ["/work/x", "/v1/jobs", "C:\\Users\\me"]}) if FOLDER.match(s)] == [
        "/work/x", "C:\\Users\\me"]
