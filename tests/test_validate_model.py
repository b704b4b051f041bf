"""tool/validate_model.py's summary (medians over rounds) and its section in docs/paper_scale.md
(tool/paper_scale_page.py)."""
import json
import math
import statistics

import pytest

import paper_scale_page
import validate_model


def row(round_, method, predicted, measured, equal=True, run="bench"):
    return {"round": round_, "run": run, "method": method, "predicted": predicted,
            "predicted_alone": predicted * 1.2, "measured": measured,
            "starved": 0.01 * round_, "memory_equal": equal}


def test_summary_compares_the_medians_over_rounds():
    rows = [row(0, "wpipe", 50, 40), row(0, "gpipe", 30, 30),
            row(1, "gpipe", 31, 20), row(1, "wpipe", 48, 44),
            row(2, "wpipe", 60, 41, equal=False), row(2, "gpipe", 29, 31)]
    wpipe, gpipe = validate_model.summarize(rows)
    assert (wpipe["method"], wpipe["rounds"], wpipe["predicted"], wpipe["measured"]) == ("wpipe", 3, 50, 41)
    assert wpipe["error"] == 50 / 41 - 1
    assert (wpipe["predicted_alone"], wpipe["error_alone"]) == (60, 60 / 41 - 1)
    assert (wpipe["measured_min"], wpipe["measured_max"], wpipe["starved"]) == (40, 44, 0.02)
    assert not wpipe["memory_equal"] and gpipe["memory_equal"]
    assert (gpipe["predicted"], gpipe["measured"]) == (30, 30)


def test_section_says_which_medians_are_within_ten_percent():
    rows = [row(r, m, p, q) for r in range(3) for m, p, q in (("wpipe", 50, 40), ("gpipe", 30, 29))]
    lines = paper_scale_page.validation_lines({"rounds": 3, "summary": validate_model.summarize(rows),
                                          "report": ["load average ..."]})
    text = "\n".join(lines)
    assert "| bench | wpipe | 50.00 | 40.00 | +25.0% | 60.00 (+50.0%) | 40.00-40.00 | equal in 3 runs |" in text
    assert "Within 10%: bench gpipe." in text and "Beyond: bench wpipe (+25%)." in text
    assert "exact in every run" in text


@pytest.mark.distributed
def test_message_cost_is_measured_by_two_processes(tmp_path):
    cost = validate_model.measure_message_cost(tmp_path, rounds=1)
    per_rank = json.loads((tmp_path / "message_cost.json").read_text())
    assert len(per_rank) == 2 and all(math.isfinite(x) for x in per_rank)
    assert cost == statistics.median(per_rank)
