"""Lossless compression of 8x8 Digits with the trained models: a likelihood kept as a promise.

A model that gives a digit the probability p(x) can store it in about -log2 p(x) bits: an entropy
coder spends -log2 p(s) bits on a symbol s of probability p(s), to within a few bits for the whole
stream. A test NLL of L nats per image is therefore a rate of L / ln 2 bits per image. This script
keeps that promise with a real entropy-coding library (constriction: a range coder, a queue, and an
ANS coder, a stack) and writes real files:

  python compress.py encode DIGITS.npy OUT.FILE --model ARM     # (N, 64) or (N, 8, 8) ints 0..16
  python compress.py decode OUT.FILE DIGITS.npy                 # the same array back, exactly
  python compress.py                                            # the benchmark, results/compress.*

Coders (--model; --conditional --class-code for the class-conditional ARM):
  independent  64 independent per-position categoricals fitted to the training split (add-0.5
               counts), range coded: the baseline a learned model must beat.
  ARM          range coding with the ARM's exact 17-way conditionals p(x_i | x_<i), pixel by pixel
               in raster order; the network runs once a pixel, on every image at once, in the
               encoder and the decoder alike (one position of each PixelCNN per pixel, cached).
               Rate: -log2 p(x) = sum_i -log2 p(x_i | x_<i).
  ARM --conditional --class-code first
               the class y* = argmax_y p(y) p(x | y) coded first under p(y) (the training split's
               class frequencies), then x under p(x | y*): -log2 p(y*) - log2 p(x | y*) bits, which
               exceeds -log2 p(x) by -log2 p(y* | x).
  ARM --conditional --class-code bits-back (default)
               bits-back over the class on the ANS stack: y is *decoded* from the stack with
               p(y | x) = p(y) p(x | y) / sum_y' p(y') p(x | y') (taking bits off), x is pushed under
               p(x | y), then y under p(y). Net: -log p(x | y) - log p(y) + log p(y | x) =
               -log sum_y p(y) p(x | y), the exact marginal. Images go in chunks of CHUNK (the
               network runs batched over a chunk); the first chunk takes its bits from SEED_WORDS
               random words the stack starts with (the overhead, stated in the results).
  MDM          the masked diffusion model's conditionals p(x_i | x revealed so far) in one fixed
               order of unmasking (a permutation drawn once, numpy default_rng(0)): a valid
               autoregressive code; its length averaged over uniformly random orders is the
               order-agnostic bound sum_m (1/m) E[...] the MDM reports as its NLL.
  VAE          BB-ANS (Townsend, Bird & Barber 2019): z is decoded from the stack with q(z | x),
               quantized on a grid of step DELTA (bins of q and of the prior over the same grid),
               x pushed under p(x | z), then z under the prior. The VampPrior (a mixture of
               Gaussians) is coded with its component c as one more latent, bits-back too: c decoded
               with p(c | z), z pushed under p(z | c), c under p(c). Net per image:
               -log p(x | z) - log p(z) + log q(z | x), the negative ELBO (plus the grid's tiny
               error); the first image borrows its bits from SEED_WORDS random words.

Families without a tractable discrete code: the GAN has no likelihood; the EBM and the score model
(ScM) have unnormalised densities only; the continuous flows (RealNVP, FM) and the diffusion bounds
(DDPM, SBGM) give densities of dequantized pixels, which need local bits-back coding (Ho, Lohn &
Abbeel 2019) to become a code: not done here.

File format (little-endian): magic b"DGZ8", format version (u8), coder (u8), model name (u8
length + ASCII), flags (u8: bit 0 conditional, bit 1 8x8 shape), the sha256 of the model's weights
(32 bytes; for `independent`, of its probability table), image count (u32), the input's numpy dtype
(u8 length + ASCII), crc32 of the decoded pixels (u32), the stream's length in bytes (u32), the
stream (32-bit words), and a crc32 of everything before it (u32). A file of another format, one cut
short or damaged, a file coded with other weights than the ones found (--weights), and a decode
whose pixels miss their checksum are refused in one line (exit 2), and nothing is written.

Decoding recomputes every probability the encoder used, so the network runs on the same batches in
the same order, on one CPU thread (a coder sets torch to one thread while it works), and each
probability vector is quantized to the coder's 24-bit integer frequencies deterministically, every
symbol at least 1 (constriction's Categorical with perfect=False). A file decodes on the machine
that wrote it; another CPU's floating point may differ in the last bit, which the pixel checksum
catches.
"""

