"""`python -m pipeline metrics`: a run's metrics.jsonl summarised (median [min, max], first and
last window means), the numbers RESULTS tables quote for a training run."""

import json

from pipeline.__main__ import main
from pipeline.train.monitor import read_metrics, summarise


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_of_a_run(tmp_path, capsys):
    steps = [{"step": s, "perf/step_s": float(s), "atp/n_bar": 100.0 - s} for s in range(1, 13)]
    steps[4]["perf/step_s"] = 99.0  # an outlier the median ignores
    steps.append({"step": 12, "perf/step_s": 12.5, "atp/n_bar": 88.0})  # a resumed run's line wins
    write(tmp_path / "metrics.jsonl", steps)
    m = read_metrics(tmp_path / "metrics.jsonl")
    rows = {r["key"]: r for r in summarise(m, ("perf/step_s", "atp/n_bar", "loss/ntp"), from_step=3, window=2)}
    assert set(rows) == {"perf/step_s", "atp/n_bar"}  # loss/ntp never logged
    t = rows["perf/step_s"]  # steps 3..12: 3 4 99 6 7 8 9 10 11 12.5
    assert t["steps"] == 10 and (t["min"], t["max"]) == (3.0, 99.0)
    assert t["median"] == 8.5 and t["first"] == 3.5 and t["last"] == 11.75
    assert rows["atp/n_bar"]["last"] == (89.0 + 88.0) / 2

    assert (
        main(["metrics", str(tmp_path), "--keys", "perf/step_s", "loss/ntp", "--from-step", "3", "--window", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert "| perf/step_s | 10 | 8.5 [3, 99] | 3.5 -> 11.75 |" in out
    assert "not logged: loss/ntp" in out
