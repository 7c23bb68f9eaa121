"""Run the notebooks top to bottom in a fresh kernel, save them with their outputs, or check them.

The notebooks are committed with their outputs, so that they render where
people browse the repository.  This script is how those outputs are made,
and ``tests/test_notebooks.py`` uses the same functions to execute every
notebook in CI and to check that the committed outputs are not stale::

    python notebooks/execute_notebooks.py            # execute and save every notebook
    python notebooks/execute_notebooks.py --check    # execute, compare, save nothing

The kernel is always this interpreter (``sys.executable``, whatever kernel
specs are installed elsewhere), started in the notebook's own folder, as
Jupyter starts it.

Staleness (:func:`stale_reasons`): a saved notebook records the sha256 of its
code cells (:data:`META_KEY`), so code edited after the last run is caught
at once; its code cells must have been run in order (execution counts
1, 2, 3, ...); and a fresh run must produce the same outputs cell by cell:
the same output kinds, the same number of pictures, and the same text once
every number is masked (so float noise between machines does not count,
while a changed message, class name or word does; a figure's size and panel
count are compared as they are).  Standard error
(warnings, progress bars) is not compared.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import nbformat
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

__all__ = ["NOTEBOOK_DIR", "META_KEY", "notebook_paths", "code_hash", "execute", "summarize", "stale_reasons",
           "save_executed", "build_parser", "main"]

NOTEBOOK_DIR = Path(__file__).resolve().parent
META_KEY = "transformer_explainability"
"""Notebook metadata key of what this script records (code hash, run time)."""
KERNEL_NAME = "python3"
PICTURE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")
_PROBE = ("import sys as _sys, resource as _r; _u = _r.getrusage(_r.RUSAGE_SELF); "
          "print(_sys.executable); print(_u.ru_utime + _u.ru_stime)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FIGURE = re.compile(r"<Figure size [0-9.]+x[0-9.]+ with [0-9]+ Axes>")


class NotebookError(Exception):
    """A cell raised, timed out or killed the kernel (one readable message)."""


def notebook_paths(folder: Path = NOTEBOOK_DIR) -> List[Path]:
    """Every ``*.ipynb`` of ``folder`` (checkpoints excluded), sorted."""
    return sorted(p for p in Path(folder).glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def code_hash(nb) -> str:
    """sha256 of the code cells' sources, in order (markdown edits do not count)."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode("utf-8"))
            h.update(b"\x00")
    return h.hexdigest()


