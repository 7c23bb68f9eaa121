"""Every command-line script against every class of bad input it accepts (issue 27 item 5).

The scripts are found, not listed: every ``.py`` under the script folders
that defines ``build_parser()`` and ``main()`` is a row, so a script is
covered the day it lands.  Its parser says which classes of bad input it
accepts (:func:`cases`):

missing path     each input path flag given a path that does not exist
wrong kind       each input path flag given a folder where a file is read,
                 a file of random bytes where a folder (or a file) is read
hostile pickle   each model flag given a folder (or file) whose weights are
                 a pickle that would create a marker folder when unpickled
truncated        the same with ``model.safetensors`` cut in half
NaN weights      the same with one weight NaN
unwritable out   each output flag given a path below a regular file
out of range     each count / size / batch flag given -1, and the sizes whose
                 memory can be estimated (scenes, pictures) an absurd 10**12
--device meta    where the script has ``--device``

Each case runs in-process (``main(argv)``, ``SystemExit`` caught, stdout and
stderr captured; a few seconds' alarm stops a script that starts real work
instead of refusing) and must: raise nothing (no traceback), exit != 0,
never create the marker, and leave every file that existed before (inputs,
shipped models) byte-identical.  The other flags of a case come from a short
table of working argument lists (:data:`BASE`: what reaches the code under
test, e.g. model loading after the data checks); a script missing from it
gets its required flags filled from their types and names.

``test_a_broken_script_fails_the_matrix`` runs the same checks on a script
that loads its checkpoint with a plain pickle and lets a missing file raise:
the matrix must report both.

Run folders (issue 27 item 2): a script that writes results (a --resume or
--overwrite flag, or results.json / results.hdf5 in its source) must be in
:data:`RUN_FOLDER` (its smallest working arguments) or say where it is
covered.  Each runs once uninterrupted (the reference; its atomic writes
counted), once forked and stopped after half of them while a second run into
the same folder must be refused in one line without touching it, then is
SIGKILLed and resumed (the results must equal the reference's, timings
aside), then rerun with the same arguments (refused, or exit 0 with nothing
finished changed) and with arguments of another identity (refused in one
line, nothing changed).  ``test_a_script_without_the_run_folder_fails_it``
does the same to a copy of data/scenes.py without the run-folder helper.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import itertools
import json
import os
import pickle
import re
import shutil
import signal
import sys
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")
SCRIPT_FOLDERS = ("baselines", "BERT_explainability", "BERT_rationale_benchmark", "data", "notebooks", "benchmarks")

# Scripts with a __main__ but no build_parser(): none (every script is in the matrix);
# a new script is not allowed to join this list (test_every_script_has_a_parser).
NO_PARSER: set = set()

# (script, case id prefix) -> why the case is not run: a flag whose "bad" value is legitimate there.
NOT_BAD: Dict[Tuple[str, str], str] = {
    ("baselines.ViT.demo_perturbation", "missing-path --data-dir"): "a missing --data-dir is written (documented)",
    ("baselines.ViT.train_scenes", "missing-path --checkpoint-dir"): "an output folder, created",
    ("baselines.ViT.train_scenes", "missing-path --pool-cache"): "a cache file, written when missing",
}

ALARM_S = 20  # a case that has not refused within this many seconds started real work


def discover() -> List[str]:
    """Module names of every script: a .py under SCRIPT_FOLDERS with build_parser() and main()."""
    found = []
    for folder in SCRIPT_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                if re.search(r"^def build_parser\(", text, re.M) and re.search(r"^def main\(", text, re.M):
                    found.append(os.path.relpath(path, ROOT)[:-3].replace(os.sep, "."))
    return found


def scripts_with_main() -> List[str]:
    found = []
    for folder in SCRIPT_FOLDERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        if "__name__ == \"__main__\"" in f.read():
                            found.append(os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, "."))
    return found


SCRIPTS = discover()


# --------------------------------------------------------------------------
# Fixtures: small inputs, corrupted models
# --------------------------------------------------------------------------
class _Hostile:
    """Unpickling this creates the marker folder (harmless, but proof that code ran)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _write_hostile(path: str, marker: str) -> None:
    with open(path, "wb") as f:
        pickle.dump({"weight": _Hostile(marker)}, f, protocol=2)


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])


def _nan(path: str) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(path)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, path, metadata={"format": "pt"})


