"""``bench.merge_copy``: both ways of building SSD's data are timed on the same rows, and bad
arguments are refused."""

from __future__ import annotations

import json

import pytest

from bench import merge_copy


def test_both_ways_are_timed_on_data_they_build_alike(capsys: pytest.CaptureFixture[str]) -> None:
    assert merge_copy.main(["--retain", "40", "--forget", "8", "--repeat", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 48
    for way in ("three_calls", "one_copy"):
        assert len(result[way]["runs_s"]) == 2
        assert result[way]["median_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["one_copy"]["median_s"] / result["three_calls"]["median_s"]
    )


def test_the_parts_have_distinct_ids_across_retain_and_forget() -> None:
    retain, forget = merge_copy.synthetic_parts(30, 10, image=(1, 2, 2))
    assert len(set(retain.sample_ids) | set(forget.sample_ids)) == 40


def test_zero_repeats_are_refused() -> None:
    with pytest.raises(SystemExit):
        merge_copy.main(["--repeat", "0"])
