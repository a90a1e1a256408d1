"""Files: each output written atomically (a temporary file in the same folder, then a rename),
images, GIFs and curves, the tables copied into README.md and docs/, the lock of a family's
outputs, and the cleaning of what a killed process left behind."""

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import tokenize
from pathlib import Path

import numpy as np
import torch

from plumbing import UsageError, first_line
from common import PIXEL_MAX


def atomic_write(path, write):
    """Call write(tmp_path), then rename over path: a killed run never leaves a truncated file. The
    temporary is created new (never through a link planted at its name), and the rename replaces a
    link at `path` instead of writing through it."""
    path, tmp = Path(path), None
    try:
        tmp = create_new(path.parent, lambda tag: temporary_name(path.name, tag=tag))
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:  # name the file the user knows, not the temporary one (or none)
        raise OSError(error.errno, error.strerror or first_line(error, "the write failed"), str(path)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()  # gone after the rename; unlinks a link itself, never its target


def create_new(folder, name):
    """Create an empty file in `folder` named name(tag) for a fresh random tag, with O_EXCL and
    O_NOFOLLOW: nothing already there (a planted link, another's file) is opened or followed.
    Returns its path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for _ in range(100):
        path = Path(folder) / name(secrets.token_hex(4))
        try:
            os.close(os.open(path, flags, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


TEMP_MARKER = ".tmp-digits-"  # in every temporary name: .TARGET.tmp-digits-PID-TAG.SUFFIX, a name no user writes


def temporary_name(target, pid=None, tag=None):
    """The hidden name atomic_write gives the file that becomes `target` (a file name); `tag`
    (random) makes it unguessable."""
    return f".{target}{TEMP_MARKER}{os.getpid() if pid is None else pid}{f'-{tag}' if tag else ''}{Path(target).suffix}"


SCRATCH = ".run-digits-"  # OUT/.NAME.run-digits-PID-XXXX: a tool's model run in progress (a folder)


def _owner_pid(path):
    """The pid that made `path` when it is a temporary file of atomic_write (.TARGET.tmp-digits-PID-TAG.SUFFIX)
    or a tool's scratch folder (.NAME.run-digits-PID-XXXX) and is what its name says (a plain
    file, a real folder); None for anything else."""
    match = re.fullmatch(r"\.(.+)" + re.escape(TEMP_MARKER) + r"(\d{1,9})(?:-[0-9a-f]{1,16})?(\.[^.]*)?", path.name)
    if match and Path(match.group(1)).suffix == (match.group(3) or ""):
        return int(match.group(2)) if stat.S_ISREG(path.lstat().st_mode) else None
    match = re.fullmatch(rf"\.[A-Za-z0-9_]+{re.escape(SCRATCH)}(\d{{1,9}})-[A-Za-z0-9_]+", path.name)
    if match and stat.S_ISDIR(path.lstat().st_mode):
        return int(match.group(1))
    return None


def remove_stale(folder):
    """Delete what a process killed (SIGKILL) mid-way left in `folder`: atomic_write's temporary
    files and the tools' scratch folders whose process no longer runs. Nothing else is touched:
    not a user's .notes.tmp1.md, not a link or a file with a scratch folder's name."""
    for path in list(Path(folder).glob(f".*{TEMP_MARKER}*")) + list(Path(folder).glob(f".*{SCRATCH}*")):
        try:
            pid = _owner_pid(path)
            if pid is None or pid == os.getpid():
                continue
            os.kill(pid, 0)  # raises if no such process
        except ProcessLookupError:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):  # gone already, or not ours to remove: leave it
                    path.unlink()
        except (OSError, OverflowError):  # another user's process is alive; a bogus pid is not
            pass


def copy_file(source, target):
    """Copy `source` to `target` atomically (never through a link planted at target)."""
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


class DamagedFile(UsageError):
    """An input file that can't be read as what it should be: `problem` says why (after its path)."""

    def __init__(self, path, problem):
        super().__init__(f"{path} {problem}")
        self.path, self.problem = path, problem