class Fixtures:
    """Inputs shared by all cases (built once per session under ``root``)."""

    def __init__(self, root: str):
        self.root = root
        self.marker = os.path.join(root, "MARKER-hostile-pickle-ran")
        self.junk = os.path.join(root, "junk.bin")
        with open(self.junk, "wb") as f:
            f.write(bytes(range(256)) * 8)
        self.empty_dir = os.path.join(root, "empty_dir")
        os.makedirs(self.empty_dir)
        self.a_file = os.path.join(root, "a_regular_file")
        with open(self.a_file, "w") as f:
            f.write("not a folder\n")
        from data.scenes import main as scenes_main
        self.scenes = os.path.join(root, "scenes")
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            assert scenes_main(["--out-dir", self.scenes, "--split", "val", "--count", "2", "--seed", "1",
                                "--size", "48", "--quiet"]) == 0
        import numpy as np
        self.features = os.path.join(root, "feats.npz")
        np.savez(self.features, features=np.ones((3, 314), np.float32),
                 boxes=np.array([[0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 48, 48]], np.float32))
        self._variants: Dict[Tuple[str, str], str] = {}

    def variant(self, source: str, kind: str) -> str:
        """A copy of the model folder or weights file ``source`` with its weights
        made ``kind`` ("hostile", "truncated", "nan")."""
        key = (source, kind)
        if key in self._variants:
            return self._variants[key]
        base = os.path.basename(os.path.normpath(source))
        target = os.path.join(self.root, "variants", f"{kind}-{base}")
        if os.path.isdir(source):
            shutil.copytree(source, target)
            weights = os.path.join(target, "model.safetensors")
            if kind == "hostile":
                os.remove(weights)
                _write_hostile(os.path.join(target, "pytorch_model.bin"), self.marker)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if kind == "hostile":
                target = os.path.splitext(target)[0] + ".pth"
                _write_hostile(target, self.marker)
            else:
                shutil.copy(source, target)
            weights = target
        if kind == "truncated":
            _truncate(weights)
        elif kind == "nan":
            _nan(weights)
        self._variants[key] = target
        return target


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return Fixtures(str(tmp_path_factory.mktemp("cli_matrix")))


def _maps(f: Fixtures) -> str:
    """results.hdf5 of two pictures (generate_visualizations), made once."""
    out = os.path.join(f.root, "maps")
    if not os.path.isfile(os.path.join(out, "results.hdf5")):
        from baselines.ViT.generate_visualizations import main as gv_main
        code, text, escaped = run_case(gv_main, [
            "--imagenet-validation-path", f"{f.scenes}/imagefolder_val", "--weights", f"{SAMPLES}/synthetic_vit",
            "--method", "rollout", "--limit", "2", "--batch-size", "1", "--num-workers", "0", "--device", "cpu",
            "--output-dir", out], alarm_s=300)
        assert code == 0 and escaped is None, text[-500:]
    return out


# Working argument lists ("{out}" is the case's own output folder): they get
# each case past the checks that come before the code it targets.
BASE: Dict[str, Callable[[Fixtures], List[str]]] = {
    "baselines.ViT.visualize": lambda f: [
        "--image", os.path.join(f.scenes, "val", "000000.png"), "--weights", f"{SAMPLES}/synthetic_vit",
        "--out", "{out}/v.png"],
    "baselines.ViT.class_specificity": lambda f: [
        "--annotations", f"{f.scenes}/annotations/instances_val.json", "--image-dir", f"{f.scenes}/val",
        "--weights", f"{SAMPLES}/synthetic_scenes_vit", "--output-dir", "{out}", "--limit", "1", "--quiet"],
    "baselines.ViT.imagenet_seg_eval": lambda f: [
        "--imagenet-seg-path", f"{f.scenes}/val_gtsegs.mat", "--weights", f"{SAMPLES}/synthetic_scenes_vit",
        "--limit", "1", "--output-dir", "{out}", "--quiet"],
    "baselines.ViT.generate_visualizations": lambda f: [
        "--imagenet-validation-path", f"{f.scenes}/imagefolder_val", "--weights", f"{SAMPLES}/synthetic_vit",
        "--limit", "1", "--num-workers", "0", "--output-dir", "{out}"],
    "baselines.ViT.demo_perturbation": lambda f: [
        "--weights", f"{SAMPLES}/synthetic_vit", "--data-dir", f"{f.scenes}/imagefolder_val", "--limit", "1",
        "--output-dir", "{out}"],
    "baselines.faithfulness_eval": lambda f: [
        "--weights", f"{SAMPLES}/synthetic_vit", "--synthetic", "2", "--limit", "1", "--steps", "2",
        "--output-dir", "{out}", "--quiet"],
    "baselines.LXMERT.vqa_perturbation": lambda f: [
        "--model-dir", f"{SAMPLES}/synthetic_scenes_lxmert", "--scenes", "1", "--methods", "random",
        "--output-dir", "{out}"],
    "baselines.LXMERT.explain_vqa": lambda f: [
        "--model-dir", f"{SAMPLES}/synthetic_scenes_lxmert", "--image", f"{f.scenes}/val/000000.png",
        "--question", "is there a cube", "--features", f.features, "--out", "{out}/q.png"],
    "baselines.DETR.detr_masks": lambda f: [
        "--model-dir", f"{SAMPLES}/synthetic_scenes_detr", "--image", f"{f.scenes}/val/000000.png",
        "--out", "{out}/m.png"],
    "baselines.DETR.detr_mask_eval": lambda f: [
        "--model-dir", f"{SAMPLES}/synthetic_scenes_detr", "--scenes", "1", "--output-dir", "{out}"],
    "BERT_explainability.explain_generation": lambda f: [
        "--model-dir", f"{SAMPLES}/synthetic_translation_bart", "--text", "a red cube", "--out", "{out}/g.html"],
    "data.scenes": lambda f: ["--out-dir", "{out}", "--count", "1", "--size", "48", "--quiet"],
    "baselines.ViT.perturbation_eval": lambda f: [
        "--results", _maps(f), "--num-workers", "0", "--device", "cpu", "--output-dir", "{out}"],
    "baselines.ViT.pertubation_eval_from_hdf5": lambda f: [
        "--results", _maps(f), "--num-workers", "0", "--device", "cpu", "--output-dir", "{out}"],
    "baselines.ViT.demo_segmentation": lambda f: [
        "--weights", f"{SAMPLES}/synthetic_vit", "--out-dir", "{out}", "--n-images", "1", "--num-overlays", "0",
        "--quiet"],
    "benchmarks.device_consistency": lambda f: [
        "--weights", f"{SAMPLES}/synthetic_vit", "--images", "1", "--device", "cpu", "--out", "{out}/dc.json"],
    "benchmarks.explain_speed": lambda f: [
        "--model", "vit_small_patch16_224", "--batch-sizes", "1", "--warmup", "0", "--repeats", "1", "--methods",
        "rollout", "--timm-model", "none", "--device", "cpu", "--out", "{out}/speed.json"],
    "data.synthetic": lambda f: ["--out", "{out}", "--n-val", "1", "--size", "32"],
}

