"""Checkpoints, safe loading and the fingerprints that date a result.

Two files per run, both plain dicts of tensors and containers, loaded with weights_only=True:
  OUT/NAME.pt         the best weights, their checksum, the config that rebuilds the model and
                      the run's summary: small, committed, enough for --sample-only;
  OUT/NAME_resume.pt  the whole TrainState, current weights, optimizer and EMA for --resume:
                      kept out of git.
"""

import ast
import dataclasses
import hashlib
import io
import pickle
import sys
from pathlib import Path

import torch

from plumbing import UsageError, first_line
from common import TrainState, cpu_state
from plumbing.files import DamagedFile, atomic_write, read_json


CHECKPOINT_FORMAT = 2  # bump when the layout below changes; older files are refused in one line


def train_state_from(data, path):
    """A TrainState from its to_dict() (or, from a weights file, of its summary); a missing key or a
    value of the wrong type is a one-line UsageError."""
    missing = [f.name for f in dataclasses.fields(TrainState) if f.name not in data and f.name in TrainState.SUMMARY]
    if missing:
        raise UsageError(f"{path} has an older or foreign layout (missing {', '.join(missing)})")
    state = TrainState(**{f.name: data[f.name] for f in dataclasses.fields(TrainState) if f.name in data})
    expected = dict(epoch=int, best_epoch=int, best_val=(int, float), history=dict, train_seconds=(int, float),
                    train_cpu_seconds=(int, float), epoch_seconds=list, best_weights=dict, frames=list,
                    frame_epochs=list)
    for key, kind in expected.items():
        value = getattr(state, key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(f"{path} is damaged: {key} is a {type(value).__name__}")
    if not all(isinstance(v, list) for v in state.history.values()) or "train" not in state.history:
        raise UsageError(f"{path} is damaged: history is not a dict of lists with a train series")
    return state


def weights_checksum(weights):
    """sha256 over a state_dict's names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        tensor = weights[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path, checkpoint):
    """torch.save through memory: torch's own file writer reports a full disk as a RuntimeError,
    a plain write as the OSError that run() turns into one line."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def save_weights(path, name, config, state, stopped=None):
    """OUT/NAME.pt: the best weights with their checksum, config and the run's summary; stopped:
    why training ended ("interrupted" marks weights that are not a finished run)."""
    save_checkpoint(path, dict(
        format=CHECKPOINT_FORMAT, kind="weights", model_name=name, config=config, stopped=stopped,
        weights=state.best_weights, weights_sha256=weights_checksum(state.best_weights),
        torch_version=str(torch.__version__), **{key: getattr(state, key) for key in TrainState.SUMMARY}))


def save_resume(path, name, config, train_flags, state, model, optimizer, ema):
    """OUT/NAME_resume.pt: all that --resume needs to continue as if never stopped."""
    save_checkpoint(path, dict(
        format=CHECKPOINT_FORMAT, kind="resume", model_name=name, config=config, train_flags=train_flags,
        state=state.to_dict(), model=cpu_state(model), optimizer=optimizer.state_dict(),
        ema=ema.shadow if ema else None, torch_version=str(torch.__version__)))


def load_checkpoint(path, name, config, kind, missing_hint, conditional=None):
    """Load and check a weights or resume file of model `name` made with `config` (None: any), of
    a model of p(x | y) or of p(x) as `conditional` says (None: as config says, or either);
    every problem is a one-line UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no {'weights' if kind == 'weights' else 'training checkpoint'} at {path}; {missing_hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error).upper().replace("GLOBALS", ""):  # it names a class or function to import
            raise UsageError(f"refused to load {path}: it holds pickled objects or code that "
                             f"weights-only loading does not allow, so it is not a checkpoint of "
                             f"this project") from None
        raise UsageError(f"{path} is truncated or corrupted ({first_line(error)})") from None
    except (PermissionError, IsADirectoryError) as error:  # unreadable, not damaged (torch says EINVAL to damage)
        raise UsageError(f"can't read {path} ({error.strerror or first_line(error)})") from None
    except Exception as error:  # zip, EOF, and storage errors of a damaged file
        raise UsageError(f"{path} is truncated or corrupted ({first_line(error)})") from None
    if not isinstance(checkpoint, dict) or not {"format", "kind", "model_name", "config"} <= checkpoint.keys():
        raise UsageError(f"{path} is not a checkpoint of these scripts (missing keys)")
    if checkpoint["model_name"] != name:
        raise UsageError(f"{path} is a checkpoint of {checkpoint['model_name']}, not {name}")
    if checkpoint["format"] != CHECKPOINT_FORMAT or checkpoint["kind"] != kind:
        raise UsageError(f"{path} is a {checkpoint['kind']} file of layout {checkpoint['format']}; "
                         f"this code reads {kind} files of layout {CHECKPOINT_FORMAT}")
    saved = checkpoint["config"]
    if not isinstance(saved, dict):
        raise UsageError(f"{path} has a damaged config ({type(saved).__name__}, not a dict)")
    saved = {"conditional": False, **saved}  # weights made before conditional models existed are of p(x)
    if conditional is None and config is not None:
        conditional = config.get("conditional", False)
    if conditional is not None and saved.get("conditional", False) != conditional:
        raise UsageError(f"{path} holds a model of p(x | y) (trained with --conditional); load it with --conditional"
                         if saved.get("conditional") else
                         f"{path} holds a model of p(x) (trained without --conditional); it can't be loaded as "
                         f"a conditional model")
    if config is not None and saved != config:
        diffs = ", ".join(f"{k}={saved.get(k)!r} (checkpoint) vs {config.get(k)!r} (now)"
                          for k in sorted(set(config) | set(saved)) if saved.get(k) != config.get(k))
        raise UsageError(f"{path} was made with another configuration: {diffs}")
    if kind == "weights":
        weights = checkpoint.get("weights")
        if not isinstance(weights, dict) or weights_checksum(weights) != checkpoint.get("weights_sha256"):
            raise UsageError(f"{path} is damaged: its weights do not match their sha256 checksum")
        check_finite_weights(weights, path)
    return checkpoint


def check_finite_weights(weights, path):
    """Every floating tensor of a state_dict finite (NaN weights would reach the samplers and the
    scores, however valid their checksum): a one-line UsageError naming the first that is not."""
    for key, tensor in weights.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UsageError(f"{path} is damaged: its weights {key} hold NaN or infinite values")


def load_weights_into(model, weights, path):
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UsageError(f"{path} does not fit this model ({first_line(error)})") from None


def load_trained(model_class, out=Path("results"), sampling=None, device="cpu", conditional=False):
    """A trained model rebuilt from OUT/NAME.pt (OUT/NAME_conditional.pt with conditional: the
    shipped weights and their config), in eval mode: how another script (ood.py, a notebook)
    uses a family, ``load_trained(ARM)``."""
    script = Path(sys.modules[model_class.__module__].__file__).name
    stem = f"{model_class.name}_conditional" if conditional else model_class.name
    path = Path(out) / f"{stem}.pt"
    checkpoint = load_checkpoint(path, model_class.name, None, "weights",
                                 f"make it with: python {script} --out {out}" + " --conditional" * conditional,
                                 conditional=conditional)
    try:
        config = model_class.Config(**checkpoint["config"])
    except TypeError as error:
        raise UsageError(f"{path} has a config this code does not know ({error})") from None
    check_config_types(config, path)
    check_model_size(model_class, config, sampling, f"the config in {path}")
    try:
        model = model_class(config, sampling)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise UsageError(f"{path} has a config this code can't build ({type(error).__name__}: "
                         f"{first_line(error, '')})") from None
    check_pair(path, checkpoint, Path(out) / f"{stem}_metrics.json")
    load_weights_into(model, checkpoint["weights"], path)
    return model.to(device).eval()


def pair_problem(checkpoint, metrics):
    """Why the weights of a loaded weights file and a run's metrics do not come from one run (the
    weights sha256 the metrics record differs: a run stopped between writing the two), or None.
    Metrics that record no checksum (or are unreadable: their readers say so) are not judged."""
    recorded = metrics.get("weights_sha256") if isinstance(metrics, dict) else None
    if isinstance(recorded, str) and recorded != checkpoint.get("weights_sha256"):
        stored = str(checkpoint.get("weights_sha256"))[:12]
        return (f"holds other weights than its metrics were measured on (weights sha256 {stored} vs "
                f"{recorded[:12]} in the metrics): a run stopped while it replaced its files; run it again")
    return None


def check_pair(weights_path, checkpoint, metrics_path):
    """UsageError (one line) when the weights file and the metrics beside it are not one run's."""
    try:
        metrics = read_json(metrics_path)
    except DamagedFile:
        return
    problem = pair_problem(checkpoint, metrics)
    if problem:
        raise UsageError(f"{weights_path} {problem}")


