"""tool/accuracy.py: the delayed heavy-ball bound, and the study's tables from run folders."""
import json
import math

import pytest

from tool.accuracy import aggregate, load_study, max_stable_step, report, spectral_radius, stable_lrs


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_bound_matches_the_closed_forms(beta):
    # No delay: the heavy ball converges for lr x lambda < 2 (1 + beta); one update stale:
    # the roots of z^2 - (1 + beta) z + beta + s have modulus sqrt(beta + s) < 1 iff s < 1 - beta.
    assert max_stable_step(beta, 0) == pytest.approx(2 * (1 + beta), abs=1e-6)
    assert max_stable_step(beta, 1) == pytest.approx(1 - beta, abs=1e-6)


def test_two_updates_stale_without_momentum_is_the_golden_ratio():
    assert max_stable_step(0.0, 2) == pytest.approx((math.sqrt(5) - 1) / 2, abs=1e-6)


def test_spectral_radius_is_the_iteration_growth():
    """The root modulus equals how fast the simulated iteration grows or decays."""
    for step, beta, delay in [(0.05, 0.9, 1), (0.2, 0.9, 1), (1.5, 0.0, 0), (0.9, 0.0, 1)]:
        xs = [1.0] * (delay + 2)
        for _ in range(400):
            xs.append((1 + beta) * xs[-1] - beta * xs[-2] - step * xs[-1 - delay])
        early, late = max(map(abs, xs[200:240])), max(map(abs, xs[-40:]))
        rate = (late / early) ** (1 / (len(xs) - 240))
        assert rate == pytest.approx(spectral_radius(step, beta, delay), rel=0.05)


def _write_run(root, suite, lr, method, seed, top1, losses=(1.0, 0.5), diverged=False):
    folder = root / suite / f"lr{lr}" / f"{method}_seed{seed}"
    folder.mkdir(parents=True)
    if diverged:
        (folder / "diverged").write_text("stopped on a non-finite loss\n")
        return
    history = [{"epoch": 1, "eval": {"test_top1": top1 / 2}}, {"epoch": 2, "eval": {"test_top1": top1}}]
    (folder / "summary.json").write_text(json.dumps({"method": method, "eval": {"test_top1": top1},
                                                     "history": history, "losses": list(losses)}))


@pytest.fixture
def study(tmp_path):
    root = tmp_path / "study"
    for seed, delta in ((1, 0.0), (2, 0.02)):
        _write_run(root, "digits", "0.01", "wpipe", seed, 0.95 + delta)
        _write_run(root, "digits", "0.01", "pipedream_2bw", seed, 0.94 + delta)
        _write_run(root, "digits", "0.01", "data_parallel", seed, 0.96 + delta)
        _write_run(root, "digits", "0.1", "wpipe", seed, 0.93 + delta)
        _write_run(root, "digits", "0.1", "data_parallel", seed, 0.97 + delta)
    _write_run(root, "digits", "0.01", "gpipe", 1, 0.96)
    _write_run(root, "digits", "0.1", "gpipe", 1, 0.85)                # finite, but below 0.9 x the best
    _write_run(root, "digits", "0.1", "pipedream_2bw", 1, 0.3)
    _write_run(root, "digits", "0.1", "pipedream_2bw", 2, 0.0, diverged=True)
    (root / "digits" / "lr0.1" / "pipedream_flush_seed1").mkdir()   # unfinished: ignored
    return root


def test_aggregate_and_stable_ranges(study):
    runs = load_study(study)
    assert len(runs) == 14
    cells = aggregate(runs, "test_top1")
    assert cells[("0.1", "pipedream_2bw")]["mean"] == pytest.approx(0.15)
    assert cells[("0.1", "pipedream_2bw")]["stopped"] == 1
    assert cells[("0.01", "wpipe")]["std"] == pytest.approx(math.sqrt(2) * 0.01)
    # Best mean 0.98 (data_parallel at 0.1); stable: every seed >= 0.9 x 0.98 = 0.882.
    assert stable_lrs(runs, "test_top1") == {"wpipe": ["0.01", "0.1"], "pipedream_2bw": ["0.01"],
                                             "gpipe": ["0.01"], "data_parallel": ["0.01", "0.1"]}


def test_report_writes_tables_and_curves(study, tmp_path):
    doc = tmp_path / "docs" / "accuracy.md"
    text = report(study, doc)
    assert doc.read_text() == text
    assert (tmp_path / "docs" / "accuracy_digits.png").stat().st_size > 10_000
    assert "| 0.1 | 0.940 ± 0.014 | 0.150 ± 0.212 † | 0.850 ± 0.000 | 0.980 ± 0.014 |" in text
    assert "- pipedream_2bw: 0.01" in text
    assert "| 0.9 | 3.800 | 0.100 | 38x |" in text


def test_an_empty_study_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no finished runs below"):
        report(tmp_path, tmp_path / "accuracy.md")