# --------------------------------------------------------------------------
# Which flags are what (from the parser)
# --------------------------------------------------------------------------
_OUTPUT = re.compile(r"^(out|output|out_dir|output_dir|html|score_file|save_dir)$")
_INPUT = re.compile(r"(path|dir|file|weights|annotations|image|images|questions|features|params|results|init|"
                    r"checkpoint|boxes|notebooks|pretrained|text_model|data)")
_MODEL = re.compile(r"^(weights|model_dir|init|init_vision|checkpoint|text_model|model)$")
_SIZE = re.compile(r"(count|size|scenes|limit|batch|steps|epochs|workers|threads|repeats|tokens|length|queries|"
                   r"hidden|d_model|pairs|n_val|n_train|overlays|every|warmup|timeout|objects|per_type|num_labels|"
                   r"synthetic)")
_NOT_SIZE = re.compile(r"(seed|start|index|layer|gap|tie)")
# sizes whose memory grows with the value: refused up front when absurd (issue 27 item 3)
_BOUNDED = re.compile(r"^(scenes|count|size|synthetic|n_val|n_train|train_scenes|val_scenes|train_pairs|val_pairs)$")
_NUMERIC_TYPES = ("int", "float")
_UNIQUE = itertools.count()


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", "") if action.type is not None else ""


def _flag(action: argparse.Action) -> Optional[str]:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0] if longs else None


def is_output(a: argparse.Action) -> bool:
    return _OUTPUT.match(a.dest) is not None


def is_input_path(a: argparse.Action) -> bool:
    if _flag(a) is None or a.nargs == 0 or a.choices or is_output(a) or _type_name(a) in _NUMERIC_TYPES:
        return False
    return _type_name(a).startswith("existing_") or _INPUT.search(a.dest) is not None


_WANTS_DIR = re.compile(r"(dir|folder|model_dir|init_vision|text_model)$")
_WANTS_FILE = re.compile(r"(file|json|annotations|questions|features|results|params|boxes|image|seg_path)$")


def expects(a: argparse.Action, current: Optional[str]) -> Optional[str]:
    """"dir" or "file": what the flag reads (its type, its name, else its working value); None if unknown."""
    kind = _type_name(a)
    if kind == "existing_dir" or _WANTS_DIR.search(a.dest):
        return "dir"
    if kind == "existing_file" or _WANTS_FILE.search(a.dest):
        return "file"
    if current is not None and os.path.exists(current):
        return "dir" if os.path.isdir(current) else "file"
    return None


def is_size(a: argparse.Action) -> bool:
    return (_flag(a) is not None and _type_name(a) == "int" and a.nargs in (None, "?", "+", "*")
            and _SIZE.search(a.dest) is not None and _NOT_SIZE.search(a.dest) is None)


def _values(argv: Sequence[str], flag: str) -> Optional[List[str]]:
    if flag not in argv:
        return None
    i = list(argv).index(flag) + 1
    out = []
    while i < len(argv) and not argv[i].startswith("--"):
        out.append(argv[i])
        i += 1
    return out