class _ThisInterpreter(KernelSpecManager):
    """Kernel specs whose ``python3`` is always ``sys.executable`` (the
    project's .venv when pytest runs from it), never a kernel spec that some
    other Python installed into a Jupyter path."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                          display_name="Python 3 (ipykernel)", language="python", resource_dir=str(NOTEBOOK_DIR))


def execute(path: Path, timeout: int = 600) -> Tuple["nbformat.NotebookNode", float, float, str]:
    """Run notebook ``path`` top to bottom in a fresh kernel started in its folder.

    Returns
    -------
    (notebook, seconds, cpu_seconds, kernel_executable)
        The executed copy (the file is not written), the wall time, the
        kernel's CPU time (user + system, all threads: on a busy machine a
        better guide than the wall time to what a dedicated one needs), and
        the interpreter the kernel ran.

    Raises
    ------
    NotebookError
        A cell raised (the message names the cell and the error), a cell ran
        longer than ``timeout`` seconds, or the kernel died.
    """
    nb = nbformat.read(str(path), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))  # which interpreter ran the kernel; removed below
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=_ThisInterpreter())
    client = NotebookClient(nb, km=km, timeout=timeout, kernel_name=KERNEL_NAME, allow_errors=False,
                            record_timing=False, resources={"metadata": {"path": str(Path(path).parent)}})
    running = [-1]  # the cell being executed (nbclient's hook), named when it fails
    client.on_cell_execute = lambda cell, cell_index: running.__setitem__(0, cell_index)
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        error = f"{exc.ename}: {_first_line(exc.evalue)}" if getattr(exc, "ename", None) else _first_line(str(exc))
        raise NotebookError(f"{_where(path, nb, running[0])} raised {error}") from None
    except CellTimeoutError:
        raise NotebookError(f"{_where(path, nb, running[0])} ran longer than {timeout} s (--timeout)") from None
    except DeadKernelError as exc:
        raise NotebookError(f"{_where(path, nb, running[0])}: the kernel died ({_first_line(str(exc))})") from None
    seconds = time.perf_counter() - start
    probe = nb.cells.pop()
    lines = "".join(o.get("text", "") for o in probe.outputs if o.output_type == "stream").strip().splitlines()
    if len(lines) != 2:
        raise NotebookError(f"{Path(path).name}: the kernel probe printed {lines!r}")
    return nb, seconds, float(lines[1]), lines[0]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in _ANSI.sub("", str(text)).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _where(path: Path, nb, index: int) -> str:
    """``<notebook>, cell <n> (`<its first line>`)``: where a run failed, in one line."""
    if not 0 <= index < len(nb.cells):
        return Path(path).name
    first = _first_line(nb.cells[index].source)
    return f"{Path(path).name}, cell {index + 1} (`{first[:60]}{'...' if len(first) > 60 else ''}`)"


def _mask(text: str) -> str:
    """Text with every number and memory address replaced by '#', all white space runs made one blank."""
    text = _ADDRESS.sub("#", text)
    text = _NUMBER.sub("#", text)
    return re.sub(r"\s+", " ", text).strip()


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def summarize(nb) -> List[List[Tuple]]:
    """Per code cell, what its outputs show, robust to float noise:
    ``("stdout", masked text)``, ``("data", mime types, masked text/plain,
    masked text/html, pictures)`` or ``("error", name)``; stderr is left out.
    A matplotlib figure's text (``<Figure size 1040x560 with 8 Axes>``) is
    kept unmasked: its size and number of panels follow from the code, so a
    grid that gained a panel (a new method, say) is stale."""
    cells = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        items: List[Tuple] = []
        for out in cell.get("outputs", []):
            kind = out.get("output_type")
            if kind == "stream":
                if out.get("name") == "stdout":
                    text = _text(out.get("text", ""))
                    if items and items[-1][0] == "stdout":  # one print may arrive in several messages
                        items[-1] = ("stdout", items[-1][1] + text)
                    else:
                        items.append(("stdout", text))
            elif kind in ("display_data", "execute_result"):
                data = out.get("data", {})
                pictures = sum(1 for m in data if m in PICTURE_TYPES)
                plain = _text(data.get("text/plain", ""))
                if not _FIGURE.fullmatch(plain):  # a figure's size and panel count are kept: they follow the code
                    plain = _mask(plain)
                items.append(("data", tuple(sorted(data)), plain,
                              _mask(_text(data.get("text/html", ""))), pictures))
            elif kind == "error":
                items.append(("error", out.get("ename", "")))
        cells.append([("stdout", _mask(item[1])) if item[0] == "stdout" else item for item in items])
    return cells


def _short(item: Tuple) -> str:
    s = repr(item)
    return s if len(s) <= 300 else s[:300] + "...)"


def stale_reasons(committed, executed=None) -> List[str]:
    """Why the committed notebook's outputs are stale (empty list: fresh).

    ``committed`` alone is checked for the recorded code hash and the run
    order; with ``executed`` (a fresh run of the same code) the outputs are
    compared cell by cell (:func:`summarize`).
    """
    reasons = []
    recorded = committed.metadata.get(META_KEY, {}).get("code_sha256")
    if recorded is None:
        reasons.append("no code hash recorded: the notebook was not saved by notebooks/execute_notebooks.py")
    elif recorded != code_hash(committed):
        reasons.append("code cells changed since the outputs were made")
    counts = [c.get("execution_count") for c in committed.cells if c.cell_type == "code"]
    if counts != list(range(1, len(counts) + 1)):
        reasons.append(f"code cells not run once each, top to bottom, in a fresh kernel (execution counts {counts})")
    if executed is not None:
        old, new = summarize(committed), summarize(executed)
        if len(old) != len(new):
            reasons.append(f"{len(old)} code cells committed, {len(new)} executed")
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                detail = next(((x, y) for x, y in zip(a, b) if x != y), None)
                where = (f"first difference: committed {_short(detail[0])} vs fresh {_short(detail[1])}" if detail
                         else f"{len(a)} outputs committed, {len(b)} fresh")
                reasons.append(f"code cell {i + 1}: outputs differ from a fresh run ({where})")
    return reasons


def _coalesce_streams(nb) -> None:
    """Merge consecutive outputs of one stream (a print the kernel sent in several messages), in place."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for out in cell.outputs:
            if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                    and merged[-1].name == out.name):
                merged[-1].text = _text(merged[-1].text) + _text(out.text)
            else:
                merged.append(out)
        cell.outputs = merged


def save_executed(nb, path: Path, seconds: float, cpu_seconds: float) -> None:
    """Write the executed notebook (streams coalesced) with its code hash (and its run time, for information)."""
    nb = copy.deepcopy(nb)
    _coalesce_streams(nb)
    nb.metadata[META_KEY] = {"code_sha256": code_hash(nb), "wall_seconds": round(seconds),
                             "kernel_cpu_seconds": round(cpu_seconds),
                             "written_by": "notebooks/execute_notebooks.py"}
    nbformat.validate(nb)
    nbformat.write(nb, str(path))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Execute the notebooks top to bottom in a fresh kernel and save them "
                                "with their outputs (or only check that the saved outputs are fresh).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("notebooks", nargs="*", default=None,
                   help="notebook files; none: every notebook in notebooks/")
    p.add_argument("--check", action="store_true",
                   help="execute and compare with the saved outputs; write nothing, exit 1 if stale")
    p.add_argument("--timeout", type=int, default=600, help="seconds a single cell may run")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("error: --timeout must be positive", file=sys.stderr)
        return 2
    paths = [Path(p) for p in args.notebooks] if args.notebooks else notebook_paths()
    for p in paths:
        if not p.is_file() or p.suffix != ".ipynb":
            print(f"error: not a notebook file: {p}", file=sys.stderr)
            return 2
    failed = False
    for path in paths:
        try:
            committed = nbformat.read(str(path), as_version=4)
            nbformat.validate(committed)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, nbformat.ValidationError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            print(f"error: cannot read {path} as a notebook: {first}", file=sys.stderr)
            return 2
        try:
            nb, seconds, cpu, executable = execute(path, args.timeout)
        except NotebookError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"\ninterrupted while running {path.name}; it was not saved", file=sys.stderr)
            return 130
        if args.check:
            reasons = stale_reasons(committed, nb)
            failed |= bool(reasons)
            print(f"{path.name}: {seconds:.0f} s wall, {cpu:.0f} s kernel CPU, " + ("stale:\n  " + "\n  ".join(reasons) if reasons else "fresh"))
        else:
            save_executed(nb, path, seconds, cpu)
            print(f"{path.name}: {seconds:.0f} s wall, {cpu:.0f} s kernel CPU, kernel {executable}, saved")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
