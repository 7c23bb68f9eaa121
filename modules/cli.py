"""Shared script plumbing: validated flags, devices, safe files, one-line errors.

Every command-line script of the project uses this module, so that bad input
gets the same treatment everywhere: one line on stderr, exit status 2, no
traceback, no finished work lost (house rules; issue 15).  The API is small
and meant to stay stable:

Errors and the top-level runner
    ``CLIError``            user-facing problem; ``str(exc)`` is the message.
                            ``InputError`` is the same class.
    ``NonFiniteError``      a ``CLIError`` for NaN/Inf logits, maps or weights.
    ``register_input_error(cls)``  treat ``cls`` as bad input in ``run_main``.
    ``run_main(fn, argv)``  call ``fn(argv)``; ``KeyboardInterrupt`` becomes
                            one line + exit 130, known input errors (the
                            above, ``CheckpointError``, ``ERASERFormatError``,
                            ``SegmentationDataError``, ``UnknownMethodError``,
                            ``OSError``, ...) ``error: <one line>`` + exit 2.
    ``cli_entry``           decorator form: ``main = cli_entry(_main)``.
    ``quiet_ctrl_c_while_importing()``  first thing in ``__main__``: Ctrl-C
                            while torch imports is one line and exit 130.
    ``one_line(exc)``       the first line of an exception's message.

argparse types (range-checked; the message names the rule that failed)
    ``positive_int``, ``non_negative_int``, ``int_range(lo, hi)``,
    ``finite_float``, ``positive_float``, ``non_negative_float``,
    ``fraction`` (0, 1], ``probability`` [0, 1], ``float_range(lo, hi, ...)``,
    ``existing_file``, ``existing_dir``, ``existing_path``.

Parameter-file fields
    ``check_number(value, name, kind=int, minimum=..., maximum=...)``
    refuses bools, strings, NaN/Inf and out-of-range numbers.

Common flags
    ``add_device_arg``, ``add_weights_arg``, ``add_threads_arg``,
    ``add_seed_arg``, ``apply_threads``.

Devices and numerics
    ``default_device()``, ``resolve_device(name)`` (cpu, cuda, cuda:N, mps,
    meta, ... with one-line errors), ``set_tf32(enabled=False)`` (the TF32
    policy: off, for reproducible maps), ``check_finite(x, what)``.

Output locations, checked before the work starts
    ``check_output_dir(path)``, ``check_output_file(path)``.

Atomic writes (unique temporaries in the same folder, then one rename)
    ``atomic_write_bytes``, ``atomic_write_text``, ``atomic_write_json``,
    ``atomic_directory(path)`` (context manager: fill a temporary folder,
    published by rename on success), ``publish_dir(tmp, path)``,
    ``remove_stale_temporaries(path)``.

Run folders (one rule for every benchmark that writes results)
    ``prepare_run_folder(folder, identity, resume=, overwrite=)`` (call with
    ``file_lock`` held: resume, start afresh, or refuse in one line),
    ``files_sha256(paths)`` (content identity of input data),
    ``check_memory(nbytes, what)`` (refuse a request larger than the machine).

Concurrency and images
    ``file_lock(path)`` (exclusive advisory lock on a folder or a lock
    file, ``fcntl.flock``), ``workers_ignore_sigint()`` (start DataLoader
    workers that leave Ctrl-C to the main process), ``open_image``
    (refuses decompression bombs and unreadable files in one line).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Type, Union

__all__ = [
    "EXIT_INPUT", "EXIT_INTERRUPTED", "CLIError", "InputError", "NonFiniteError", "register_input_error",
    "input_error_types", "one_line", "run_main", "cli_entry",
    "positive_int", "non_negative_int", "int_range", "finite_float", "positive_float", "non_negative_float",
    "fraction", "probability", "float_range", "existing_file", "existing_dir", "existing_path",
    "check_number", "add_device_arg", "add_weights_arg", "add_threads_arg", "add_seed_arg", "apply_threads",
    "default_device", "resolve_device", "set_tf32", "check_finite", "check_array", "check_output_dir", "check_output_file",
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_directory", "publish_dir",
    "remove_stale_temporaries", "file_lock", "open_image", "MAX_THREADS", "resume_results", "prepare_run_folder",
    "files_sha256", "check_memory", "workers_ignore_sigint", "quiet_ctrl_c_while_importing",
]

EXIT_INPUT = 2
"""Exit status for bad input (argparse uses the same)."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