def _with(argv: Sequence[str], flag: str, *values: str) -> List[str]:
    """``argv`` with ``flag`` (and its values) replaced by ``flag values``."""
    out, i = [], 0
    argv = list(argv)
    while i < len(argv):
        if argv[i] == flag:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        out.append(argv[i])
        i += 1
    return out + [flag, *values]


def base_argv(module: str, parser: argparse.ArgumentParser, f: Fixtures) -> List[str]:
    """A working argument list: the table's, else the required flags filled in."""
    if module in BASE:
        return BASE[module](f)
    argv: List[str] = []
    for a in parser._actions:
        flag = _flag(a)
        if not a.required or flag is None:
            continue
        if a.choices:
            value = str(list(a.choices)[0])
        elif is_output(a):
            value = "{out}/" + a.dest
        elif _type_name(a) == "existing_dir" or re.search(r"dir|path", a.dest):
            value = f.empty_dir
        elif is_input_path(a):
            value = f.a_file
        elif _type_name(a) in _NUMERIC_TYPES:
            value = "1"
        else:
            value = "x"
        argv += [flag, value]
    return argv


def cases(module: str, parser: argparse.ArgumentParser, f: Fixtures) -> List[Tuple[str, List[str]]]:
    """(case id, argv) for every class of bad input the parser accepts."""
    base = base_argv(module, parser, f)
    out: List[Tuple[str, List[str]]] = []
    for a in parser._actions:
        flag = _flag(a)
        if flag is None:
            continue
        if is_input_path(a):
            current = (_values(base, flag) or [None])[0]
            missing = os.path.join(f.root, "no", "such", f"path{next(_UNIQUE)}")  # never created by an earlier case
            out.append((f"missing-path {flag}", _with(base, flag, missing)))
            wants = expects(a, current)
            if wants == "dir":
                out.append((f"wrong-kind {flag}", _with(base, flag, f.a_file)))
            elif wants == "file":
                out.append((f"wrong-kind {flag}", _with(base, flag, f.empty_dir)))
            if wants != "dir":
                out.append((f"junk-file {flag}", _with(base, flag, f.junk)))
            usable = current is not None and (os.path.isfile(os.path.join(current, "model.safetensors"))
                                              or (current.endswith(".safetensors") and os.path.isfile(current)))
            if _MODEL.match(a.dest) and usable:
                for kind in ("hostile", "truncated", "nan"):
                    out.append((f"{kind}-weights {flag}", _with(base, flag, f.variant(current, kind))))
            elif _MODEL.match(a.dest) and a.dest != "model":
                source = f"{SAMPLES}/synthetic_vit"  # no working model here: the ViT copy's folder stands in
                for kind in ("hostile", "truncated", "nan"):
                    out.append((f"{kind}-weights {flag}", _with(base, flag, f.variant(source, kind))))
        if is_output(a):
            out.append((f"unwritable-output {flag}", _with(base, flag, os.path.join(f.a_file, "below", "out"))))
        if is_size(a):
            out.append((f"negative-size {flag}", _with(base, flag, "-1")))
            if _BOUNDED.match(a.dest):
                out.append((f"absurd-size {flag}", _with(base, flag, str(10 ** 12))))
        if flag == "--device":
            out.append(("device-meta", _with(base, flag, "meta")))
    return out


# --------------------------------------------------------------------------
# Running one case in-process
# --------------------------------------------------------------------------
class _Alarm(BaseException):
    """Raised by SIGALRM: the script started work instead of refusing."""


def _tree_digest(paths: Sequence[str]) -> Dict[str, str]:
    digest = {}
    for top in paths:
        for dirpath, _, filenames in os.walk(top):
            for name in filenames:
                p = os.path.join(dirpath, name)
                with open(p, "rb") as fh:
                    digest[p] = hashlib.sha256(fh.read()).hexdigest()
    return digest


@contextlib.contextmanager
def _restored_process_state():
    threads, dtype, cwd, argv = torch.get_num_threads(), torch.get_default_dtype(), os.getcwd(), list(sys.argv)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        os.chdir(cwd)
        sys.argv = argv


def run_case(main: Callable, argv: List[str], alarm_s: int = ALARM_S) -> Tuple[Optional[int], str, Optional[str]]:
    """(exit status, captured stderr+stdout, escaped exception or None)."""
    code, err, out, escaped = run_captured(main, argv, alarm_s)
    return code, err + out, escaped


