"""The main job, `python -m mtlfast demo`, on a tiny synthetic problem: both implementations train from the same
weights on the same batches, so their test metrics agree; the report and the plot are written."""

from __future__ import annotations

import pytest

from mtlfast import cli, demo


def _args(tmp_path, *extra: str) -> list[str]:
    return ["--epochs", "1", "--tasks", "3", "--num-train", "400", "--batch-size", "100", "--hidden", "16",
            "--no-progress", "--device", "cpu", "--plot", str(tmp_path / "demo.png"), *extra]


def test_demo_trains_both_implementations_to_the_same_metrics(tmp_path):
    args = demo.parse_args(_args(tmp_path, "--seeds", "2"))
    runs = demo.run_demo(args)
    assert {(r.model, r.implementation, r.seed) for r in runs} == {
        (m, i, s) for m in ("hard", "mmoe") for i in ("mtlfast", "plain") for s in (0, 1)}
    for model in ("hard", "mmoe"):
        for seed in (0, 1):
            ours, plain = (next(r for r in runs if (r.model, r.implementation, r.seed) == (model, impl, seed))
                           for impl in ("mtlfast", "plain"))
            assert set(ours.test_metrics) == {"task0", "task1", "task2"}
            for task, values in ours.test_metrics.items():
                for name, value in values.items():
                    assert value == pytest.approx(plain.test_metrics[task][name], rel=1e-3, abs=1e-4), (model, task, name)
            assert ours.step_ms > 0 and plain.step_ms > 0
    text = demo.report(runs, args)
    assert "### hard" in text and "### mmoe" in text and "± " in text


def test_demo_command_line_writes_report_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the demo's plot needs matplotlib (an optional dependency)")
    assert cli.main(["demo", *_args(tmp_path, "--models", "hard", "--weighting", "dwa")]) == 0
    out = capsys.readouterr().out
    assert "weighting dwa" in out and "speedup" in out
    assert (tmp_path / "demo.png").stat().st_size > 0


def test_demo_rejects_unknown_model(tmp_path):
    with pytest.raises(SystemExit):
        demo.parse_args(_args(tmp_path, "--models", "transformer"))
