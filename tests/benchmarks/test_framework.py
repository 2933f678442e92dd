"""The benchmark result contract, run_all's selection and the README table generated from the JSON files."""

import json

import common
import pytest
import readme_table
import run_all

PAYLOAD = {
    "config": {"objects": 2},
    "raw": {"a": [1.0]},
    "ratio": 1.25,
    "goal": ">= 1.5x",
    "met": False,
    "baseline": "folder dataset",
    "summary": "one sentence.",
}


def test_write_result_adds_machine_and_versions(results_tmp):
    path = common.write_result("demo", PAYLOAD)
    record = json.loads(path.read_text())
    assert path == results_tmp / "demo.json"
    assert record["name"] == "demo" and record["ratio"] == 1.25
    assert {"cpu", "cores", "ram_gib", "gpu"} <= set(record["machine"])
    assert {"python", "torch", "deepspeed", "diffusers"} <= set(record["versions"])
    assert record["when"]
    assert not list(results_tmp.glob(".*.tmp"))  # the atomic write left nothing behind
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize(("key", "value"), [("ratio", None), ("met", "yes"), ("summary", 3)])
def test_write_result_refuses_a_bad_payload(results_tmp, key, value):
    bad = {**PAYLOAD, key: value} if value is not None else {k: v for k, v in PAYLOAD.items() if k != key}
    with pytest.raises(common.BenchmarkError, match=f"'demo'.*'{key}'"):
        common.write_result("demo", bad)
    assert not (results_tmp / "demo.json").exists()


def test_readme_table_matches_the_json_and_keeps_the_rest(results_tmp, tmp_path_factory):
    common.write_result("overhead", {**PAYLOAD, "summary": "a | b"})
    common.write_result("data", {**PAYLOAD, "ratio": 2.0, "met": True})
    (results_tmp / "old.json").write_text('{"benchmark": "old"}')  # not the contract: left out
    readme = tmp_path_factory.mktemp("readme") / "README.md"
    readme.write_text(f"intro\n{readme_table.BEGIN}\nstale\n{readme_table.END}\noutro\n")
    assert readme_table.main(["--readme", str(readme), "--check"]) == 1
    assert readme_table.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert readme_table.main(["--readme", str(readme), "--check"]) == 0
    assert text.startswith("intro\n") and text.endswith(f"{readme_table.END}\noutro\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| overhead", "| data"]  # run_all's order
    assert "1.25×" in rows[0] and "a \\| b" in rows[0] and "**no**" in rows[0]
    assert "2×" in rows[1] and "| yes |" in rows[1]
    assert "stale" not in text and "| old |" not in text


def test_readme_table_without_markers_is_a_one_line_error(results_tmp, tmp_path_factory, capsys):
    readme = tmp_path_factory.mktemp("readme") / "README.md"
    readme.write_text("no markers\n")
    assert readme_table.main(["--readme", str(readme)]) == 2
    assert "needs exactly one <!-- bench:begin -->" in capsys.readouterr().err


def test_our_readme_table_is_the_committed_json():
    """README.md between the markers == what benchmarks/results/*.json say (rerun readme_table.py)."""
    assert readme_table.main(["--check"]) == 0


def test_run_all_knows_every_benchmark_script():
    scripts = {p.stem for p in run_all.BENCH_DIR.glob("bench_*.py")}
    assert scripts <= set(run_all.BENCHMARKS), f"add {sorted(scripts - set(run_all.BENCHMARKS))} to run_all"
    assert run_all.select("overhead,bench_stall") == ["bench_overhead", "bench_stall"]
    with pytest.raises(SystemExit, match="unknown benchmark"):
        run_all.select("nope")