# --------------------------------------------------------------------------
# Errors and the top-level runner
# --------------------------------------------------------------------------
class CLIError(Exception):
    """A problem the user can fix (bad flag, broken or stale file, unusable
    device).  ``run_main`` prints ``error: <message>`` and exits 2."""


InputError = CLIError


class NonFiniteError(CLIError, ValueError):
    """NaN or Inf where a finite number is needed (logits, maps, weights)."""


# Error classes of other modules that mean "bad input".  Looked up in
# sys.modules only: an error of a module that was never imported cannot have
# been raised, and this module then imports nothing of the project.
_KNOWN_INPUT_ERRORS: Tuple[Tuple[str, str], ...] = (
    ("modules.checkpoints", "CheckpointError"),
    ("modules.methods", "UnknownMethodError"),
    ("modules.generic", "GenericModelError"),
    ("modules.attention_capture", "UnsupportedModelError"),
    ("BERT_rationale_benchmark.utils", "ERASERFormatError"),
    ("data.imagenet_seg", "SegmentationDataError"),
    ("baselines.ViT.perturbation_data", "InputError"),
    ("baselines.ViT.imagenet_seg_eval", "EvalError"),
    ("baselines.ViT.visualize", "InputError"),
)
_REGISTERED: List[Type[BaseException]] = []


def register_input_error(cls: Type[BaseException]) -> Type[BaseException]:
    """Make ``run_main`` treat ``cls`` (and subclasses) as bad input (exit 2).
    Returns ``cls``, so it also works as a class decorator."""
    if cls not in _REGISTERED:
        _REGISTERED.append(cls)
    return cls