def run_captured(main: Callable, argv: List[str], alarm_s: int = ALARM_S
                 ) -> Tuple[Optional[int], str, str, Optional[str]]:
    """(exit status, captured stderr, captured stdout, escaped exception or None)."""
    err, out = io.StringIO(), io.StringIO()
    escaped = None
    code: Optional[int] = None

    def ring(signum, frame):
        raise _Alarm()

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(alarm_s)
    try:
        with _restored_process_state(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                result = main(argv)
                code = int(result) if isinstance(result, (int, bool)) and not isinstance(result, bool) else 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _Alarm:
        escaped = f"still running after {alarm_s} s (started work instead of refusing)"
    except BaseException as exc:  # noqa: B902 - a traceback is what the matrix looks for
        escaped = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue(), out.getvalue(), escaped


def matrix_failures(module: str, main: Callable, parser: argparse.ArgumentParser, f: Fixtures,
                    work: str) -> List[str]:
    """Every case of ``module`` run; a list of what went wrong (empty: all refused cleanly)."""
    failures = []
    watched = [f.scenes, f.features, f.junk, os.path.join(f.root, "variants"), SAMPLES]
    before = _tree_digest([p for p in watched if os.path.exists(p)])
    for n, (case, argv) in enumerate(cases(module, parser, f)):
        if any(m == module and case.startswith(prefix) for (m, prefix) in NOT_BAD):
            continue
        out_dir = os.path.join(work, f"case{n}")
        argv = [a.replace("{out}", out_dir) for a in argv]
        code, text, escaped = run_case(main, argv)
        where = f"{module} [{case}] {' '.join(argv)}"
        if escaped is not None:
            failures.append(f"{where}: {escaped}")
        elif "Traceback (most recent call last)" in text:
            failures.append(f"{where}: printed a traceback")
        elif code == 0:
            failures.append(f"{where}: exit 0 (accepted bad input); output tail: {text.strip()[-200:]!r}")
        if os.path.exists(f.marker):
            failures.append(f"{where}: the hostile pickle ran (marker created)")
            os.rmdir(f.marker)
    after = _tree_digest([p for p in watched if os.path.exists(p)])
    changed = sorted(p for p in before if after.get(p) != before[p])
    if changed:
        failures.append(f"{module}: existing files changed or removed: {', '.join(changed[:5])}")
    return failures


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------
def test_every_script_has_a_parser():
    """A script without build_parser() would escape the matrix."""
    missing = sorted(set(scripts_with_main()) - set(SCRIPTS) - NO_PARSER)
    assert not missing, f"scripts without build_parser()/main(): {missing}"
    assert len(SCRIPTS) >= 25, SCRIPTS


@pytest.mark.parametrize("module", SCRIPTS)
def test_script_refuses_every_bad_input_in_one_line(module, fx, tmp_path):
    mod = importlib.import_module(module)
    failures = matrix_failures(module, mod.main, mod.build_parser(), fx, str(tmp_path))
    assert not failures, "\n".join(failures)


# The cheap working argument lists run for real: the cases built on them reach
# the code they target instead of failing on the working part (the others were
# checked by hand when added: class_specificity, imagenet_seg_eval, the VQA
# and DETR benchmarks, demo_perturbation each finish in 4-90 s).
QUICK_BASES = ("baselines.ViT.visualize", "baselines.ViT.generate_visualizations", "baselines.LXMERT.explain_vqa",
               "BERT_explainability.explain_generation", "data.scenes", "data.synthetic")


@pytest.mark.parametrize("module", QUICK_BASES)
def test_working_arguments_work(module, fx, tmp_path):
    mod = importlib.import_module(module)
    argv = [a.replace("{out}", str(tmp_path / "out")) for a in BASE[module](fx)]
    code, text, escaped = run_case(mod.main, argv, alarm_s=120)
    assert escaped is None and code == 0, f"{module} {' '.join(argv)}: exit {code}, {escaped}; {text[-300:]}"


def _broken_script(tmp_path) -> types.ModuleType:
    """A new script written without the project's plumbing: its checkpoint is
    unpickled with weights_only=False, a missing file raises, sizes are unchecked."""
    mod = types.ModuleType("broken_script")

    def build_parser():
        p = argparse.ArgumentParser()
        p.add_argument("--weights", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--batch-size", type=int, default=2)
        p.add_argument("--device", default="cpu")
        return p

    def main(argv=None):
        args = build_parser().parse_args(argv)
        if args.weights.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(args.weights)
        else:
            state = torch.load(args.weights, weights_only=False)  # the mistake the one loader exists to prevent
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(str(len(state) * args.batch_size))
        return 0

    mod.build_parser, mod.main = build_parser, main
    return mod


def test_a_broken_script_fails_the_matrix(fx, tmp_path):
    weights = os.path.join(fx.root, "broken-ok.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2, 2)}, weights)
    mod = _broken_script(tmp_path)
    BASE["broken_script"] = lambda f: ["--weights", weights, "--out", "{out}/r.txt"]
    try:
        failures = matrix_failures("broken_script", mod.main, mod.build_parser(), fx, str(tmp_path))
    finally:
        del BASE["broken_script"]
    text = "\n".join(failures)
    assert "[missing-path --weights]" in text and "FileNotFoundError" in text  # a traceback escaped
    assert "[hostile-weights --weights]" in text and "marker created" in text  # the pickle ran
    assert "[negative-size --batch-size]" in text and "exit 0" in text
    assert not os.path.exists(fx.marker)


# --------------------------------------------------------------------------
# Run folders (issue 27 item 2): every benchmark that writes results, killed
# and resumed, run twice at once, rerun over finished results
# --------------------------------------------------------------------------
class RunSpec:
    """How one benchmark is run on the smallest inputs: ``argv`` (``{out}``:
    its run folder), the result files compared after a resume (relative to
    ``{out}``), ``other``: flags that change the run's identity (a rerun with
    them must be refused), ``resume``: the flags that continue a killed run
    (none: the script resumes a run of the same identity by itself)."""

    def __init__(self, argv: Callable[[Fixtures], List[str]], results: Sequence[str], other: Sequence[str],
                 resume: Sequence[str] = ("--resume",)):
        self.argv, self.results, self.other, self.resume = argv, tuple(results), list(other), list(resume)


RUN_FOLDER: Dict[str, RunSpec] = {
    "data.scenes": RunSpec(
        lambda f: ["--out-dir", "{out}", "--count", "2", "--size", "48", "--formats", "coco", "vqa", "scenes",
                   "--quiet"],
        ["annotations/instances_val.json", "annotations/v2_OpenEnded_scenes_val_questions.json",
         "annotations/v2_scenes_val_annotations.json", "val_scenes.json", "val/000000.png", "val/000001.png"],
        ["--seed", "5"]),
    "baselines.ViT.imagenet_seg_eval": RunSpec(
        lambda f: ["--imagenet-seg-path", f"{f.scenes}/val_gtsegs.mat", "--weights", f"{SAMPLES}/synthetic_scenes_vit",
                   "--method", "rollout", "--limit", "2", "--batch-size", "1", "--save-every", "1",
                   "--num-overlays", "0", "--device", "cpu", "--output-dir", "{out}", "--quiet"],
        ["results.json", "results_rollout.json"], ["--limit", "1"]),
    "baselines.ViT.class_specificity": RunSpec(
        lambda f: ["--annotations", f"{f.scenes}/annotations/instances_val.json", "--image-dir", f"{f.scenes}/val",
                   "--weights", f"{SAMPLES}/synthetic_scenes_vit", "--methods", "rollout", "--limit", "2",
                   "--batch-size", "1", "--num-overlays", "0", "--device", "cpu", "--output-dir", "{out}", "--quiet"],
        ["results.json", "per_image.jsonl"], ["--limit", "1"]),
    "baselines.ViT.perturbation_eval": RunSpec(
        lambda f: ["--results", _maps(f), "--pos", "--batch-size", "1", "--num-workers", "0", "--device", "cpu",
                   "--output-dir", "{out}"],
        ["results.json", "positive/model_hits.npy", "positive/perturbations_hits.npy", "positive/tied_share.npy"],
        ["--tie-seed", "7"]),
    "baselines.LXMERT.vqa_perturbation": RunSpec(
        lambda f: ["--model-dir", f"{SAMPLES}/synthetic_scenes_lxmert", "--scenes", "2", "--methods", "random",
                   "--batch-size", "1", "--device", "cpu", "--output-dir", "{out}"],
        ["results.json"], ["--seed", "3"], resume=()),
    "baselines.DETR.detr_mask_eval": RunSpec(
        lambda f: ["--model-dir", f"{SAMPLES}/synthetic_scenes_detr", "--scenes", "2", "--methods", "rollout",
                   "--batch-size", "1", "--device", "cpu", "--output-dir", "{out}"],
        ["results.json"], ["--threshold", "0.3"], resume=()),
    "baselines.DETR.detr_masks": RunSpec(
        lambda f: ["--model-dir", f"{SAMPLES}/synthetic_scenes_detr", "--image", f"{f.scenes}/val/000000.png",
                   "--image", f"{f.scenes}/val/000001.png", "--method", "rollout", "--batch-size", "1",
                   "--threshold", "0", "--shortest", "48", "--longest", "64", "--device", "cpu",
                   "--out", "{out}/m.png"],
        ["m.json", "m-0.png", "m-1.png"], ["--alpha", "0.3"]),
    "baselines.faithfulness_eval": RunSpec(
        lambda f: ["--weights", f"{SAMPLES}/synthetic_vit", "--synthetic", "2", "--limit", "2", "--batch-size", "1",
                   "--steps", "2", "--methods", "rollout", "--no-control", "--road-limit", "0",
                   "--randomization-limit", "0", "--device", "cpu", "--output-dir", "{out}", "--quiet"],
        ["results.json"], ["--steps", "3"], resume=()),
}

# Benchmarks by the rule below that the run-folder cases do not run here, and why.
RUN_FOLDER_ELSEWHERE: Dict[str, str] = {
    "baselines.ViT.generate_visualizations": "tests/test_generate_visualizations.py: SIGKILL then resume, torchrun",
    "baselines.ViT.demo_perturbation": "a driver of generate_visualizations and perturbation_eval, which are here",
    "BERT_rationale_benchmark.models.pipeline.bert_pipeline": "tests/test_adversarial_bert_pipeline.py",
    "baselines.ViT.pertubation_eval_from_hdf5": "the published name of perturbation_eval (its parser and main)",
}

# what differs between two runs of the same results: timings (and any key seconds*) and the machine
VOLATILE = {"date", "machine", "threads", "load_before", "load_after"}


def is_benchmark(module: str, parser: argparse.ArgumentParser, source: str) -> bool:
    """A script that writes results a later run could resume, reuse or
    replace: a --resume or --overwrite flag, or results.json / results.hdf5."""
    flags = {s for a in parser._actions for s in a.option_strings}
    return bool(flags & {"--resume", "--overwrite"}) or "results.json" in source or "results.hdf5" in source


def _source(module: str) -> str:
    with open(importlib.import_module(module).__file__, encoding="utf-8") as fh:
        return fh.read()


def _comparable(path: str, folder: str):
    """A result file's content without the timings and with its run folder's
    path written ``{out}`` (JSON, JSON lines), or its bytes."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in VOLATILE and not k.startswith("seconds")}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        if isinstance(obj, str):
            return obj.replace(folder, "{out}")
        return obj
    with open(path, "rb") as fh:
        data = fh.read()
    if path.endswith(".json"):
        return strip(json.loads(data))
    if path.endswith(".jsonl"):
        return [strip(json.loads(line)) for line in data.splitlines() if line.strip()]
    return data


@contextlib.contextmanager
def _counting_writes(module, stop_at: Optional[int] = None):
    """Count the finished atomic writes (every run folder writes through
    modules.cli.atomic_write_bytes); with ``stop_at`` the process stops
    itself (SIGSTOP) right after that many."""
    from modules import cli
    original = cli.atomic_write_bytes
    count = [0]

    def counted(path, data):
        out = original(path, data)
        count[0] += 1
        if stop_at is not None and count[0] == stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)
        return out
    patched = [m for m in (cli, module) if getattr(m, "atomic_write_bytes", None) is original]
    for m in patched:
        m.atomic_write_bytes = counted
    try:
        yield count
    finally:
        for m in patched:
            m.atomic_write_bytes = original


def _run(main: Callable, argv: List[str]) -> Tuple[Optional[int], str, str, Optional[str]]:
    """(exit status, stderr, stdout, escaped exception) of a run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same rounding in the forked run and here
    try:
        return run_captured(main, argv, alarm_s=300)
    finally:
        torch.set_num_threads(threads)


def _refusal_problem(code: Optional[int], err: str, out: str, escaped: Optional[str]) -> Optional[str]:
    """What is wrong with a refusal (None: exit != 0, one line on stderr, no traceback)."""
    if escaped or "Traceback" in err + out:
        return escaped or "printed a traceback"
    if code == 0:
        return "exit 0"
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        return f"refused in {len(lines)} lines on stderr, not one: {err.strip()!r}"
    return None


def _stopped_run(module, main: Callable, argv: List[str], stop_at: int) -> int:
    """Fork a run that stops itself after ``stop_at`` finished writes; its pid
    once stopped (it holds whatever lock the script takes)."""
    pid = os.fork()
    if pid == 0:  # the child: no output, no return into pytest
        code = 1
        try:
            signal.alarm(0)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            torch.set_num_threads(1)
            with _counting_writes(module, stop_at):
                code = main(argv) or 0
        finally:
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        return -1
    return pid


def _finish(pid: int) -> None:
    if pid > 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def run_folder_failures(module: str, mod, spec: RunSpec, f: Fixtures, work: str) -> List[str]:
    """The run-folder cases of one benchmark; what went wrong (empty: none)."""
    failures: List[str] = []

    def argv_in(folder: str, *extra: str) -> List[str]:
        return [a.replace("{out}", folder) for a in spec.argv(f)] + list(extra)

    def results_of(folder: str):
        return {name: _comparable(os.path.join(folder, name), folder) if os.path.isfile(os.path.join(folder, name))
                else None for name in spec.results}

    # an uninterrupted run: the reference, and how many writes it makes
    ref = os.path.join(work, "reference")
    with _counting_writes(mod) as count:
        code, err, out, escaped = _run(mod.main, argv_in(ref))
    if code != 0 or escaped:
        return [f"{module}: the tiny run failed (exit {code}, {escaped}): {(err + out).strip()[-300:]}"]
    expected = results_of(ref)
    missing = [n for n, v in expected.items() if v is None]
    if missing:
        return [f"{module}: the tiny run did not write {', '.join(missing)}"]
    # a run stopped after half its writes, then a second run into its folder while it holds it
    folder = os.path.join(work, "run")
    pid = _stopped_run(mod, mod.main, argv_in(folder), max(1, count[0] // 2))
    try:
        if pid < 0:
            failures.append(f"{module}: the forked run ended before its write {max(1, count[0] // 2)}")
        else:
            before = _tree_digest([folder])
            code, err, out, escaped = _run(mod.main, argv_in(folder, *spec.resume))
            problem = _refusal_problem(code, err, out, escaped)
            if problem == "exit 0":
                failures.append(f"{module} [concurrent]: a second run into the folder of a running one was accepted")
            elif problem:
                failures.append(f"{module} [concurrent]: {problem}")
            if _tree_digest([folder]) != before:
                failures.append(f"{module} [concurrent]: the refused run changed files of the running one")
    finally:
        _finish(pid)  # SIGKILL
    # the killed run resumed: the same results as the uninterrupted run
    code, err, out, escaped = _run(mod.main, argv_in(folder, *spec.resume))
    if code != 0 or escaped:
        failures.append(f"{module} [kill-resume]: the resumed run failed (exit {code}, {escaped}): "
                        f"{(err + out).strip()[-300:]}")
    else:
        got = results_of(folder)
        differ = [n for n in spec.results if got[n] != expected[n]]
        if differ:
            failures.append(f"{module} [kill-resume]: results differ from an uninterrupted run's: {', '.join(differ)}")
    # reruns over the finished results: the same arguments (refused, or exit 0 reusing them unchanged), other
    # arguments (refused in one line), nothing finished changed either way
    finished = results_of(folder)
    for case, extra in (("rerun", []), ("rerun-other-args", spec.other)):
        code, err, out, escaped = _run(mod.main, argv_in(folder, *extra))
        problem = _refusal_problem(code, err, out, escaped)
        if problem == "exit 0" and case == "rerun-other-args":
            failures.append(f"{module} [{case}]: another run's results replaced without --overwrite")
        elif problem and problem != "exit 0":
            failures.append(f"{module} [{case}]: {problem}")
        now = results_of(folder)  # timings aside: a rerun that reuses them may write its own
        changed = [n for n in spec.results if now[n] != finished[n]]
        if changed:
            failures.append(f"{module} [{case}]: finished results changed: {', '.join(changed)}")
    return failures


def test_every_benchmark_is_on_the_run_folder():
    """A script that writes results (by the rule of is_benchmark) runs the
    run-folder cases here, or says where they are covered."""
    benchmarks = [m for m in SCRIPTS if is_benchmark(m, importlib.import_module(m).build_parser(), _source(m))]
    missing = sorted(set(benchmarks) - set(RUN_FOLDER) - set(RUN_FOLDER_ELSEWHERE))
    assert not missing, f"benchmarks without the run-folder cases: {missing}"
    assert set(RUN_FOLDER) <= set(benchmarks), sorted(set(RUN_FOLDER) - set(benchmarks))


@pytest.mark.parametrize("module", sorted(RUN_FOLDER))
def test_run_folder_kill_resume_concurrent_rerun(module, fx, tmp_path):
    mod = importlib.import_module(module)
    failures = run_folder_failures(module, mod, RUN_FOLDER[module], fx, str(tmp_path))
    assert not failures, "\n".join(failures)


def test_a_script_without_the_run_folder_fails_it(fx, tmp_path):
    """A copy of data/scenes.py that writes its files without the run-folder
    helper (no lock, no identity, no refusal): a benchmark by the rule, not
    in the table, and its cases fail."""
    pkg = tmp_path / "broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    source = _source("data.scenes")
    call = "        written = write_run(args, cfg)\n"
    assert call in source
    (pkg / "scenes_copy.py").write_text(source.replace(call, (
        "        written = write_dataset(args.out_dir, args.split, args.count, args.seed, cfg, args.formats,\n"
        "                                args.mask_format, args.questions_per_type, args.start, quiet=args.quiet)\n")))
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("broken_pkg.scenes_copy")
        assert is_benchmark("broken_pkg.scenes_copy", mod.build_parser(), source)
        assert "broken_pkg.scenes_copy" not in RUN_FOLDER
        failures = run_folder_failures("broken_pkg.scenes_copy", mod, RUN_FOLDER["data.scenes"], fx,
                                       str(tmp_path / "work"))
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("broken_pkg.scenes_copy", "broken_pkg"):
            sys.modules.pop(name, None)
    text = "\n".join(failures)
    assert "[concurrent]: a second run into the folder of a running one was accepted" in text, text
    assert "[rerun-other-args]: another run's results replaced without --overwrite" in text, text
