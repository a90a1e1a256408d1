"""benchmark.py: the FLOP count against hand-counted products, the timed step, and the tables."""

import json

import pytest
import torch
from torch import nn

import benchmark
import common
import leaderboard
from plumbing import checkpoints, quality, registry


def test_matmul_flops_count_linear_layers_forward_and_backward():
    """A (B, n) @ (n, m) product costs 2 B n m; backward computes the weight's gradient (2 B n m)
    and, when the input needs one, the input's (2 B n m) too."""
    torch.manual_seed(0)
    layer = nn.Linear(32, 16)
    x = torch.randn(8, 32)
    with benchmark.MatmulFlops() as counter:
        layer(x).sum().backward()
    assert counter.flops == 2 * (2 * 8 * 32 * 16)
    with benchmark.MatmulFlops() as counter:
        layer(x.requires_grad_()).sum().backward()
    assert counter.flops == 3 * (2 * 8 * 32 * 16)
    with benchmark.MatmulFlops() as counter:  # autograd.grad inside (the EBM's Langevin steps) is fine
        torch.autograd.grad(layer(x).sum(), x)
    assert counter.flops == 2 * (2 * 8 * 32 * 16)


def test_step_speed_of_a_family_counts_its_flops_and_time():
    """DDPM's step evaluates its MLP forward and backward once: at least 4 B (in x out) per Linear
    layer (forward and weight gradient), at most 6 B (in x out) plus the rest of the step."""
    import ddpm

    torch.manual_seed(0)
    model = ddpm.DDPM.build()
    train = common.load_splits(torch.device("cpu"), quick=True)["train"]
    labels = common.load_label_splits(torch.device("cpu"), quick=True)["train"]
    flops, seconds = benchmark.step_speed(model, model.configure_optimizer(1e-3), train, labels, 64,
                                          torch.device("cpu"), min_seconds=0.0)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert 4 * 64 * linear <= flops <= 6 * 64 * linear
    assert 0 < seconds < 10


def test_machine_throughput_is_positive_and_plausible():
    peak = benchmark.matmul_flops_per_second(torch.device("cpu"), n=256, min_seconds=0.05)
    assert 1e8 < peak < 1e14


def test_seed_table_gives_mean_and_spread_of_each_family(tmp_path, monkeypatch):
    """Seed 0 from OUT, seed 1 from OUT/seeds/seed1; made-up metrics marked current."""
    monkeypatch.setattr(leaderboard, "SCRIPTS", {"ARM": "autoregressive_model.py"})
    fingerprint = checkpoints.fingerprints(registry.ROOT / "autoregressive_model.py", registry.ROOT)
    for seed, folder, nll, fd in ((0, tmp_path, 80.0, 20.0), (1, tmp_path / "seeds" / "seed1", 82.0, 24.0)):
        folder.mkdir(parents=True, exist_ok=True)
        argv = ["--no-progress"] + (["--seed", str(seed)] if seed else [])
        (folder / "ARM_metrics.json").write_text(json.dumps(dict(
            model="ARM", test_nll_nats=nll, nll_kind="exact", frechet_distance=fd, train_seconds=10.0,
            epochs_run=5, **fingerprint, quick=False, interrupted=False, stopped="early_stopping",
            changed_settings=dict(seed=seed) if seed else {}, argv=argv)))
    leaderboard.main(["--out", str(tmp_path), "--no-train", "--seeds", "0", "1"])
    row = json.loads((tmp_path / "seeds.json").read_text())["rows"][0]
    assert row["test_nll_nats_mean"] == pytest.approx(81.0)
    assert row["test_nll_nats_std"] == pytest.approx(2**0.5)
    assert row["frechet_distance_mean"] == pytest.approx(22.0)
    assert row["frechet_distance_std"] == pytest.approx(8**0.5)
    table = (tmp_path / "seeds.md").read_text()
    assert "| ARM | exact | 80.00, 82.00 | 81.00 +- 1.41 | 20.00, 24.00 | 22.00 +- 2.83 | 10, 10 |" in table
    assert quality.mean_std([1.0, None]) == (None, None)