MAX_INPUT_BYTES = 2**30  # an input array or JSON file larger than this is refused before it is read


def open_regular(path):
    """A binary file object of the regular file at `path`. Anything else is refused before a byte is
    read (DamagedFile): a folder, and a FIFO or a device, which a read would wait on forever."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, its reads are never reached
    except FileNotFoundError:
        raise DamagedFile(path, "is missing") from None
    except OSError as error:
        raise DamagedFile(path, f"can't be read ({error.strerror or first_line(error)})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise DamagedFile(path, f"is {kind}, not a file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"


def _read_npy_stream(f, path, size, check, max_bytes):
    """The array of an .npy stream `f` of `size` bytes, its header checked (DamagedFile) before any
    data is read: numbers only (no pickled objects), check(shape, dtype) -> a problem or None, at
    most max_bytes, not truncated."""
    magic = f.read(len(NPY_MAGIC))
    if magic != NPY_MAGIC:
        raise DamagedFile(path, "is an .npz archive, not an .npy array" if magic.startswith(b"PK")
                          else "is not an .npy array (no .npy header)")
    f.seek(0)
    try:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise DamagedFile(path, f"is an .npy file of format {version}, which is not read here")
        shape, fortran, dtype = read_header(f)  # the header alone: no data read yet
    # numpy parses the header with ast and tokenize: their errors mean a damaged header too
    except (ValueError, EOFError, SyntaxError, TypeError, tokenize.TokenError) as error:
        raise DamagedFile(path, f"has a damaged .npy header ({first_line(error)})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise DamagedFile(path, f"holds {dtype}, not numbers")
    problem = check(shape, dtype)
    if problem:
        raise DamagedFile(path, problem)
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes > max_bytes:
        raise DamagedFile(path, f"holds {nbytes / 2**30:.1f} GiB; at most {max_bytes / 2**30:.1f} GiB is read")
    data = f.read(nbytes) if size is None or size >= f.tell() + nbytes else b""
    if len(data) < nbytes:
        raise DamagedFile(path, "is truncated")
    return np.frombuffer(bytearray(data), dtype).reshape(shape, order="F" if fortran else "C")


def read_npy(path, check=lambda shape, dtype: None, max_bytes=MAX_INPUT_BYTES):
    """The array of the .npy file at `path`, checked from its header before its data is read (see
    _read_npy_stream); any problem is one line (DamagedFile, a UsageError)."""
    with open_regular(path) as f:
        return _read_npy_stream(f, path, os.fstat(f.fileno()).st_size, check, max_bytes)


def read_npz(path, checks, max_bytes=MAX_INPUT_BYTES):
    """{key: array} of the .npz archive at `path` for each key of `checks` (key -> check(shape, dtype),
    see read_npy), each array's header checked before its data is read; any problem (a missing
    key, an .npy file, a damaged archive) is one line (DamagedFile)."""
    import zipfile

    with open_regular(path) as f:
        magic = f.read(len(ZIP_MAGIC))
        if magic != ZIP_MAGIC:
            raise DamagedFile(path, "is an .npy array, not an .npz archive" if magic.startswith(NPY_MAGIC[:4])
                              else "is unreadable (not an .npz archive)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
                if not set(checks) <= set(members):
                    raise DamagedFile(path, f"holds {sorted(members)}, not {' and '.join(checks)}")
                arrays = {}
                for key, check in checks.items():
                    size = archive.getinfo(members[key]).file_size
                    with archive.open(members[key]) as member:
                        arrays[key] = _read_npy_stream(member, path, size, check, max_bytes)
                return arrays
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, NotImplementedError) as error:
            raise DamagedFile(path, f"is a damaged archive ({first_line(error)})") from None


def read_json(path, max_bytes=10 * 2**20):
    """The JSON value of the file at `path`; too large, not UTF-8, not JSON, or nested too deep for
    the parser is one line (DamagedFile)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise DamagedFile(path, f"is {size} bytes, more than {max_bytes} a JSON file of this project holds")
        try:
            return json.loads(f.read().decode())
        except RecursionError:
            raise DamagedFile(path, "is JSON nested too deep to read") from None
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise DamagedFile(path, f"is unreadable ({first_line(error)})") from None


def finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def save_json(path, data):
    text = json.dumps(finite_or_none(data), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def arrays_checksum(*arrays):
    """sha256 over arrays' dtypes, shapes and bytes: what a run's metrics record of its samples, so
    that samples and metrics of two different runs are never read as one."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}|{array.shape}|".encode() + array.tobytes())
    return digest.hexdigest()


def save_arrays(path, arrays):
    """An array as .npy, or a dict of named arrays as .npz."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays) if isinstance(arrays, dict) else np.save(f, arrays)

    atomic_write(path, write)


def save_image(path, image):
    """image: uint8 array (H, W) or (H, W, 3)."""
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))


def image_grid(samples, nrow=8, scale=4):
    """(N, 64) pixels on 0..16 -> uint8 (H, W) grid, white strokes on black, upscaled `scale` times."""
    from torchvision.utils import make_grid

    images = (samples.detach().float().cpu().clamp(0, PIXEL_MAX) / PIXEL_MAX).view(-1, 1, 8, 8)
    grid = make_grid(images, nrow=nrow, padding=1, pad_value=0.35)[0]  # (H, W) in [0, 1]
    grid = (grid * 255).round().to(torch.uint8).numpy()
    return np.kron(grid, np.ones((scale, scale), dtype=np.uint8))  # nearest-neighbour upscaling


def labelled(image, text):
    """Add a strip with `text` above a uint8 (H, W) image."""
    from PIL import Image, ImageDraw

    strip = 18
    canvas = Image.new("L", (image.shape[1], image.shape[0] + strip), color=255)
    canvas.paste(Image.fromarray(image), (0, strip))
    ImageDraw.Draw(canvas).text((4, 3), text, fill=0)
    return np.asarray(canvas)