def input_error_types() -> Tuple[Type[BaseException], ...]:
    """The exception types ``run_main`` reports as bad input."""
    types: List[Type[BaseException]] = [CLIError, *_REGISTERED]
    for module_name, attr in _KNOWN_INPUT_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, attr, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in types:
            types.append(cls)
    return tuple(types)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of ``str(exc)`` (the class name if empty);
    for an ``OSError`` its ``strerror`` and file name."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, CLIError):
        where = exc.filename if exc.filename is not None else ""
        return f"{where}: {exc.strerror}" if where != "" else str(exc.strerror)
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _exit_interrupted_while_importing(signum, frame) -> None:
    sys.stderr.write("\ninterrupted while starting; nothing was done\n")
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def quiet_ctrl_c_while_importing() -> None:
    """Call first thing in a script run as ``__main__``, before torch and the
    models import: Ctrl-C then ends it with one line and exit 130 instead of
    an import traceback.  :func:`run_main` hands Ctrl-C back to Python's
    ``KeyboardInterrupt`` (finished work kept, one line) when the work starts."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_interrupted_while_importing)


def run_main(fn: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None, *,
             interrupt_message: str = "interrupted; finished work is kept") -> int:
    """Run a script's body and turn the expected failures into exit codes.

    ``fn(argv)`` returns an exit status (``None`` means 0).  Bad input (see
    :func:`input_error_types`, plus ``OSError``) prints ``error: <one line>``
    on stderr and returns 2; ``KeyboardInterrupt`` prints ``interrupted...``
    (its own message if it carries one) and returns 130.  ``SystemExit``
    (argparse) passes through; anything else is a bug and keeps its traceback.
    """
    import signal
    import threading

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is _exit_interrupted_while_importing):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = fn(argv)
    except KeyboardInterrupt as exc:
        msg = one_line(exc) if exc.args else interrupt_message
        print(f"\n{msg}" if msg.startswith("interrupted") else f"\ninterrupted: {msg}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except input_error_types() + (OSError,) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT
    return 0 if code is None else int(code)


def cli_entry(fn: Callable[..., Any]) -> Callable[[Optional[Sequence[str]]], int]:
    """Decorator: ``main(argv=None)`` that runs ``fn`` under :func:`run_main`
    and returns its exit status."""
    @functools.wraps(fn)
    def main(argv: Optional[Sequence[str]] = None) -> int:
        return run_main(fn, argv)
    return main


# --------------------------------------------------------------------------
# argparse types
# --------------------------------------------------------------------------
def _typed(name: str, fn: Callable[[str], Any]) -> Callable[[str], Any]:
    fn.__name__ = name  # argparse names the type in some messages
    return fn


def _parse_int(text: str) -> int:
    try:
        return int(str(text).strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _parse_float(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_range(lo: Optional[int] = None, hi: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer with ``lo <= value <= hi`` (either bound may be None)."""
    def parse(text: str) -> int:
        value = _parse_int(text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            if hi is None:
                rule = "positive" if lo == 1 else ("non-negative" if lo == 0 else f">= {lo}")
                raise argparse.ArgumentTypeError(f"must be {rule}, not {value}")
            if lo is None:
                raise argparse.ArgumentTypeError(f"must be <= {hi}, not {value}")
            raise argparse.ArgumentTypeError(f"must be in {lo}..{hi}, not {value}")
        return value
    return _typed("int", parse)


positive_int = int_range(1)
non_negative_int = int_range(0)


def float_range(lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open: bool = False,
                hi_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in the interval given (open ends with
    ``lo_open`` / ``hi_open``; a None bound is unbounded)."""
    left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
    interval = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def parse(text: str) -> float:
        value = _parse_float(text)
        bad = ((lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and (value >= hi if hi_open else value > hi)))
        if bad:
            raise argparse.ArgumentTypeError(f"must be in {interval}, not {value:g}")
        return value
    return _typed("float", parse)


finite_float = float_range()
positive_float = float_range(0.0, lo_open=True)
non_negative_float = float_range(0.0)
fraction = float_range(0.0, 1.0, lo_open=True)
"""argparse type: a float in (0, 1] (a share of something that must not be empty)."""
probability = float_range(0.0, 1.0)
"""argparse type: a float in [0, 1]."""


def existing_file(text: str) -> str:
    """argparse type: a path to an existing regular file."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: not a file")
    return text


def existing_dir(text: str) -> str:
    """argparse type: a path to an existing directory."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: not a directory")
    return text


def existing_path(text: str) -> str:
    """argparse type: a path that exists (file or directory)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


# --------------------------------------------------------------------------
# Parameter-file fields
# --------------------------------------------------------------------------
def check_number(value: Any, name: str, kind: type = int, *, minimum: Optional[float] = None,
                 maximum: Optional[float] = None, min_open: bool = False, max_open: bool = False,
                 where: str = "") -> Union[int, float]:
    """A number from a parameter file, checked for type, finiteness and range.

    ``kind=int`` accepts integers only (not ``True``, not ``2.0``, not
    ``"2"``); ``kind=float`` accepts integers and floats.  Raises
    :class:`CLIError` ``"<where>: <name> must be ..., got <value!r>"``.
    """
    prefix = f"{where}: " if where else ""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind is int:
        ok_type, noun = is_int, "an integer"
    else:
        ok_type, noun = is_int or isinstance(value, float), "a number"
    if not ok_type:
        raise CLIError(f"{prefix}{name} must be {noun}, got {value!r}")
    if not math.isfinite(value):
        raise CLIError(f"{prefix}{name} must be a finite number, got {value!r}")
    low_bad = minimum is not None and (value <= minimum if min_open else value < minimum)
    high_bad = maximum is not None and (value >= maximum if max_open else value > maximum)
    if low_bad or high_bad:
        if maximum is None and minimum is not None and not min_open:
            rule = "positive" if (minimum == 1 and kind is int) else ("non-negative" if minimum == 0 else f">= {minimum}")
        elif maximum is None and minimum == 0 and min_open:
            rule = "positive"
        else:
            rule = (f"in {'(' if min_open else '['}{'-inf' if minimum is None else minimum}, "
                    f"{'inf' if maximum is None else maximum}{')' if max_open else ']'}")
        raise CLIError(f"{prefix}{name} must be {rule}, got {value!r}")
    return value


# --------------------------------------------------------------------------
# Common flags
# --------------------------------------------------------------------------
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))
"""Upper bound of ``--threads`` (torch segfaults on absurd counts)."""