def check_config_types(config, path):
    """Each field of a stored config has the type of its default (an int is not 12.0, a flag is a
    bool): a one-line UsageError otherwise."""
    for field in dataclasses.fields(config):
        value, default = getattr(config, field.name), field.default
        if default is None or default is dataclasses.MISSING or value is None:
            continue
        kind = type(default)
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, kind))
        if not ok:
            raise UsageError(f"{path} is damaged: its config has {field.name}={value!r}, "
                             f"not {'an' if kind is int else 'a'} {kind.__name__}")


MAX_PARAMETERS = 100_000_000  # a model larger than this (400 MB of fp32 weights, more to train) is refused


def check_model_size(model_class, config, sampling, source):
    """Refuse (UsageError) a configuration whose model has more than MAX_PARAMETERS parameters,
    counted on the meta device (no memory), before anything is allocated."""
    try:
        with torch.device("meta"):
            count = sum(p.numel() for p in model_class(config, sampling).parameters())
    except Exception:  # a model that can't be built on the meta device is checked when it is built
        return
    if count > MAX_PARAMETERS:
        raise UsageError(f"{source} would build a {model_class.name} of {count:,} parameters; "
                         f"at most {MAX_PARAMETERS:,} fit here")


# Code that only evaluates a trained model, by name (methods of a model class, or functions of
# common.py and the family scripts): SCORED writes numbers into a run's metrics, so a change to it
# re-scores the run from its weights; TOOL_ONLY is used by the tools (ood.py, inpaint.py, benchmark.py
# --samplers), which compute afresh on every run, so a change to it leaves the run current. Any other code of the
# family script, or of common.py, decides the weights: a change to it retrains the run.
SCORED = ("extra_metrics", "extra_images", "class_log_likelihoods")
TOOL_ONLY = ("samplers", "complete", "missing_nll", "completion_nll", "ood_score", "repaint")
EVALUATION_ONLY = SCORED + TOOL_ONLY