def with_row_labels(image, labels):
    """A white margin left of a uint8 (H, W) grid of len(labels) equal rows, each row's label
    written beside its middle (e.g. the class a conditional model was asked for)."""
    from PIL import Image, ImageDraw

    margin, pitch = 16, image.shape[0] / max(len(labels), 1)
    canvas = Image.new("L", (image.shape[1] + margin, image.shape[0]), color=255)
    canvas.paste(Image.fromarray(image), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(labels):
        draw.text((4, int(row * pitch + pitch / 2) - 6), str(label), fill=0)
    return np.asarray(canvas)


def save_gif(path, frames, last_frame_seconds=2.0, frame_seconds=0.2):
    """frames: list of uint8 (H, W), in training order; the last one is held longer."""
    import imageio.v3 as iio

    durations = [frame_seconds * 1000] * (len(frames) - 1) + [last_frame_seconds * 1000]  # ms
    if len(frames) == 1:
        durations = durations[0]  # Pillow wants a number, not a list, for a single frame
    atomic_write(path, lambda tmp: iio.imwrite(tmp, np.stack(frames), extension=".gif",
                                              duration=durations, loop=0))


def save_curve(path, history, best_epoch, name, objective, val_objective=None):
    """history: "train" and "val" per epoch, and any other training terms (dashed). A
    val_objective in other units than `objective` gets an axis of its own on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    epochs = np.arange(1, len(history["train"]) + 1)
    ax.plot(epochs, history["train"], label="train")
    for key, values in history.items():
        if key not in ("train", "val"):
            ax.plot(epochs, values, linestyle="--", linewidth=1, label=f"train: {key}")
    val_ax = ax.twinx() if val_objective else ax
    val = np.array([np.nan if v is None else v for v in history["val"]], dtype=float)
    validated = ~np.isnan(val)  # every epoch, or every --val-every epochs (None between)
    val_ax.plot(epochs[validated], val[validated], color="tab:orange", label="validation",
                marker="." if validated.sum() < len(val) else None, markersize=3)
    if best_epoch:
        val_ax.axvline(best_epoch, color="gray", linestyle="--", linewidth=1,
                       label=f"best epoch {best_epoch} (val {history['val'][best_epoch - 1]:.2f})")
    ax.set_xlabel("epoch")
    ax.set_ylabel(objective)
    if val_objective:  # e.g. a Frechet distance that falls from hundreds to tens: log scale
        val_ax.set_ylabel(f"validation: {val_objective}", fontsize=7)
        val_ax.set_yscale("log")
    ax.set_title(f"{name}: training and validation objective")
    handles = [h for a in {ax, val_ax} for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def readme_block(name):
    """The markers around a page's copy of results/NAME (e.g. "leaderboard.md")."""
    return f"<!-- results/{name}: copied by publish.py -->\n", f"<!-- end results/{name} -->\n"


def pages(root):
    """The pages that hold copies of results tables: README.md and docs/*.md under `root`."""
    return [path for path in [Path(root) / "README.md", *sorted((Path(root) / "docs").glob("*.md"))] if path.is_file()]


def write_table(path, text):
    """Write the markdown table `text` to path, and nothing else: a tool's run never rewrites
    README.md or docs/ (publish_pages, run by hand with publish.py, copies the tables there)."""
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


_BEGIN, _END = (re.escape(marker) for marker in readme_block("NAME"))  # the markers, NAME a placeholder
BLOCK = re.compile("(" + _BEGIN.replace("NAME", r"(\S+)") + ")(.*?)(" + _END.replace("NAME", r"\2") + ")", re.S)


def publish_pages(root, write=True):
    """Replace the copy of every results table between its readme_block markers in README.md and
    docs/*.md under `root` with results/NAME as it is (a block whose file is missing stays); the
    pages that change (with write=False, the pages that would change, none written)."""
    results, changed = Path(root) / "results", []
    for page in pages(root):
        current = page.read_text()

        def copy(match):
            source = results / match.group(2)
            return match.group(0) if not source.is_file() else (
                match.group(1) + source.read_text().rstrip("\n") + "\n" + match.group(4))

        updated = BLOCK.sub(copy, current)
        if updated != current:
            if write:
                atomic_write(page, lambda tmp: tmp.write_text(updated))
            changed.append(page)
    return changed


def keep_table(path, scored):
    """A tool run that scored no family (`scored` empty: every one skipped) must not replace the
    table at `path` with an empty one: UsageError (one line) when one is there."""
    if not scored and Path(path).exists():
        raise UsageError(f"no family could be scored (every one was skipped); {path} and the files written "
                         f"with it are left as they were")


def check_out(out):
    """--out must be a folder this process can write: UsageError (one line) otherwise."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # a new file without a name (or a random one): no link followed
            pass
    except OSError as error:
        raise UsageError(f"--out {out} can't be written ({error.strerror or error})") from None


LOCK_SUFFIX = ".lock-digits"  # OUT/.NAME.lock-digits: held (flock) while a run writes NAME's outputs


@contextlib.contextmanager
def family_lock(out, name):
    """Hold the lock of family `name`'s outputs in `out` for the block: a second run (or tool)
    into the same folder is refused in one line (UsageError) instead of mixing its files with
    this run's. The lock file is removed on the way out; one a SIGKILL left is taken over."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unlocked
        yield
        return
    path = Path(out) / f".{name}{LOCK_SUFFIX}"
    while True:
        try:  # never through a link planted at the lock's name (it would truncate the file it points to)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as error:
            why = "it is a symbolic link; remove it" if error.errno == errno.ELOOP else error.strerror or error
            raise UsageError(f"--out {out}: can't make the lock file {path.name} ({why})") from None
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:  # a FIFO, or a hard link to another file
            os.close(fd)
            raise UsageError(f"--out {out}: the lock file {path.name} is not a plain file of its own "
                             f"(a link, a FIFO or a device); remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise UsageError(f"another run{f' (pid {holder})' if holder.isdigit() else ''} is writing {name}'s "
                             f"outputs in {out}; wait for it to end, or choose another --out") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:  # not a file its last holder removed meanwhile
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        try:
            path.unlink()  # while still holding it: a waiting process then retries on a new file
        except OSError:
            pass
        os.close(fd)