def default_device() -> str:
    """``"cuda"`` when CUDA is available, else ``"cpu"``."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_arg(parser: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """``--device`` (default: cuda if available, else cpu); resolve it with
    :func:`resolve_device`."""
    parser.add_argument("--device", default=default if default is not None else default_device(),
                        help="torch device: cpu, cuda, cuda:N or mps")


def add_weights_arg(parser: argparse.ArgumentParser, required: bool = False, default: Optional[str] = None,
                    help: str = "checkpoint (.safetensors, or .pth/.pt/.bin read with weights_only=True) "
                                "or model directory") -> None:
    """``--weights``: a checkpoint file or a model directory (must exist)."""
    parser.add_argument("--weights", type=existing_path, required=required, default=default, help=help)


def add_threads_arg(parser: argparse.ArgumentParser, default: Optional[int] = None) -> None:
    """``--threads``: torch CPU threads, 1..MAX_THREADS; apply with :func:`apply_threads`."""
    parser.add_argument("--threads", type=int_range(1, MAX_THREADS), default=default,
                        help=f"torch CPU threads (1..{MAX_THREADS}; default: torch's choice)")


def add_seed_arg(parser: argparse.ArgumentParser, default: int = 0) -> None:
    """``--seed``: an integer in 0..2**32-1."""
    parser.add_argument("--seed", type=int_range(0, 2 ** 32 - 1), default=default, help="random seed")


def apply_threads(threads: Optional[int]) -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is None."""
    if threads is not None:
        import torch
        torch.set_num_threads(int(threads))