def _code(path, keep):
    """The parsed code of a file, docstrings left out (comments never reach the tree), with only
    the functions and class methods whose names keep(name) accepts: a stable tree to hash."""
    tree = ast.parse(Path(path).read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        if isinstance(node, (ast.Module, ast.ClassDef)):
            node.body = [n for n in node.body if not isinstance(n, ast.FunctionDef) or keep(n.name)] or [ast.Pass()]
    return tree


def weights_fingerprint(script, root):
    """sha256 of the code that decides a run's trained weights: the family script and common.py
    (the data, the contract, the shared maths and networks, the loop), each without its
    evaluation-only functions. Comments, docstrings and the machinery in plumbing/ leave it
    unchanged; so does plumbing/runs.py, which passes the loop its seeds and settings: an edit to
    those calls for a re-run by hand."""
    digest = hashlib.sha256()
    for path in (script, Path(root) / "common.py"):
        digest.update(ast.dump(_code(path, lambda name: name not in EVALUATION_ONLY)).encode())
    return digest.hexdigest()


def scoring_fingerprint(script, root):
    """sha256 of the code that computes a run's recorded scores from its weights: the
    sample-quality measures (plumbing/quality.py) and the script's SCORED methods."""
    digest = hashlib.sha256()
    digest.update(ast.dump(_code(Path(root) / "plumbing" / "quality.py", lambda name: True)).encode())
    classes = [node for node in _code(script, lambda name: name in SCORED).body if isinstance(node, ast.ClassDef)]
    methods = [ast.dump(method) for cls in classes for method in cls.body
               if isinstance(method, ast.FunctionDef) and method.name in SCORED]
    digest.update("".join(methods).encode())
    return digest.hexdigest()


def fingerprints(script, root):
    """Both fingerprints of the script's current code, as a run's metrics record them."""
    return dict(weights_code_sha256=weights_fingerprint(script, root),
                scoring_code_sha256=scoring_fingerprint(script, root))