import argparse
import bz2
import gzip
import hashlib
import io
import lzma
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

import common
from plumbing import UsageError, files, first_line, processes, registry, runs
from plumbing.checkpoints import load_trained

ROOT = registry.ROOT
MAGIC = b"DGZ8"
FORMAT_VERSION = 1
PIXELS, LEVELS, SIDE, CLASSES = 64, 17, 8, 10
CODERS = ("independent", "ARM", "ARM-class-first", "ARM-bits-back", "MDM", "VAE")
MODELS = ("independent", "ARM", "MDM", "VAE")
MAX_IMAGES = 2**32 - 1
CHUNK = 64  # images per chunk of the bits-back ARM: the network runs batched over a chunk
SEED_WORDS = 8  # 32-bit words of fixed random bits the ANS stack starts with (the first bits-back loan)
DELTA = 1 / 512  # the VAE's latent grid step
Z_RANGE = 12.0  # latent grid on [-Z_RANGE, Z_RANGE]
MDM_ORDER_SEED = 0
UNTRACTABLE = ("GAN (no likelihood), EBM and ScM (unnormalised densities), RealNVP, FM, DDPM and SBGM "
               "(densities of dequantized pixels: a code needs local bits-back, not done here)")


# -----------------------------------------------------------------------------
# models and their probabilities


def _torch():
    import torch

    return torch


def weights_sha256(model):
    """sha256 over the model's state_dict (names, dtypes, shapes, bytes in key order)."""
    torch = _torch()
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


def independent_table():
    """(64, 17) float64 per-position probabilities from the training split, add-0.5 counts."""
    train = common.load_splits("cpu")["train"].round().long().numpy()
    counts = np.stack([np.bincount(train[:, i], minlength=LEVELS) for i in range(PIXELS)]) + 0.5
    return counts / counts.sum(1, keepdims=True)


def class_prior():
    """p(y): the training split's class frequencies, float64 (10,)."""
    labels = common.load_label_splits("cpu")["train"].numpy()
    counts = np.bincount(labels, minlength=CLASSES).astype(np.float64)
    return counts / counts.sum()


class Model:
    """What a coder needs: the network (None for `independent`), its sha256, and tables."""

    def __init__(self, coder, weights_dir):
        self.coder = coder
        self.name = coder.split("-")[0]
        self.conditional = coder in ("ARM-class-first", "ARM-bits-back")
        if coder == "independent":
            self.net = None
            self.table = independent_table()
            self.sha = hashlib.sha256(self.table.tobytes()).digest()
            return
        try:
            cls = registry.model_class(self.name)
            self.net = load_trained(cls, out=Path(weights_dir), conditional=self.conditional)
        except UsageError as error:
            raise UsageError(str(error)) from None
        if self.name == "VAE" and (self.net.conditional or self.net.config.stochastic_layers != 1):
            raise UsageError("the VAE coder codes a VAE of p(x) with one stochastic layer")
        self.sha = weights_sha256(self.net)
        if self.conditional:
            self.log_prior = np.log(class_prior())


def softmax64(logits):
    """Logits (..., K) torch -> float64 numpy probabilities (deterministic)."""
    torch = _torch()
    return contiguous(torch.softmax(logits.double(), -1).numpy())


def symbols(array):
    return np.ascontiguousarray(array, dtype=np.int32)


def contiguous(array):
    """constriction reads a numpy array's buffer in C order: a transposed view would be misread."""
    return np.ascontiguousarray(array, dtype=np.float64)


def categorical():
    import constriction

    return constriction.stream.model.Categorical(perfect=False)


def arm_pixels(net, n, y, pixel):
    """Run the ARM's cached sampler over the 64 pixels of n images (classes y or None):
    pixel(i, probs (n, 17)) returns column i (n,) int; -> the (n, 64) pixels."""
    torch = _torch()
    out = np.zeros((n, PIXELS), dtype=np.int32)
    with torch.no_grad():
        caches, previous = net.empty_caches(n, None if y is None else torch.from_numpy(y).long()), None
        for i in range(PIXELS):
            probs = softmax64(net.next_logits(previous, i, caches))
            out[:, i] = pixel(i, probs)
            previous = torch.from_numpy(out[:, i].astype(np.int64))
    return out