def test_speed_table_reads_the_run_and_times_the_step_on_each_thread_count(tmp_path, monkeypatch):
    """One family (DDPM) with made-up run metrics: the run's columns come from its metrics, the
    step is timed on 1 and 2 threads, and the fraction of the (stubbed) matmul peak follows."""
    monkeypatch.setattr(benchmark, "SCRIPTS", {"DDPM": "ddpm.py"})
    monkeypatch.setattr(benchmark, "matmul_flops_per_second", lambda device: 1e12)
    fast = benchmark.step_speed
    monkeypatch.setattr(benchmark, "step_speed", lambda *a, **k: fast(*a, **k, min_seconds=0.0))
    monkeypatch.setattr(benchmark, "extra_draw_scoring_seconds", lambda *a: (0.25, 0.1))
    (tmp_path / "DDPM_metrics.json").write_text(json.dumps(dict(
        model="DDPM", train_flags=dict(lr=1e-3, batch_size=64), threads=2, epochs_run=10, train_seconds=20.0,
        train_seconds_to_best=15.0, sample_seconds=0.5, num_samples=1000, peak_memory_mb=900.0, argv=[],
        quality_draws_seconds=2.0, run_seconds=30.0)))
    benchmark.main(["--out", str(tmp_path)])
    data = json.loads((tmp_path / "benchmark.json").read_text())
    row = data["rows"][0]
    assert data["thread_counts"] == [1, 2] and set(row["steps"]) == {"1", "2"}
    assert row["seconds_per_epoch"] == 2.0 and row["seconds_per_1000_samples"] == 0.5 and not row["current"]
    for step in row["steps"].values():
        assert step["step_ms"] > 0
        assert step["matmul_fraction"] == pytest.approx(step["achieved_gflops"] * 1e9 / 1e12)
    table = (tmp_path / "benchmark.md").read_text()
    assert "| DDPM (stale) | 2 | 2.00 | 10 | 15.0 | 20.0 | 0.50 | 900 |" in table
    assert "| DDPM | 30.0 | 2.00 | 1.00 | 10.0% |" in table  # (2.0 + 4 x 0.25) / 30
    assert data["extra_draw_scoring_seconds"] == dict(unconditional=0.25, conditional=0.1)


def test_the_cost_of_the_averaged_measures_is_a_share_of_the_run_or_marked_of_its_training(tmp_path, monkeypatch):
    """(extra draws + (draws - 1) x one draw's scoring) / run_seconds; a run without run_seconds
    falls back to its training seconds, marked *; a run without the metrics has no row."""
    monkeypatch.setattr(benchmark, "SCRIPTS", {"DDPM": "ddpm.py", "FM": "flow_matching.py"})
    (tmp_path / "DDPM_metrics.json").write_text(json.dumps(dict(train_seconds=40.0, quality_draws_seconds=3.0,
                                                                run_seconds=50.0)))
    (tmp_path / "DDPM_conditional_metrics.json").write_text(json.dumps(dict(train_seconds=40.0,
                                                                            quality_draws_seconds=2.0)))
    lines = benchmark.measures_cost_lines(tmp_path, (0.5, 0.25))
    extra = benchmark.quality.QUALITY_DRAWS - 1
    rows = [line for line in lines if line.startswith("| DDPM") or line.startswith("| FM")]
    assert rows == [f"| DDPM | 50.0 | 3.00 | {extra * 0.5:.2f} | {100 * (3.0 + extra * 0.5) / 50:.1f}% |",
                    f"| DDPM_conditional | - | 2.00 | {extra * 0.25:.2f} | {100 * (2.0 + extra * 0.25) / 40:.1f}% * |"]


