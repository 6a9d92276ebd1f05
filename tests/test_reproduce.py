"""`slca reproduce` end to end on the CPU proxy with tiny runs: the table's numbers are recomputed by hand from
the runs' results.json; missing runs and runs whose provenance disagrees are reported as such."""
import json

import pytest

from slca_kit import cli
from slca_kit.reproduce import collect, markdown, select_targets
from slca_kit.errors import ConfigError

from conftest import shared_path

TINY = ["train.epochs=1", "data.max_train_per_class=2", "scenario.increment=51", "scenario.num_tasks=2",
        "train.eval_batch_size=512"]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    shared = shared_path()
    mp = pytest.MonkeyPatch()
    mp.setenv("SLCA_SHARED", str(shared))
    mp.setenv("TQDM_DISABLE", "1")
    output = tmp_path_factory.mktemp("reproduce") / "proxy"
    status = cli.main(["reproduce", "proxy", *TINY, "--methods", "slca", "seq_ft", "--seeds", "1", "2",
                       "--output", str(output)])
    assert status == 0
    yield output
    mp.undo()


def test_the_table_is_the_runs_mean_and_std_against_the_published_value(reproduced):
    cells = {(c["recipe"], c["metric"]): c for c in json.loads((reproduced / "reproduce.json").read_text())["cells"]}
    assert set(cells) == {(f"proxy/{m}", k) for m in ("slca", "seq_ft") for k in ("last_acc", "inc_acc")}
    for (recipe, metric), cell in cells.items():
        runs = [json.loads((reproduced / "runs" / "proxy" / f"{recipe.split('/')[1]}_seed{s}" / "results.json")
                           .read_text()) for s in (1, 2)]
        assert [r["config"]["scenario"]["class_order_seed"] for r in runs] == [1, 2]
        values = [r[metric] for r in runs]
        mean = (values[0] + values[1]) / 2
        std = abs(values[0] - values[1]) / 2 ** 0.5  # sample std of two values
        assert cell["ours"] == values
        assert cell["ours_mean"] == pytest.approx(mean) and cell["ours_std"] == pytest.approx(std)
        assert cell["difference"] == pytest.approx(mean - cell["paper_value"])
        assert cell["within_tolerance"] == (abs(mean - cell["paper_value"]) <= cell["tolerance"])
        assert cell["tolerance"] == max(1.0, round(2 * cell["paper_std"], 2))  # measured over 3 seeds
        assert cell["missing"] == [] and cell["provenance_differs"] == []
    table = (reproduced / "reproduce.md").read_text()
    slca_last = cells["proxy/slca", "last_acc"]
    assert (f"| proxy/slca | Last-Acc | 43.19 ± 0.39 | {slca_last['ours_mean']:.2f} ± "
            f"{slca_last['ours_std']:.2f} (2) | {slca_last['difference']:+.2f} |") in table
    assert (reproduced / "reproduce.png").stat().st_size > 0


def test_existing_runs_are_only_collected(reproduced, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SLCA_SHARED", str(shared_path()))
    before = (reproduced / "reproduce.json").read_text()
    assert cli.main(["reproduce", "proxy", *TINY, "--methods", "slca", "seq_ft", "--seeds", "1", "2",
                     "--output", str(reproduced)]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 4
    assert json.loads((reproduced / "reproduce.json").read_text()) == json.loads(before)


def test_missing_runs_and_disagreeing_provenance_are_shown_not_averaged(reproduced, tmp_path):
    targets = select_targets("proxy", None, ["slca"])
    cells = collect(targets, [1, 2, 3], reproduced)  # seed 3 never ran
    assert all(c.summary()["ours_mean"] is None and c.missing == ["seed 3: not run"] for c in cells)
    assert "missing: seed 3: not run" in markdown(cells)
    run = reproduced / "runs" / "proxy" / "slca_seed2" / "results.json"
    results = json.loads(run.read_text())
    results["provenance"]["backbone"]["file_sha256"] = "0" * 64  # other weights
    run.write_text(json.dumps(results))
    cells = collect(targets, [1, 2], reproduced)
    assert all(c.provenance_differs == ["backbone.file_sha256"] for c in cells)
    assert "runs differ in backbone.file_sha256" in markdown(cells)


def test_unknown_table_or_empty_selection_is_one_clear_error():
    with pytest.raises(ConfigError, match="reproduce: unknown table 'nope'; tables: method_papers, proxy, slca_table1"):
        select_targets("nope", None, None)
    with pytest.raises(ConfigError, match="no cell for benchmarks"):
        select_targets("slca_table1", ["proxy"], None)


def test_dry_run_prints_commands_and_cost(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SLCA_SHARED", str(shared_path()))
    assert cli.main(["reproduce", "proxy", "--methods", "slca", "--output", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"slca train proxy/slca output_dir={tmp_path}/runs/proxy name=slca --seeds 1993 1996 1997" in out
    assert "3 runs; each 12 epochs per task, about 2457 optimizer steps" in out
    assert not (tmp_path / "runs").exists()