def arm_class_log_joint(model, x):
    """log p(y) + log p(x | y) of the conditional ARM, float64 (n, 10)."""
    torch = _torch()
    with torch.no_grad():
        log_pxy = model.net.class_log_likelihoods(torch.from_numpy(x).float()).double().numpy()
    return contiguous(log_pxy + model.log_prior)


def mdm_order():
    return np.random.default_rng(MDM_ORDER_SEED).permutation(PIXELS)


def mdm_pixels(net, n, pixel):
    """The MDM's conditionals in the fixed order: pixel(k, i, probs) returns column i (n,)."""
    torch = _torch()
    mask = sys.modules[type(net).__module__].MASK
    z = torch.full((n, PIXELS), mask, dtype=torch.long)
    with torch.no_grad():
        for k, i in enumerate(mdm_order()):
            probs = softmax64(net.logits(z)[:, i])
            z[:, i] = torch.from_numpy(np.asarray(pixel(k, i, probs)).astype(np.int64))
    return z.numpy().astype(np.int32)


class VAECode:
    """The VAE's pieces on the latent grid: q(z | x), p(x | z), the prior's components."""

    def __init__(self, net):
        import constriction

        torch = _torch()
        self.net = net
        self.k = int(round(Z_RANGE / DELTA))
        self.gauss = constriction.stream.model.QuantizedGaussian(-self.k, self.k)
        with torch.no_grad():
            if net.config.prior == "standard":
                L = net.config.latent
                means, logvars, log_w = torch.zeros(1, L), torch.zeros(1, L), torch.zeros(1)
            else:
                means, logvars, log_w = net.top_prior_params()
        self.means = contiguous(means.double().numpy())
        self.stds = contiguous(np.exp(0.5 * logvars.double().numpy()))
        self.weights = contiguous(np.exp(log_w.double().numpy() - np.logaddexp.reduce(log_w.double().numpy())))

    def posterior(self, x):  # x (64,) int -> grid units (mean, std) of q(z | x), float64 (L,)
        torch = _torch()
        with torch.no_grad():
            mean, logvar = self.net.encoder_top(self.net.encoder_input(torch.from_numpy(x[None]).float()))
        return contiguous(mean[0].double().numpy() / DELTA), contiguous(np.exp(0.5 * logvar[0].double().numpy()) / DELTA)

    def pixel_probs(self, z_sym):  # (L,) grid symbols -> (64, 17) probabilities of p(x | z)
        torch = _torch()
        with torch.no_grad():
            z = torch.from_numpy(z_sym * DELTA).float()[None]
            return softmax64(self.net.decoder_logits(z)[0])

    def component_posterior(self, z_sym):  # p(c | z) on the grid point, float64 (C,)
        z = z_sym * DELTA
        log_n = -0.5 * (((z - self.means) / self.stds) ** 2).sum(1) - np.log(self.stds).sum(1)
        log_p = log_n + np.log(self.weights)
        return contiguous(np.exp(log_p - np.logaddexp.reduce(log_p)))


# -----------------------------------------------------------------------------
# the coders: pixels (N, 64) int32 -> uint32 words, and back


def _ans(seeded):
    import constriction

    words = np.random.default_rng(12345).integers(0, 2**32, SEED_WORDS, dtype=np.uint32) if seeded else None
    return constriction.stream.stack.AnsCoder(words)


