"""compress.py: every coder round-trips exactly, rates keep the likelihood's promise, and bad
input (damaged, truncated, foreign weights, wrong shape, another format) is refused in one line
with nothing written."""

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import common
from plumbing import checkpoints, files
import compress

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"


@pytest.fixture(scope="module")
def models():
    return {coder: compress.Model(coder, RESULTS) for coder in compress.CODERS}


@pytest.fixture(scope="module")
def test_digits():
    return common.load_splits("cpu")["test"].round().long().numpy()


def round_trip(models, coder, array):
    data = compress.compress(models[coder], array)
    return data, compress.decompress(data, RESULTS, models=models)


@pytest.mark.parametrize("coder", compress.CODERS)
def test_test_digits_round_trip(models, test_digits, coder):
    x = test_digits[:70]  # two chunks of the bits-back ARM
    _, back = round_trip(models, coder, x)
    assert back.dtype == x.dtype and np.array_equal(back, x)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(coder=st.sampled_from(compress.CODERS), n=st.integers(1, 3), square=st.booleans(),
       dtype=st.sampled_from(["uint8", "int64", "int16", "float32"]), seed=st.integers(0, 2**31 - 1))
def test_random_arrays_round_trip(models, coder, n, square, dtype, seed):
    x = np.random.default_rng(seed).integers(0, 17, (n, 8, 8) if square else (n, 64)).astype(dtype)
    _, back = round_trip(models, coder, x)
    assert back.shape == x.shape and back.dtype == x.dtype and np.array_equal(back, x)


def test_rates_near_the_models_numbers(models, test_digits):
    """On 128 test digits: the ARM's stream within 0.5% of its exact NLL in bits (plus the range
    coder's last word); the bits-back ARM near -log sum_y p(y) p(x | y) after its first chunk; the
    VAE within 3% of a -ELBO estimate after its first image."""
    x = test_digits[:128]
    arm = models["ARM"]
    with torch.no_grad():
        nll_bits = float(arm.net.nll(torch.from_numpy(x).float()).sum()) / math.log(2)
    data = compress.compress(arm, x)
    stream_bits = 8 * (len(data) - compress.header_size("ARM"))
    assert nll_bits <= stream_bits <= 1.005 * nll_bits + 64

    stats = {}
    compress.compress(models["ARM-bits-back"], x, stats)
    joint = compress.arm_class_log_joint(models["ARM-bits-back"], x[compress.CHUNK:].astype(np.int32))
    marginal_bits = -np.logaddexp.reduce(joint, axis=1).sum() / math.log(2)
    later = stats["bits_after"][-1] - stats["bits_after"][0]
    assert abs(later - marginal_bits) <= 0.005 * marginal_bits + 64

    stats = {}
    compress.compress(models["VAE"], x, stats)
    torch.manual_seed(0)
    with torch.no_grad():
        neg_elbo = -models["VAE"].net.log_weights(torch.from_numpy(x[1:]).float(), 20).mean(0).sum() / math.log(2)
    later = stats["bits_after"][-1] - stats["bits_after"][0]
    assert abs(later - float(neg_elbo)) <= 0.03 * float(neg_elbo)


def test_shipped_results_keep_the_promise():
    """results/compress.json (all 447 test digits): every coder exact, the ARM within 0.5% of its
    NLL and at least 30% below the best generic coder, encode + decode within 10 s, the bits-back
    VAE within 3% of its -ELBO after the first image; docs/compress.md carries the table."""
    result = json.loads((RESULTS / "compress.json").read_text())
    rows = {r["coder"]: r for r in result["rows"]}
    assert result["images"] == 447
    assert all(rows[c]["round_trip"] is True for c in compress.CODERS)
    arm = rows["ARM"]
    assert abs(arm["bits_per_image"] - arm["model_bits"]) <= 0.005 * arm["model_bits"]
    generic = min(rows[k]["bits_per_image"] for k in ("gzip", "bz2", "lzma", "PNG tiled", "PNG per image"))
    assert arm["bits_per_image"] <= 0.7 * generic
    assert arm["encode_seconds"] + arm["decode_seconds"] <= 10
    vae = rows["VAE"]
    assert abs(vae["bits_per_image_after_first"] - vae["model_bits"]) <= 0.03 * vae["model_bits"]
    text = (RESULTS / "compress.md").read_text()
    docs = (ROOT / "docs" / "compress.md").read_text()
    begin, end = files.readme_block("compress.md")
    assert docs.split(begin, 1)[1].split(end, 1)[0] == text
    assert text == compress.table(result)


