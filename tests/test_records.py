"""Record files: strict JSON, a truncated last line tolerated, resumed runs read as one."""

import json
import math

import pytest

from lightning_icl import records


def test_records_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    records.write_jsonl(str(path), [{"step": 1, "cd": [0.5, math.nan], "loss": math.inf}])
    records.append_jsonl(str(path), {"step": 2, "x": (-math.inf, 1.0)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    strict = lambda c: pytest.fail(f"non-JSON constant {c}")
    lines = [json.loads(line, parse_constant=strict) for line in text.splitlines()]
    assert lines == [{"step": 1, "cd": [0.5, None], "loss": None}, {"step": 2, "x": [None, 1.0]}]


def test_a_truncated_last_line_is_skipped_and_a_broken_middle_line_names_the_file(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "cd": [0.1, 0.')  # killed mid-write
    with pytest.warns(UserWarning, match="cut off while being written"):
        assert records.read_jsonl(str(path)) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"cut.jsonl, line 2: not a JSON record"):
        records.read_jsonl(str(path))


def write_segment(directory, run_id, start, steps, value):
    directory.mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"run_id": run_id, "start_step": start}))
    records.write_jsonl(str(directory / "ablation.jsonl"), [{"step": s, "v": value} for s in steps])
    records.write_metrics_csv(str(directory / "metrics.csv"), {"val/loss": [(s, value) for s in steps]})


def test_the_versions_of_a_resumed_run_join_into_one_and_other_runs_stay_apart(tmp_path):
    logger = tmp_path / "runs" / "quickstart"
    # version_0 died at step 25 after a checkpoint at 20; version_1 resumed from step 20; version_2 is a new run
    write_segment(logger / "version_0", "a", 0, [10, 20, 25], 0.0)
    write_segment(logger / "version_1", "a", 20, [20, 30], 1.0)
    write_segment(logger / "version_2", "b", 0, [10], 2.0)
    dirs = records.expand_run_dirs([str(logger)])
    assert [d.rsplit("/", 1)[1] for d in dirs] == ["version_0", "version_1", "version_2"]
    segments = records.run_segments(dirs)
    assert [[d.rsplit("/", 1)[1] for d in run] for run in segments] == [["version_0", "version_1"], ["version_2"]]
    joined = records.merge_segments(segments[0], str(tmp_path / "joined"))
    # the dead timeline's step 25 is gone; the resumed run's step 20 replaces the dead run's
    assert records.read_jsonl(f"{joined}/ablation.jsonl") == [{"step": 10, "v": 0.0}, {"step": 20, "v": 1.0},
                                                              {"step": 30, "v": 1.0}]  # fmt: skip
    assert records.read_metrics_csv(f"{joined}/metrics.csv") == {"val/loss": [(10, 0.0), (20, 1.0), (30, 1.0)]}
    assert records.merge_segments(segments[1], str(tmp_path / "other")) == segments[1][0]