def encode_pixels(model, x, stats=None):
    """x (N, 64) int32 on 0..16 -> the coded stream (uint32 words). stats: a dict to fill with
    per-image bit counts of the stack coders."""
    import constriction

    coder, n = model.coder, len(x)
    cat = categorical()
    if coder == "independent":
        enc = constriction.stream.queue.RangeEncoder()
        enc.encode(symbols(x.reshape(-1)), cat, np.tile(model.table, (n, 1)))
        return enc.get_compressed()
    if coder in ("ARM", "ARM-class-first", "MDM"):
        enc = constriction.stream.queue.RangeEncoder()
        y = None
        if coder == "ARM-class-first":
            y = arm_class_log_joint(model, x).argmax(1).astype(np.int32)
            enc.encode(y, cat, np.tile(np.exp(model.log_prior), (n, 1)))

        def pixel(i, probs):
            enc.encode(symbols(x[:, i]), cat, probs)
            return x[:, i]

        if coder == "MDM":
            mdm_pixels(model.net, n, lambda k, i, probs: pixel(i, probs))
        else:
            arm_pixels(model.net, n, y, pixel)
        return enc.get_compressed()
    ans = _ans(seeded=True)
    bits = []
    if coder == "ARM-bits-back":
        prior = np.exp(model.log_prior)
        for start in range(0, n, CHUNK):
            xc = x[start:start + CHUNK]
            joint = arm_class_log_joint(model, xc)
            post = contiguous(np.exp(joint - np.logaddexp.reduce(joint, axis=1, keepdims=True)))
            y = ans.decode(cat, post)  # bits back: y ~ p(y | x)
            columns = []
            arm_pixels(model.net, len(xc), y, lambda i, probs: (columns.append(probs), xc[:, i])[1])
            ans.encode_reverse(symbols(xc.T.reshape(-1)), cat, np.concatenate(columns))
            ans.encode_reverse(y, cat, np.tile(prior, (len(xc), 1)))
            bits.append(ans.num_bits())
    else:  # VAE
        vae = VAECode(model.net)
        for image in x:
            mean, std = vae.posterior(image)
            z = ans.decode(vae.gauss, mean, std)  # bits back: z ~ q(z | x) on the grid
            ans.encode_reverse(symbols(image), cat, vae.pixel_probs(z))
            c = ans.decode(cat, vae.component_posterior(z)[None])  # bits back: c ~ p(c | z)
            ans.encode_reverse(z, vae.gauss, vae.means[c[0]] / DELTA, vae.stds[c[0]] / DELTA)
            ans.encode_reverse(c, cat, vae.weights[None])
            bits.append(ans.num_bits())
    if stats is not None:
        stats.update(seed_bits=32 * SEED_WORDS, bits_after=bits)
    return ans.get_compressed()


def decode_pixels(model, words, n):
    """The coded stream of n images -> (n, 64) int32 pixels."""
    import constriction

    coder = model.coder
    cat = categorical()
    if coder == "independent":
        dec = constriction.stream.queue.RangeDecoder(words)
        return dec.decode(cat, np.tile(model.table, (n, 1))).reshape(n, PIXELS).astype(np.int32)
    if coder in ("ARM", "ARM-class-first", "MDM"):
        dec = constriction.stream.queue.RangeDecoder(words)
        y = None
        if coder == "ARM-class-first":
            y = dec.decode(cat, np.tile(np.exp(model.log_prior), (n, 1))).astype(np.int32)
        if coder == "MDM":
            return mdm_pixels(model.net, n, lambda k, i, probs: dec.decode(cat, probs))
        return arm_pixels(model.net, n, y, lambda i, probs: dec.decode(cat, probs))
    ans = constriction.stream.stack.AnsCoder(words)
    x = np.zeros((n, PIXELS), dtype=np.int32)
    if coder == "ARM-bits-back":
        prior = np.exp(model.log_prior)
        starts = list(range(0, n, CHUNK))
        for start in reversed(starts):
            size = min(CHUNK, n - start)
            y = ans.decode(cat, np.tile(prior, (size, 1)))
            xc = arm_pixels(model.net, size, y, lambda i, probs: ans.decode(cat, probs))
            joint = arm_class_log_joint(model, xc)
            post = contiguous(np.exp(joint - np.logaddexp.reduce(joint, axis=1, keepdims=True)))
            ans.encode_reverse(y, cat, post)  # give the borrowed bits back
            x[start:start + size] = xc
        return x
    vae = VAECode(model.net)
    for index in reversed(range(n)):
        c = ans.decode(cat, vae.weights[None])
        z = ans.decode(vae.gauss, vae.means[c[0]] / DELTA, vae.stds[c[0]] / DELTA)
        ans.encode_reverse(c, cat, vae.component_posterior(z)[None])
        x[index] = ans.decode(cat, vae.pixel_probs(z))
        mean, std = vae.posterior(x[index])
        ans.encode_reverse(z, vae.gauss, mean, std)
    return x


# -----------------------------------------------------------------------------
# the file format


