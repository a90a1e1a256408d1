"""Sample-quality metrics and the classical baselines of the leaderboard."""

import json
import math
import re

import numpy as np
import pytest

import common
import inpaint
import leaderboard
import publish
from conftest import run_main
from plumbing import files, quality, registry, results


@pytest.fixture(scope="module")
def splits():
    pixels, _ = common.load_digits_arrays()
    return common.split_arrays(pixels.astype(np.float64))


def test_frechet_distance_is_zero_to_itself_and_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 8)), rng.normal(1.0, 2.0, size=(400, 8))
    assert quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert quality.frechet_distance(a, b) == pytest.approx(quality.frechet_distance(b, a), rel=1e-6)
    # oracle for Gaussians: ||mu_a - mu_b||^2 + sum (s_a - s_b)^2 for diagonal covariances
    assert quality.frechet_distance(a, b) == pytest.approx(8 * 1.0 + 8 * 1.0, rel=0.15)


def test_real_digits_score_far_better_than_noise_and_copies_are_caught(splits, tmp_path):
    rng = np.random.default_rng(0)
    val = quality.sample_quality(splits["val"], tmp_path)
    noise = quality.sample_quality(rng.integers(0, 17, (1000, 64)), tmp_path)
    train = quality.sample_quality(splits["train"], tmp_path)
    test = quality.sample_quality(splits["test"], tmp_path)
    assert val["frechet_distance"] * 5 < noise["frechet_distance"]
    assert val["classifier_confidence"] > noise["classifier_confidence"]
    assert val["class_coverage"] > 2.2 and val["class_coverage"] <= math.log(10) + 1e-9
    assert train["copy_rate"] == pytest.approx(1.0)
    assert test["copy_rate"] == pytest.approx(0.01, abs=0.01)
    assert noise["copy_rate"] == 0.0
    assert val["classifier_test_accuracy"] > 0.85
    # the shipped classifier, deterministic: the same samples get the same numbers, and nothing
    # is trained or cached in the folder
    assert quality.SHIPPED_CLASSIFIER.is_file() and not (tmp_path / "_digit_classifier.pt").exists()
    assert quality.sample_quality(splits["val"], tmp_path) == val


def test_a_missing_or_damaged_shipped_classifier_is_retrained_into_the_cache(tmp_path, monkeypatch):
    (tmp_path / "ship").mkdir()
    damaged = tmp_path / "ship" / "_digit_classifier.pt"
    damaged.write_bytes(b"not a checkpoint")
    monkeypatch.setattr(quality, "SHIPPED_CLASSIFIER", damaged)
    (tmp_path / "cache").mkdir()
    model, accuracy = quality.digit_classifier(tmp_path / "cache")
    assert (tmp_path / "cache" / "_digit_classifier.pt").is_file() and accuracy > 0.85
    assert damaged.read_bytes() == b"not a checkpoint"  # the shipped file is never written


def test_baselines_are_finite_and_in_the_expected_order(splits):
    indep, kind, samples, *_ = leaderboard.independent_categorical(splits, 100, 0)
    assert kind == "exact" and len(samples) == quality.QUALITY_DRAWS
    assert all(x.shape == (100, 64) and x.max() <= 16 for x in samples)
    gmm, _, mixture_samples, *_, chosen = leaderboard.gaussian_mixture(splits, 100, 0, draws=2)
    kde, *_ = leaderboard.kernel_density(splits, 100, 0, bandwidths=(2.0,), draws=2)
    # each draw its own seed, the first as before (seed 0), the same again for the same seed
    for draws in (samples, mixture_samples):
        assert not any(np.array_equal(draws[0], x) for x in draws[1:])
    assert np.array_equal(leaderboard.independent_categorical(splits, 100, 0)[2][1], samples[1])
    uniform = 64 * math.log(17)
    assert indep == pytest.approx(106.4, abs=0.5)  # measured with numpy, independently of this code
    assert all(math.isfinite(v) for v in (indep, gmm, kde))
    assert indep < gmm < kde < uniform


def test_page_copies_of_results_tables_equal_the_files():
    """README and docs/*.md restate results/*.md only between readme_block markers, each table in
    one page, and each copy is the file."""
    pattern = r"<!-- results/(\S+): copied by publish.py -->\n(.*?)<!-- end results/\1 -->"
    blocks = [block for page in files.pages(registry.ROOT) for block in re.findall(pattern, page.read_text(), re.S)]
    names = [name for name, _ in blocks]
    assert len(names) == len(set(names)), names
    assert set(names) >= {"headline.md", "leaderboard.md", "seeds.md", "ood.md", "benchmark.md", "conditional.md",
                          "inpaint.md", "compress.md"}
    for name, text in blocks:
        assert text == (registry.ROOT / "results" / name).read_text().rstrip("\n") + "\n", name


