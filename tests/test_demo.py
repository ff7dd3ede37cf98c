"""`nanoseek demo --quick`: every stage runs at toy size and the report card stands on its own."""

import os

from nanoseek.demo import DemoConfig, run


def test_quick_demo_writes_a_complete_report(tmp_path):
    out = str(tmp_path / "demo")
    report = run(DemoConfig.quick(out=out))
    text = open(os.path.join(out, "report.md")).read()
    assert set(report["models"]) >= {"base", "R1-Zero"}
    for name in report["models"]:  # one table row per evaluated model
        assert f"| {name} |" in text
    for stage in ("data", "pretrain", "eval base", "R1-Zero (GRPO)", "transformers", "report"):
        assert stage in report["seconds"]
    assert report["transformers"]["max_abs_logit_diff"] < 1e-4
    for rel in report["plots"].values():  # every plot the report shows exists beside it
        assert f"]({rel})" in text and os.path.getsize(os.path.join(out, rel)) > 0
    assert {"loss", "expert_load", "reward", "response_length", "pass@1"} <= set(report["plots"])