def check_digits(array, what):
    """An (N, 64) or (N, 8, 8) array of integers on 0..16 -> (N, 64) int32; UsageError otherwise."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iuf":
        raise UsageError(f"{what}: expected an array of integers 0..16, got "
                      f"{getattr(array, 'dtype', type(array).__name__)}")
    if not (array.ndim == 2 and array.shape[1] == PIXELS or array.ndim == 3 and array.shape[1:] == (SIDE, SIDE)):
        raise UsageError(f"{what}: expected shape (N, 64) or (N, 8, 8), got {array.shape}")
    if not 1 <= len(array) <= MAX_IMAGES:
        raise UsageError(f"{what}: expected 1 to {MAX_IMAGES} images, got {len(array)}")
    flat = array.reshape(len(array), PIXELS)
    if array.dtype.kind == "f" and not (np.isfinite(flat).all() and (flat == np.round(flat)).all()):
        raise UsageError(f"{what}: pixels must be whole numbers 0..16 (found non-integer values)")
    if flat.min() < 0 or flat.max() > 16:
        raise UsageError(f"{what}: pixels must be on 0..16, found {flat.min()}..{flat.max()}")
    return flat.astype(np.int32)


def pixel_crc(x):
    return zlib.crc32(np.ascontiguousarray(x, dtype=np.uint8).tobytes())


def header_bytes(coder, model_sha, n, eight_by_eight, dtype, crc):
    name = coder.split("-")[0].encode()
    flags = int(coder in ("ARM-class-first", "ARM-bits-back")) | 2 * int(eight_by_eight)
    dtype = np.dtype(dtype).str.encode()
    return (MAGIC + struct.pack("<BB", FORMAT_VERSION, CODERS.index(coder)) + bytes([len(name)]) + name
            + bytes([flags]) + model_sha + struct.pack("<I", n) + bytes([len(dtype)]) + dtype
            + struct.pack("<I", crc))


def pack(coder, model_sha, array, words):
    x = array.reshape(len(array), PIXELS)
    stream = np.asarray(words, dtype="<u4").tobytes()
    body = header_bytes(coder, model_sha, len(array), array.ndim == 3, array.dtype, pixel_crc(x))
    body += struct.pack("<I", len(stream)) + stream
    return body + struct.pack("<I", zlib.crc32(body))


def header_size(coder, dtype="<i8"):
    """Bytes of a file besides the stream (header + trailing checksum)."""
    return len(header_bytes(coder, bytes(32), 1, False, dtype, 0)) + 8


def unpack(data, what):
    """File bytes -> dict(coder, sha, n, eight_by_eight, dtype, crc, words); UsageError if not ours."""
    if len(data) < 4 or data[:4] != MAGIC:
        raise UsageError(f"{what} is not a compress.py file (no {MAGIC.decode()} header)")
    if len(data) < 12:
        raise UsageError(f"{what} is truncated")
    if data[4] != FORMAT_VERSION:
        raise UsageError(f"{what} has format version {data[4]}; this code reads version {FORMAT_VERSION}")
    body, tail = data[:-4], data[-4:]
    if zlib.crc32(body) != struct.unpack("<I", tail)[0]:
        raise UsageError(f"{what} is truncated or damaged (its checksum does not match)")
    try:
        at = 5
        coder = CODERS[body[at]]
        name_len = body[at + 1]
        name = body[at + 2:at + 2 + name_len].decode("ascii")
        at += 2 + name_len
        flags = body[at]
        sha = body[at + 1:at + 33]
        (n,) = struct.unpack("<I", body[at + 33:at + 37])
        dtype_len = body[at + 37]
        dtype = np.dtype(body[at + 38:at + 38 + dtype_len].decode("ascii"))
        at += 38 + dtype_len
        crc, length = struct.unpack("<II", body[at:at + 8])
        stream = body[at + 8:]
    except (IndexError, struct.error, UnicodeDecodeError, TypeError, ValueError):
        raise UsageError(f"{what} has a damaged header") from None
    if (name != coder.split("-")[0] or len(sha) != 32 or len(stream) != length or length % 4 or n < 1
            or dtype.kind not in "iuf"):
        raise UsageError(f"{what} has a damaged header")
    return dict(coder=coder, sha=sha, n=n, eight_by_eight=bool(flags & 2), dtype=dtype, crc=crc,
                words=np.frombuffer(stream, dtype="<u4").astype(np.uint32))


class one_thread:
    """Run torch on one thread while coding (the decoder must repeat the encoder's arithmetic)."""

    def __enter__(self):
        torch = _torch()
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        _torch().set_num_threads(self.threads)


def compress(model, array, stats=None):
    """A checked digits array -> the bytes of a file."""
    x = check_digits(array, "input")
    with one_thread():
        words = encode_pixels(model, x, stats)
    return pack(model.coder, model.sha, array, words)


def decompress(data, weights_dir, what="input", models=None):
    """File bytes -> the digits array (the input's shape and dtype)."""
    info = unpack(data, what)
    model = (models or {}).get(info["coder"]) or Model(info["coder"], weights_dir)
    if model.sha != info["sha"]:
        raise UsageError(f"{what} was coded with other weights of {model.name} (sha256 "
                      f"{info['sha'].hex()[:12]}..., found {model.sha.hex()[:12]}... in {weights_dir})")
    try:
        with one_thread():
            x = decode_pixels(model, info["words"], info["n"])
    except Exception as error:  # noqa: BLE001  the coder ran off a damaged stream
        raise UsageError(f"{what} does not decode ({first_line(error, 'damaged stream')})") from None
    if pixel_crc(x) != info["crc"] or x.min() < 0 or x.max() > 16:
        raise UsageError(f"{what} decoded to pixels that miss their checksum (damaged, or coded on a machine "
                      f"whose floating point differs)")
    return x.reshape((-1, SIDE, SIDE) if info["eight_by_eight"] else (-1, PIXELS)).astype(info["dtype"])


# -----------------------------------------------------------------------------
# the benchmark


def generic_sizes(x):
    """Bytes of the stdlib compressors over the whole set (one byte a pixel) and of PNG."""
    from PIL import Image

    raw = x.astype(np.uint8).tobytes()
    sizes = dict(gzip=len(gzip.compress(raw, 9, mtime=0)), bz2=len(bz2.compress(raw, 9)),
                 lzma=len(lzma.compress(raw, format=lzma.FORMAT_ALONE, preset=9)))  # the smallest container

    def png(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    images = x.astype(np.uint8).reshape(-1, SIDE, SIDE)
    # one (8, 8 N) image, the digits side by side (smaller than a square grid or a column of digits)
    tiled = png(np.ascontiguousarray(images.transpose(1, 0, 2).reshape(SIDE, -1)))
    back = np.asarray(Image.open(io.BytesIO(tiled))).reshape(SIDE, -1, SIDE).transpose(1, 0, 2)
    assert np.array_equal(back.reshape(-1, PIXELS), x)
    sizes["PNG tiled"] = len(tiled)
    sizes["PNG per image"] = sum(len(png(image)) for image in images)
    return sizes


def model_numbers(models, x, weights_dir):
    """Each coder's model number in nats per image (what its rate should reach) and what it is."""
    torch = _torch()
    numbers = {}
    with torch.no_grad(), one_thread():
        xt = torch.from_numpy(x).float()
        numbers["independent"] = (float(-np.log(models["independent"].table[np.arange(PIXELS), x]).sum(1).mean()),
                                  "exact NLL")
        numbers["ARM"] = (float(models["ARM"].net.nll(xt).mean()), "exact NLL")
        joint = arm_class_log_joint(models["ARM-bits-back"], x)
        numbers["ARM-class-first"] = (float(-joint.max(1).mean()), "-log p(y*) p(x | y*)")
        numbers["ARM-bits-back"] = (float(-np.logaddexp.reduce(joint, axis=1).mean()), "exact -log sum_y p(y) p(x | y)")
        try:  # the bound of its metrics, on the whole test split only
            metrics = files.read_json(Path(weights_dir) / "MDM_metrics.json") if len(x) == 447 else {}
        except files.DamagedFile:
            metrics = {}
        mdm = metrics.get("test_nll_nats") if isinstance(metrics, dict) else None
        numbers["MDM"] = (mdm, "bound (order-agnostic, its metrics)")
        torch.manual_seed(0)
        numbers["VAE"] = (float(-models["VAE"].net.log_weights(xt, 100).mean()), "-ELBO (100 draws)")
    return numbers


def run_benchmark(weights_dir, out, limit=None):
    x_all = common.load_splits("cpu")["test"].round().long().numpy().astype(np.int64)
    x_all = x_all[:limit] if limit else x_all
    n = len(x_all)
    torch = _torch()
    models = {coder: Model(coder, weights_dir) for coder in CODERS}
    numbers = model_numbers(models, x_all.astype(np.int32), weights_dir)
    rows = []
    for coder in CODERS:
        stats = {}
        start = time.perf_counter()
        data = compress(models[coder], x_all, stats)
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        back = decompress(data, weights_dir, models=models)
        decode_s = time.perf_counter() - start
        stream_bits = 8 * (len(data) - header_size(coder))
        number, kind = numbers[coder]
        row = dict(coder=coder, model=models[coder].name, conditional=models[coder].conditional,
                   model_nats=number, model_bits=None if number is None else number / math.log(2), model_kind=kind,
                   bits_per_image=stream_bits / n, file_bytes=len(data), header_bytes=header_size(coder),
                   encode_seconds=round(encode_s, 3), decode_seconds=round(decode_s, 3),
                   round_trip=bool(np.array_equal(back, x_all) and back.dtype == x_all.dtype))
        if stats:
            after = stats["bits_after"]
            per = CHUNK if coder == "ARM-bits-back" else 1
            if len(after) > 1:
                row["bits_per_image_after_first"] = (after[-1] - after[0]) / (n - min(per, n))
            row["first_overhead_bits"] = after[0] - (row.get("bits_per_image_after_first") or 0) * min(per, n)
            row["seed_bits"] = stats["seed_bits"]
        rows.append(row)
    for name, size in generic_sizes(x_all).items():
        rows.append(dict(coder=name, model=None, model_nats=None, model_bits=None, model_kind=None,
                         bits_per_image=8 * size / n, file_bytes=size, header_bytes=None,
                         encode_seconds=None, decode_seconds=None, round_trip=None))
    result = dict(images=n, threads=1, machine_cores=os.cpu_count(), torch_version=str(torch.__version__),
                  rows=rows, untractable=UNTRACTABLE, chunk=CHUNK, seed_words=SEED_WORDS, delta=DELTA,
                  constriction_version="0.5.0")
    write_results(result, Path(out))
    return result


def table(result):
    n = result["images"]
    rows = {r["coder"]: r for r in result["rows"]}
    generic = min(rows[k]["bits_per_image"] for k in ("gzip", "bz2", "lzma", "PNG tiled", "PNG per image"))
    lines = [f"Lossless coding of the {n} test digits (`python compress.py`; torch on "
             f"{result['threads']} thread, a {result['machine_cores']}-core machine). Rates are the coded "
             f"stream's bits per image; each file adds a fixed header ({header_size('ARM')} bytes for the ARM, "
             f"{8 * header_size('ARM') / n:.2f} bits an image here). The model's number is what the rate "
             f"should reach (nats / ln 2); \"vs best generic\" compares with the best of gzip, bz2, lzma and PNG.", "",
             "| coder | model's number (bits/image) | actual (bits/image) | bits/dim | actual - model | vs best generic | encode s | decode s | round trip |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        bits, model = r["bits_per_image"], r["model_bits"]
        gap = f"{100 * (bits - model) / model:+.2f}%" if model else ""
        label = r["coder"]
        if r.get("bits_per_image_after_first") is not None:
            label += " (after the first)" if r["coder"] == "VAE" else " (after the first chunk)"
            bits = r["bits_per_image_after_first"]
            gap = f"{100 * (bits - model) / model:+.2f}%" if model else ""
        vs = f"{100 * (bits - generic) / generic:+.1f}%"
        shown = "" if model is None else f"{model:.1f} ({r['model_kind']})".replace("|", "\\|")
        lines.append(f"| {label} | {shown} | {bits:.1f} | "
                     f"{bits / PIXELS:.3f} | {gap} | {vs} | "
                     f"{'' if r['encode_seconds'] is None else r['encode_seconds']} | "
                     f"{'' if r['decode_seconds'] is None else r['decode_seconds']} | "
                     f"{'' if r['round_trip'] is None else ('exact' if r['round_trip'] else 'FAILED')} |")
    lines.append("")
    for r in result["rows"]:
        if r.get("seed_bits") is not None:
            lines.append(f"- {r['coder']}: the stack starts with {r['seed_bits']} seed bits; the whole stream "
                         f"is {r['bits_per_image']:.1f} bits an image; the first "
                         f"{'image costs' if r['coder'] == 'VAE' else f'chunk of {CHUNK} images costs'} "
                         f"{r['first_overhead_bits']:.0f} bits more than {'a later one' if r['coder'] == 'VAE' else 'as many later ones'}.")
    lines.append(f"- Not coded: {result['untractable']}.")
    return "\n".join(lines) + "\n"


def write_results(result, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    files.save_json(out / "compress.json", result)
    files.write_table(out / "compress.md", text)
    rows = result["rows"]
    names = [r["coder"] for r in rows]
    actual = [r.get("bits_per_image_after_first") or r["bits_per_image"] for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(range(len(rows)), actual, color=["C0" if r["model"] else "C7" for r in rows], label="actual rate")
    for i, r in enumerate(rows):
        if r["model_bits"]:
            ax.plot([i - 0.4, i + 0.4], [r["model_bits"]] * 2, color="C3", lw=2,
                    label="model's number" if i == 0 else None)
    top = 1.3 * sorted(actual)[-2]  # PNG per image runs off the chart: its bar is cut, its number shown
    for i in range(len(rows)):
        ax.text(i, min(actual[i], top * 0.93) + 2, f"{actual[i]:.0f}", ha="center", fontsize=8)
    ax.set_ylim(0, top)
    ax.set_xticks(range(len(rows)), names, rotation=35, ha="right")
    ax.set_ylabel("bits per image")
    second = ax.secondary_yaxis("right", functions=(lambda b: b / PIXELS, lambda d: d * PIXELS))
    second.set_ylabel("bits/dim")
    ax.set_title(f"Lossless coding of {result['images']} test digits")
    ax.legend()
    fig.tight_layout()
    files.atomic_write(out / "compress.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


# -----------------------------------------------------------------------------
# command line


def make_parser():
    parser = runs.Parser(prog="compress.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(ROOT / "results"),
                        help="folder of the trained weights (NAME.pt, NAME_conditional.pt); default results/")
    parser.add_argument("--out", default=str(ROOT / "results"),
                        help="benchmark: folder for compress.md, .json, .png (default results/)")
    parser.add_argument("--limit", type=int, default=None,
                        help="benchmark: the first LIMIT test digits only (a quick check)")
    sub = parser.add_subparsers(dest="command")
    encode = sub.add_parser("encode", help="digits .npy -> a compressed file")
    encode.add_argument("input")
    encode.add_argument("output")
    encode.add_argument("--model", choices=MODELS, default="ARM")
    encode.add_argument("--conditional", action="store_true",
                        help="the class-conditional model p(x | y) (ARM only), the class coded too")
    encode.add_argument("--class-code", choices=("bits-back", "first"), default="bits-back",
                        help="with --conditional: bits-back over y (rate -log p(x)), or y* coded first")
    decode = sub.add_parser("decode", help="a compressed file -> the digits .npy")
    decode.add_argument("input")
    decode.add_argument("output")
    for p in (encode, decode):
        p.error = parser.error
    return parser


def load_npy(path):
    """An .npy array of digits, its header checked before it is read (files.read_npy); check_digits
    judges its values."""
    def not_too_many(shape, dtype):
        if shape and shape[0] > MAX_IMAGES:
            return f"holds {shape[0]:,} images; at most {MAX_IMAGES:,}"

    try:
        return files.read_npy(path, not_too_many)
    except files.DamagedFile as error:
        raise UsageError(f"no such file: {path}" if error.problem == "is missing" else
                         f"{path} is not a .npy array of digits ({error.problem})") from None


def run_command(args):
    """encode, decode, or (no command) the benchmark."""
    if args.command == "encode":
        if args.conditional and args.model != "ARM":
            raise UsageError("--conditional codes with the conditional ARM only (--model ARM)")
        coder = args.model if not args.conditional else ("ARM-bits-back" if args.class_code == "bits-back"
                                                          else "ARM-class-first")
        array = load_npy(args.input)
        check_digits(array, args.input)
        data = compress(Model(coder, args.weights), array)
        files.atomic_write(Path(args.output), lambda tmp: tmp.write_bytes(data))
        processes.emit(f"{args.output}: {len(array)} images, {8 * len(data) / len(array):.1f} bits an image ({coder})")
    elif args.command == "decode":
        try:  # a regular file only: a FIFO would be waited on
            with files.open_regular(args.input) as f:
                data = f.read()
        except files.DamagedFile as error:
            raise UsageError(f"can't read {args.input} ({error.problem})") from None
        except OSError as error:
            raise UsageError(f"can't read {args.input} ({error.strerror})") from None
        array = decompress(data, args.weights, args.input)
        files.save_arrays(Path(args.output), array)
        processes.emit(f"{args.output}: {len(array)} images decoded")
    else:
        if args.limit is not None and args.limit < 2:
            raise UsageError("--limit: at least 2 images")
        processes.claim_out(Path(args.out), "compress.py")
        result = run_benchmark(args.weights, args.out, args.limit)
        processes.emit(table(result).rstrip("\n"))


def main(argv=None):
    args = make_parser().parse_args(argv)
    processes.tool("compress.py", lambda: run_command(args), interrupted="nothing was written")


if __name__ == "__main__":
    main()