def test_write_table_touches_no_page_and_publish_copies_every_block(tmp_path, monkeypatch, capsys):
    begin, end = files.readme_block("t.md")
    (tmp_path / "results").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(f"intro\n{begin}old\n{end}outro\n")
    (tmp_path / "docs" / "page.md").write_text(f"x\n{files.readme_block('gone.md')[0]}kept\n{files.readme_block('gone.md')[1]}")
    files.write_table(tmp_path / "results" / "t.md", "| a |\n|---|\n")
    assert (tmp_path / "README.md").read_text() == f"intro\n{begin}old\n{end}outro\n"  # a run writes only its file
    monkeypatch.setattr(registry, "ROOT", tmp_path)
    assert publish.main(["--check"]) == 1 and "README.md differs from results/" in capsys.readouterr().out
    assert (tmp_path / "README.md").read_text() == f"intro\n{begin}old\n{end}outro\n"
    assert publish.main([]) == 0
    assert (tmp_path / "README.md").read_text() == f"intro\n{begin}| a |\n|---|\n{end}outro\n"
    assert "kept" in (tmp_path / "docs" / "page.md").read_text()  # no results/gone.md: the block stays
    assert publish.main(["--check"]) == 0


def test_a_tool_run_into_the_repositorys_results_leaves_readme_and_docs_alone(tmp_path, monkeypatch):
    """A user's run of a tool (inpaint.py here) into the project's results/ writes its files there
    and no page: README.md and docs/ change only by publish.py."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    begin, end = files.readme_block("inpaint.md")
    (root / "README.md").write_text("front\n")
    (root / "docs" / "inpainting.md").write_text(f"page\n{begin}shipped\n{end}")
    before = {p: p.read_text() for p in files.pages(root)}
    monkeypatch.setattr(registry, "ROOT", root)
    monkeypatch.setattr(results, "ROOT", root)
    code = run_main(inpaint.main, ["--models", "Nearest neighbour", "--masks", "bottom", "--no-train", "--pick", "draw",
                                   "--copied", "4", "--no-progress"])
    assert code == 0 and (root / "results" / "inpaint.md").is_file()
    assert {p: p.read_text() for p in files.pages(root)} == before


def test_the_headline_is_sorted_by_the_test_nll_with_the_rows_without_one_after():
    rows = json.loads((registry.ROOT / "results" / "leaderboard.json").read_text())
    table = leaderboard.headline(rows)
    assert "lower is better" in table.splitlines()[0]
    cells = [line.split(" | ")[1] for line in table.splitlines()[2:]]
    numbers = [float(c) for c in cells if c != "-"]
    assert numbers == sorted(numbers) and len(numbers) == sum(r["test_nll_nats"] is not None for r in rows)
    assert all(c == "-" for c in cells[len(numbers):])  # the rows without a likelihood come last
    assert len(cells) == len(rows)


@pytest.mark.parametrize("value, ok", [(0, True), (16, True), (8.5, True), (-0.1, False), (16.01, False),
                                       (float("nan"), False), (float("inf"), False)])
def test_pixels_are_finite_and_on_0_to_16(value, ok, tmp_path):
    x = np.full((3, 64), 5, np.float32)
    x[1, 7] = value
    assert results.are_pixels(x) is ok
    np.save(tmp_path / "s.npy", x)
    np.savez(tmp_path / "s.npz", x=x, y=np.zeros(3, np.int64))
    assert (results.read_samples(tmp_path / "s.npy")[1] is None) is ok
    assert (results.read_labelled_samples(tmp_path / "s.npz")[1] is None) is ok


def drawn_texts(monkeypatch):
    """A list that collects every text PIL draws from now on."""
    from PIL import ImageDraw

    texts, draw = [], ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, text, *a, **k: (
        texts.append(text), draw(self, xy, text, *a, **k))[1])
    return texts


def test_every_leaderboard_panel_carries_its_rows_numbers(tmp_path, monkeypatch):
    rows = [dict(model="ARM", test_nll_nats=80.123, nll_kind="exact", frechet_distance=9.662),
            dict(model="VAE", test_nll_nats=87.0, nll_kind="upper_bound", frechet_distance=11.65),
            dict(model="GAN", test_nll_nats=None, nll_kind=None, frechet_distance=8.26),
            dict(model="Real digits (val split)", test_nll_nats=None, nll_kind=None, frechet_distance=16.08)]
    assert [leaderboard.caption(r) for r in rows] == [
        ["NLL 80.12 nats (exact)", "Frechet 9.66"], ["NLL 87.00 nats (bound)", "Frechet 11.65"],
        ["no likelihood", "Frechet 8.26"], ["real digits, no model", "Frechet 16.08"]]
    texts = drawn_texts(monkeypatch)
    samples = np.random.default_rng(0).integers(0, 17, (64, 64)).astype(np.float32)
    leaderboard.picture([(r["model"], samples, leaderboard.caption(r)) for r in rows], tmp_path / "l.png",
                        note=leaderboard.CAPTION_NOTE)
    assert {r["model"] for r in rows} | {line for r in rows for line in leaderboard.caption(r)} <= set(texts)
    assert any(t.startswith("NLL: test negative log-likelihood") for t in texts)
    from PIL import Image

    with Image.open(tmp_path / "l.png") as image:  # four 8-wide grids of 3x pixels in a row, three lines over them
        assert 900 <= image.width <= 1000 and 280 <= image.height <= 400


def test_every_conditional_grid_has_its_class_rows_and_accuracy(tmp_path, monkeypatch):
    rows = [dict(model="ARM", class_accuracy=0.9634, frechet_mean_over_classes=34.78),
            dict(model="Yours", class_accuracy=1.0, frechet_mean_over_classes=None)]
    assert [leaderboard.conditional_caption(r) for r in rows] == [
        ["class accuracy 0.963", "per-class Frechet 34.78"], ["class accuracy 1.000"]]
    texts = drawn_texts(monkeypatch)
    samples = np.random.default_rng(0).integers(0, 17, (100, 64)).astype(np.float32)
    labels = [str(c) for c in range(10)]
    leaderboard.picture([(r["model"], samples, leaderboard.conditional_caption(r)) for r in rows],
                        tmp_path / "c.png", nrow=10, count=100, row_labels=labels, note=leaderboard.CONDITIONAL_NOTE)
    assert texts.count("7") == 2 and set(labels) <= set(texts)  # every class at the left of both grids
    assert {"class accuracy 0.963", "per-class Frechet 34.78", "class accuracy 1.000"} <= set(texts)
    from PIL import Image

    with Image.open(tmp_path / "c.png") as image:
        assert 550 <= image.width <= 650 and 300 <= image.height <= 420


def _with_spread(row, key, mean, spread, draws=5):
    return dict(row, **{key: mean, f"{key}_seed_std": spread}, quality_draws=draws)


def test_the_tables_show_means_and_spreads_and_the_verdict_uses_them():
    rows = json.loads((registry.ROOT / "results" / "leaderboard.json").read_text())
    by_name = {r["model"]: r for r in rows}
    gmm = _with_spread(by_name["GaussianMixture"], "frechet_distance", 12.0, 1.0)
    arm = _with_spread(by_name["ARM"], "frechet_distance", 10.0, 1.0)
    # gap 2 against twice the standard error of the difference, 2 sqrt((1 + 1) / 5) = 1.26: better
    assert leaderboard.verdict(arm, gmm)["Frechet (MLP)"] == "better"
    # a spread of 4 across seeds: 2 sqrt((16 + 1) / 5) = 3.69 covers the gap
    assert leaderboard.verdict(dict(arm, frechet_distance_seed_std=4.0), gmm)["Frechet (MLP)"] == "within noise"
    assert leaderboard.verdict(dict(arm, frechet_distance=15.0), gmm)["Frechet (MLP)"] == "worse"
    # without a spread over seeds (one draw, an earlier run): the bootstrap s.d. of the one draw
    one_draw = {k: v for k, v in arm.items() if not k.endswith("_seed_std") and k != "quality_draws"}
    assert leaderboard.measures(dict(one_draw, frechet_distance_std=0.7))["Frechet (MLP)"][1] == 0.7
    assert leaderboard.measures(arm)["Frechet (MLP)"][1] == pytest.approx(1.0 / math.sqrt(5))
    rows = [gmm if r["model"] == "GaussianMixture" else arm if r["model"] == "ARM" else r for r in rows]
    table = leaderboard.markdown(rows, 0.919)
    bpd = arm["test_nll_nats"] / (64 * math.log(2))  # the ARM's exact NLL of the shipped run, in bits per pixel
    assert f"| ARM | {arm['test_nll_nats']:.2f} | {bpd:.3f} | exact | 10.00 +- 1.00 |" in table
    assert re.search(r"^\| ARM \| 10.00 \+- 1.00 \| [\d.]+ (\+- [\d.]+ )?\|", table, re.M)
    assert "- ARM: better on " in table and "Frechet (MLP)" in table.split("- ARM: better on ")[1].splitlines()[0]