def test_before_and_after_judges_the_nll_by_its_tolerance_and_the_frechet_distance_by_its_spread():
    def row(model, seconds, nll, frechet, spread):
        return dict(model=model, train_seconds=seconds, test_nll_nats=nll, frechet_distance=frechet,
                    frechet_distance_seed_std=spread)
    before = dict(note="earlier", matmul_flops_per_second={"2": 1.5e11}, rows=[
        row("A", 100.0, 80.0, 10.0, 1.0), row("B", 50.0, 90.0, 10.0, 1.0), row("C", 60.0, None, 10.0, 1.0),
        row("D", 40.0, 70.0, 10.0, 2.0)])
    after = [row("A", 50.0, 80.0 + benchmark.NLL_TOLERANCE + 0.01, 10.5, 1.0),  # NLL just past the tolerance
             row("B", 25.0, 90.2, 11.9, 1.5),  # Frechet up 1.9, beyond the larger spread 1.5
             row("C", 30.0, None, 12.5, 2.0),  # up 2.5, beyond both spreads (1.0, 2.0)
             row("D", 80.0, 69.0, 11.9, 1.0)]  # within the before spread 2.0
    lines = benchmark.comparison_lines(after, before)
    verdict = {line.split(" | ")[0][2:]: line.rsplit(" | ", 2)[-1].rstrip(" |") for line in lines if line.startswith("| ")
               and not line.startswith("| model")}
    assert verdict == {"A": "worse: NLL", "B": "worse: Frechet", "C": "worse: Frechet", "D": "not worse"}
    assert "| A | 100.0 | 50.0 | 2.00x | 80.00 |" in "\n".join(lines)
    assert lines[-1] == "Training seconds of these default runs in all: 250 before, 185 after."
    assert "150 GFLOP/s on 2 thread(s)" in lines[0]


def test_sampler_table_draws_the_runs_own_seeds_and_pairs_each_other_sampler_with_the_default(tmp_path, monkeypatch):
    """A tiny SBGM run: its default sampler's draws here give the run's own mean Frechet distance,
    each other sampler has QUALITY_DRAWS draws, and the paired difference is taken draw by draw."""
    import score_based_generative_model as sbgm_script
    from conftest import run_main

    assert run_main(sbgm_script.main, ["--quick", "--no-progress", "--out", str(tmp_path), "--hidden", "16",
                                       "--blocks", "1", "--epochs", "2"]) == 0
    monkeypatch.setattr(benchmark, "SCRIPTS", {"SBGM": "score_based_generative_model.py"})
    benchmark.main(["--out", str(tmp_path), "--samplers", "--threads", "1"])
    family = json.loads((tmp_path / "samplers.json").read_text())["families"][0]
    metrics = json.loads((tmp_path / "SBGM_metrics.json").read_text())
    default, *others = family["rows"]
    assert family["model"] == "SBGM" and family["matches_run"] and not family["current"]  # --quick: not a default run
    assert default["frechet_distance"] == metrics["frechet_distance"]
    assert default["frechet_distance_seed_std"] == metrics["frechet_distance_seed_std"]
    assert [r["sampler"] for r in others] == ["dpm_16", "heun_20"]  # dpm_4 is --quick's default
    for row in others:
        assert len(row["frechet_by_draw"]) == quality.QUALITY_DRAWS and row["seconds_per_1000"] > 0
        differences = [a - b for a, b in zip(row["frechet_by_draw"], default["frechet_by_draw"])]
        assert row["difference"] == pytest.approx(sum(differences) / len(differences))
        assert row["frechet_distance"] == pytest.approx(sum(row["frechet_by_draw"]) / quality.QUALITY_DRAWS)
    table = (tmp_path / "samplers.md").read_text()
    assert f"| SBGM (stale) | heun_20 | {others[1]['seconds_per_1000']:.2f} | {leaderboard.seed_pm(others[1], 'frechet_distance')} " in table
    assert "give each run's own Frechet distance" in table


def test_sampler_table_needs_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "SCRIPTS", {"SBGM": "score_based_generative_model.py"})
    with pytest.raises(SystemExit) as stopped:
        benchmark.main(["--out", str(tmp_path), "--samplers"])
    assert stopped.value.code == 2 and "no usable default runs of SBGM" in capsys.readouterr().err
    assert not (tmp_path / "samplers.md").exists()