# --- refusals: one line on stderr, exit 2, nothing written


def refused(capsys, argv, output):
    with pytest.raises(SystemExit) as exit_:
        compress.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and err.startswith("compress.py: error:"), err
    assert not Path(output).exists()
    return err


@pytest.fixture()
def coded(tmp_path, test_digits):
    np.save(tmp_path / "d.npy", test_digits[:5])
    compress.main(["encode", str(tmp_path / "d.npy"), str(tmp_path / "d.dgz"), "--model", "ARM"])
    return tmp_path / "d.dgz"


def test_damaged_truncated_and_foreign_files_refused(tmp_path, coded, capsys):
    out = tmp_path / "back.npy"
    data = coded.read_bytes()
    cases = dict(truncated=data[:-9], empty=b"", flipped=bytes([data[0]]) + data[1:70] + bytes([data[70] ^ 4]) + data[71:],
                 other=b"\x93NUMPY" + data[6:])
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        refused(capsys, ["decode", str(tmp_path / name), str(out)], out)
    # a damaged stream whose file checksum was recomputed: the pixel checksum catches it
    body = bytearray(data[:-4])
    body[-3] ^= 0xFF
    (tmp_path / "restamped").write_bytes(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    refused(capsys, ["decode", str(tmp_path / "restamped"), str(out)], out)
    compress.main(["decode", str(coded), str(out)])  # the undamaged file decodes
    assert np.array_equal(np.load(out), np.load(tmp_path / "d.npy"))


def test_foreign_weights_refused(tmp_path, coded, capsys):
    checkpoint = torch.load(RESULTS / "ARM.pt", weights_only=True)
    key = sorted(checkpoint["weights"])[0]
    checkpoint["weights"][key] = checkpoint["weights"][key] + 1e-3
    checkpoint["weights_sha256"] = checkpoints.weights_checksum(checkpoint["weights"])
    other = tmp_path / "other"
    other.mkdir()
    torch.save(checkpoint, other / "ARM.pt")
    out = tmp_path / "back.npy"
    err = refused(capsys, ["--weights", str(other), "decode", str(coded), str(out)], out)
    assert "other weights" in err


@pytest.mark.parametrize("array", [np.zeros((3, 63), np.int64), np.zeros((3, 8, 9), np.uint8),
                                   np.full((2, 64), 17), np.full((2, 64), -1), np.full((2, 64), 0.5),
                                   np.zeros((0, 64), np.int64), np.zeros(64, np.int64),
                                   np.zeros((2, 64), bool)])
def test_bad_digit_arrays_refused(tmp_path, capsys, array):
    np.save(tmp_path / "in.npy", array)
    refused(capsys, ["encode", str(tmp_path / "in.npy"), str(tmp_path / "out.dgz")], tmp_path / "out.dgz")


def test_non_npy_and_bad_flags_refused(tmp_path, capsys):
    (tmp_path / "in.npy").write_text("not an array")
    refused(capsys, ["encode", str(tmp_path / "in.npy"), str(tmp_path / "o")], tmp_path / "o")
    np.save(tmp_path / "ok.npy", np.zeros((2, 64), np.int64))
    refused(capsys, ["encode", str(tmp_path / "ok.npy"), str(tmp_path / "o"), "--model", "VAE", "--conditional"],
            tmp_path / "o")
    refused(capsys, ["encode", str(tmp_path / "ok.npy"), str(tmp_path / "o"), "--model", "GAN"], tmp_path / "o")


def test_header_is_small_and_fixed():
    assert compress.header_size("ARM") == 63  # stated in results/compress.md
    assert compress.header_size("ARM-bits-back") == compress.header_size("ARM")