# --------------------------------------------------------------------------
# Devices and numerics
# --------------------------------------------------------------------------
def resolve_device(name: Union[str, "Any"], flag: str = "--device"):
    """``torch.device(name)`` after checking that it can hold data here.

    One-line :class:`CLIError` for an unknown name, ``meta`` (holds no
    data), ``cuda`` without CUDA, ``cuda:N`` beyond the devices present,
    ``mps`` without MPS, and any other backend that cannot allocate.
    """
    import torch
    text = str(name).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CLIError(f"{flag} {text!r} is not a device ({one_line(exc)}); use cpu, cuda, cuda:N or mps") from None
    if device.type == "meta":
        raise CLIError(f"{flag} meta holds no data (shapes only); use cpu, cuda or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"{flag} {text}: CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CLIError(f"{flag} {text}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CLIError(f"{flag} {text}: MPS (Apple GPU) is not available here; use --device cpu")
    if device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as exc:  # backends raise RuntimeError, AssertionError, ...
            raise CLIError(f"{flag} {text} is not usable here ({one_line(exc)})") from None
    return device


def set_tf32(enabled: bool = False) -> None:
    """The project's TF32 policy: off unless asked for.

    LRP-based relevance amplifies TF32 rounding: on an H100 a ViT-B's
    transformer-attribution map differed from the CPU's by up to 4x its
    maximum with cuDNN's default TF32 convolutions (README, "Numerical
    sensitivity").  Sets both the matmul and the cuDNN flag.
    """
    import torch
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def check_finite(x: Any, what: str) -> Any:
    """Return ``x`` (tensor, array or number) if all its values are finite;
    otherwise raise :class:`NonFiniteError` ``"<what>: k of n values are
    NaN or Inf"``."""
    try:
        import torch
        if isinstance(x, torch.Tensor):
            if x.is_floating_point() or x.is_complex():
                bad = int((~torch.isfinite(x.detach())).sum())
                n = x.numel()
            else:
                bad, n = 0, x.numel()
        else:
            raise ImportError
    except ImportError:
        import numpy as np
        arr = np.asarray(x)
        if arr.dtype.kind in "fc":
            bad, n = int((~np.isfinite(arr)).sum()), int(arr.size)
        else:
            bad, n = 0, int(arr.size)
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {n} values are NaN or Inf; refusing to write a meaningless result "
                             "(check the weights and the input)")
    return x


_ARRAY_KINDS = {"f": ("a float", "f"), "i": ("an integer", "iu")}


def check_array(arr: Any, name: str, where: str, *, kind: str = "f", ndim: Optional[int] = None,
                shape: Optional[Sequence[Optional[int]]] = None, finite: bool = True) -> Any:
    """An array read from a file (``.npz``, HDF5), checked on read: its dtype
    kind (``"f"`` float, ``"i"`` integer; bool is neither), its rank or its
    ``shape`` (``None`` entries free) and, for floats, that every value is
    finite.  Returns ``arr``; raises :class:`CLIError` ``"<where>: <name> ..."``
    in one line."""
    import numpy as np

    noun, kinds = _ARRAY_KINDS[kind]
    arr = np.asarray(arr)
    if arr.dtype.kind not in kinds:
        raise CLIError(f"{where}: {name} must be {noun} array, got dtype {arr.dtype}")
    want = len(shape) if shape is not None else ndim
    if want is not None and arr.ndim != want:
        raise CLIError(f"{where}: {name} must have {want} dimensions, got shape {tuple(arr.shape)}")
    if shape is not None and any(s is not None and s != n for s, n in zip(shape, arr.shape)):
        expect = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise CLIError(f"{where}: {name} must have shape {expect}, got {tuple(arr.shape)}")
    if finite and arr.dtype.kind == "f":
        flat = arr.reshape(-1)
        step = 1 << 22  # in pieces: a feature file of many GiB needs no mask of its size
        bad = sum(int(np.count_nonzero(~np.isfinite(flat[i:i + step]))) for i in range(0, flat.size, step))
        if bad:
            raise CLIError(f"{where}: {name}: {bad} of {arr.size} values are NaN or Inf")
    return arr


# --------------------------------------------------------------------------
# Output locations
# --------------------------------------------------------------------------
def _probe_writable(directory: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test.")
    except OSError as exc:
        raise CLIError(f"cannot write in {directory}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str, create: bool = True, flag: str = "") -> str:
    """Make sure files can be written in the folder ``path`` before any work.

    Creates it (with parents) when ``create``; refuses a path that is or runs
    through a regular file, and a folder one cannot write in (probed by
    creating a temporary file).  Returns ``path``; raises :class:`CLIError`.
    """
    label = f"{flag} {path}" if flag else path
    if os.path.exists(path) and not os.path.isdir(path):
        raise CLIError(f"{label}: exists and is not a directory")
    if not os.path.isdir(path):
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise CLIError(f"{label}: {parent} is a file, not a directory")
        if not create:
            _probe_writable(parent)
            return path
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise CLIError(f"{label}: cannot create the directory ({exc.strerror or exc})") from None
    _probe_writable(path)
    return path


def check_output_file(path: str, flag: str = "") -> str:
    """Make sure ``path`` can be written before any work: its folder exists
    (created if missing) and is writable, and ``path`` is not a directory or
    a read-only file.  Returns ``path``; raises :class:`CLIError`."""
    label = f"{flag} {path}" if flag else path
    if os.path.isdir(path):
        raise CLIError(f"{label}: is a directory, expected a file name")
    check_output_dir(os.path.dirname(os.path.abspath(path)), create=True, flag=flag)
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise CLIError(f"{label}: the file is read-only")
    return path


# --------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------
def _tmp_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.abspath(path))}.{os.getpid()}."


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` through a unique temporary file in the same
    folder, fsync, then ``os.replace``: readers see the old file or the
    complete new one, and two writers never share a temporary."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str, text: str, encoding: str = "utf-8") -> str:
    """:func:`atomic_write_bytes` of ``text`` encoded."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = 2, allow_nan: bool = False) -> str:
    """Write ``obj`` as JSON (plus a final newline) atomically.

    NaN/Inf are refused by default (:class:`NonFiniteError`): they are not
    JSON, and a result holding them is not a result.
    """
    try:
        text = json.dumps(obj, indent=indent, allow_nan=allow_nan)
    except ValueError as exc:
        if "not JSON compliant" in str(exc) or "Out of range float" in str(exc):
            raise NonFiniteError(f"{path}: refusing to write NaN or Inf") from None
        raise
    return atomic_write_text(path, text + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str) -> int:
    """Delete temporaries of ``path`` (files or folders made by the atomic
    writers here) whose writing process is gone.  Returns how many."""
    directory = os.path.dirname(os.path.abspath(path))
    base = f".{os.path.basename(os.path.abspath(path))}."
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(base) or not name.endswith(".tmp"):
            continue
        pid_text = name[len(base):].split(".", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        victim = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(victim) and not os.path.islink(victim):
                shutil.rmtree(victim)
            else:
                os.unlink(victim)
            removed += 1
    return removed


def publish_dir(tmp: str, path: str) -> str:
    """Move the complete folder ``tmp`` to ``path`` (same file system).

    A missing ``path`` appears in one ``os.rename``; an existing one is first
    renamed aside and deleted after, so ``path`` is never a mixture of old
    and new files.
    """
    if os.path.lexists(path):
        aside = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=_tmp_prefix(path),
                                 suffix=".tmp")
        os.rmdir(aside)
        os.rename(path, aside)
        os.rename(tmp, path)
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(aside)
    else:
        os.rename(tmp, path)
    return path


@contextlib.contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Context manager yielding a unique empty temporary folder next to
    ``path``; on normal exit it becomes ``path`` (:func:`publish_dir`), on
    an exception it is deleted.  A kill leaves ``path`` untouched (and a
    temporary that :func:`remove_stale_temporaries` clears later)::

        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, path)


# --------------------------------------------------------------------------
# Concurrency
# --------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: str, blocking: bool = False, what: str = "") -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` for the ``with`` block:
    an existing directory (locked itself, so no lock file is left in it) or
    a lock file (created if missing).  Non-blocking by default: when another
    process holds it, raise :class:`CLIError` naming ``what`` (or the path)."""
    import fcntl
    if os.path.isdir(path):
        fd = os.open(path, os.O_RDONLY)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CLIError(f"{what or path} is in use by another run (lock {path}); wait for it to finish") \
                    from None
            raise
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def workers_ignore_sigint() -> Iterator[None]:
    """Start worker processes (``iter(DataLoader)`` with ``num_workers > 0``)
    inside this block: forked while Ctrl-C is deferred, they ignore it (the
    main process stops them when it stops), so Ctrl-C in the first second
    prints no worker tracebacks; a Ctrl-C that arrives while they start is
    raised here as ``KeyboardInterrupt`` once they have started."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []

    def defer(signum, frame):  # in a forked worker this handler stays: Ctrl-C is ignored there
        pending.append(signum)

    old = signal.signal(signal.SIGINT, defer)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if pending:
        raise KeyboardInterrupt


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------
def open_image(path: str, mode: Optional[str] = "RGB", max_pixels: Optional[int] = None):
    """A loaded PIL image of ``path`` converted to ``mode``.

    Refuses, with a one-line :class:`CLIError`, missing or unreadable files
    and images of more than ``max_pixels`` pixels (default: Pillow's
    ``Image.MAX_IMAGE_PIXELS``, about 89 million), which Pillow would only
    warn about up to twice that (a 20000x20000 "decompression bomb").
    """
    from PIL import Image, UnidentifiedImageError
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if limit is not None and w * h > limit:
                    raise CLIError(f"{path}: image of {w}x{h} pixels exceeds the limit of {limit} pixels")
                img.load()
                return img.convert(mode) if mode is not None else img.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CLIError(f"{path}: image too large ({one_line(exc)})") from None
    except FileNotFoundError:
        raise CLIError(f"{path}: image not found") from None
    except UnidentifiedImageError:
        raise CLIError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt files
        raise CLIError(f"{path}: cannot read the image ({one_line(exc)})") from None


def resume_results(path: str, identity: str, fresh: dict, overwrite: bool = False) -> dict:
    """The results file of an earlier run to resume: its contents when it
    exists and records the same ``identity`` (a hash of the arguments and
    the content of the weights and data the results depend on), ``fresh``
    when there is none or ``overwrite`` (``--overwrite``: the caller's next
    write replaces it); a file of another identity is refused in one line
    (never mixed, never replaced without ``--overwrite``)."""
    if overwrite or not os.path.isfile(path):
        return fresh
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{path}: unreadable results ({one_line(exc)}); pass --overwrite to start again") from None
    if not isinstance(old, dict) or old.get("identity") != identity:
        raise CLIError(f"{path} holds results of other arguments, weights or data; use another output folder or "
                       "pass --overwrite to replace them")
    return old


def files_sha256(paths: Sequence[str]) -> str:
    """SHA-256 (hex) over the names and bytes of ``paths`` in the order
    given: the content identity of a run's input data."""
    import hashlib
    h = hashlib.sha256()
    for path in paths:
        h.update(os.path.basename(path).encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def prepare_run_folder(folder: str, identity: dict, *, resume: bool, overwrite: bool, record: str = "run.json",
                       finished: Sequence[str] = ("results.json",), partial: Sequence[str] = (),
                       flag: str = "--output-dir") -> bool:
    """What an output folder's earlier run means for this one (hold
    :func:`file_lock` on the folder around the call and the run).

    ``identity`` holds what the results depend on (content hashes of the
    weights and the data, the arguments that change results); the folder's
    ``record`` file keeps it.  Returns True to resume (same identity and
    ``--resume``: keep the records), False to start afresh (nothing there, or
    ``--overwrite``: the caller replaces the old records).  Refuses in one
    line (:class:`CLIError`): ``--resume`` over another run's identity
    (naming the fields that differ); another run's, or this run's finished,
    results (``finished``) or partial records (``partial``) without
    ``--resume`` or ``--overwrite``.  Writes ``record`` (atomically) when it
    returns.
    """
    record_path = os.path.join(folder, record)
    present = [n for n in tuple(finished) + tuple(partial) if os.path.exists(os.path.join(folder, n))]
    old = None
    if os.path.isfile(record_path):
        try:
            with open(record_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as exc:
            if not overwrite:
                raise CLIError(f"{record_path}: unreadable ({one_line(exc)}); pass --overwrite to start again") \
                    from None
        if old is not None and not isinstance(old, dict):
            old = {}
    label = f"{flag} {folder}" if flag else folder
    if old is not None:
        diff = sorted(k for k in set(identity) | set(old) if old.get(k) != identity.get(k))
        if resume and diff:
            raise CLIError(f"{label} holds another run (differs in: {', '.join(diff)}); --resume would mix them: "
                           "use another folder, or --overwrite without --resume")
        if resume:
            return True
        if present and not overwrite:
            what = "another run's" if diff else "this run's"
            raise CLIError(f"{label} holds {what} results ({', '.join(present)}); pass --resume to continue/reuse "
                           "them or --overwrite to replace them")
    elif present and not overwrite:
        raise CLIError(f"{label} holds results of an unknown run ({', '.join(present)}); use another folder or "
                       "pass --overwrite to replace them")
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(record_path, identity)
    return False


def _available_memory() -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: float, what: str, share: float = 0.8) -> None:
    """Refuse (:class:`CLIError`, with the estimate) a request that needs
    more than ``share`` of the memory available now, before allocating it."""
    available = _available_memory()
    if available is not None and nbytes > share * available:
        raise CLIError(f"{what} needs about {nbytes / 2 ** 30:.1f} GiB, more than this machine has available "
                       f"({available / 2 ** 30:.1f} GiB); ask for less")
