"""Every notebook in notebooks/ runs top to bottom in a fresh kernel, and its committed outputs are fresh.

The notebooks run with nbclient in a fresh kernel of this interpreter (the
project's .venv under ``make test``), started in notebooks/ as Jupyter
starts it; any cell that raises fails the test with the cell and the error.
The committed outputs must match a fresh run (``notebooks/execute_notebooks.py``
explains the comparison: output kinds, picture counts and text with every
number masked, plus a hash of the code cells).  Refresh them with
``python notebooks/execute_notebooks.py``.
"""
import copy
import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("execute_notebooks", REPO / "notebooks" / "execute_notebooks.py")
en = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(en)

NOTEBOOKS = en.notebook_paths()


def _notebook(*cells):
    """A small notebook: str -> code cell, ("md", text) -> markdown cell."""
    nb = nbformat.v4.new_notebook()
    for c in cells:
        nb.cells.append(nbformat.v4.new_markdown_cell(c[1]) if isinstance(c, tuple) else nbformat.v4.new_code_cell(c))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def test_the_issue_13_notebooks_are_there():
    names = {p.name for p in NOTEBOOKS}
    assert {"BERT_explainability.ipynb", "ViT_explainability.ipynb", "Multimodal_explainability.ipynb"} <= names


# -- the checker itself, on hand-made notebooks (no kernel) ---------------------------------------
def _executed_like(nb):
    """Pretend-run: execution counts 1..n and the code hash recorded, as save_executed does."""
    nb = copy.deepcopy(nb)
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
    nb.metadata[en.META_KEY] = {"code_sha256": en.code_hash(nb)}
    return nb


def _stdout(text):
    return nbformat.v4.new_output("stream", name="stdout", text=text)


def _png(n=1):
    return nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=" * n, "text/plain": "<Figure size 640x480 with 1 Axes>"})


def test_stale_reasons_ignore_float_noise_and_stderr_but_not_words_or_pictures():
    base = _executed_like(_notebook("print(acc)", ("md", "text"), "plot()"))
    base.cells[0].outputs = [_stdout("held-out accuracy: 0.9375 on 64 reviews\n")]
    base.cells[2].outputs = [_png()]
    assert en.stale_reasons(base) == []
    assert en.stale_reasons(base, copy.deepcopy(base)) == []

    noisy = copy.deepcopy(base)
    noisy.cells[0].outputs = [_stdout("held-out accuracy: 0.9219 on 64 reviews\n"),
                              nbformat.v4.new_output("stream", name="stderr", text="a warning /some/path.py:3\n")]
    noisy.cells[2].outputs[0].data["image/png"] = "AAAA"  # other pixels, same picture count
    assert en.stale_reasons(base, noisy) == []

    split = copy.deepcopy(base)  # one print the kernel sent in pieces, a number cut in two, stderr in between
    split.cells[0].outputs = [_stdout("held-out accuracy:"), _stdout(" 0.9"),
                              nbformat.v4.new_output("stream", name="stderr", text="warning\n"),
                              _stdout("219 on 64 reviews\n")]
    assert en.stale_reasons(base, split) == []

    for change in ("words", "picture", "panels", "kind"):
        fresh = copy.deepcopy(base)
        if change == "words":
            fresh.cells[0].outputs = [_stdout("held-out accuracy: 0.9375 on 64 films\n")]
        elif change == "picture":
            fresh.cells[2].outputs = [_png(), _png()]
        elif change == "panels":  # the same picture count, a grid with one more panel
            fresh.cells[2].outputs[0].data["text/plain"] = "<Figure size 640x480 with 2 Axes>"
        else:
            fresh.cells[0].outputs = [nbformat.v4.new_output("error", ename="ValueError", evalue="x", traceback=[])]
        reasons = en.stale_reasons(base, fresh)
        cell = "code cell 2:" if change in ("picture", "panels") else "code cell 1:"
        assert len(reasons) == 1 and reasons[0].startswith(cell), (change, reasons)


def test_stale_reasons_catch_edited_code_and_out_of_order_runs():
    base = _executed_like(_notebook("a = 1", ("md", "m"), "print(a)"))
    edited = copy.deepcopy(base)
    edited.cells[2].source = "print(a + 1)"
    assert en.stale_reasons(edited) == ["code cells changed since the outputs were made"]
    markdown_only = copy.deepcopy(base)
    markdown_only.cells[1].source = "other words"
    assert en.stale_reasons(markdown_only) == []
    reordered = copy.deepcopy(base)
    reordered.cells[0].execution_count, reordered.cells[2].execution_count = 2, 1
    assert en.stale_reasons(reordered) == ["code cells not run once each, top to bottom, in a fresh kernel "
                                           "(execution counts [2, 1])"]
    unsaved = copy.deepcopy(base)
    del unsaved.metadata[en.META_KEY]
    assert "no code hash recorded" in en.stale_reasons(unsaved)[0]


def test_save_executed_records_the_code_hash_and_joins_split_prints(tmp_path):
    nb = _executed_like(_notebook("print('held-out accuracy', 0.9)"))
    del nb.metadata[en.META_KEY]
    nb.cells[0].outputs = [_stdout("held-out "), _stdout("accuracy 0.9\n")]
    en.save_executed(nb, tmp_path / "n.ipynb", seconds=1.0, cpu_seconds=0.5)
    saved = nbformat.read(str(tmp_path / "n.ipynb"), as_version=4)
    assert [o.text for o in saved.cells[0].outputs] == ["held-out accuracy 0.9\n"]
    assert en.stale_reasons(saved) == [] and en.stale_reasons(saved, nb) == []


def test_a_raising_cell_fails_with_the_error(tmp_path):
    path = tmp_path / "broken.ipynb"
    nbformat.write(_notebook("x = 1", "raise ValueError('cell two is broken')", "print('never')"), str(path))
    with pytest.raises(en.NotebookError) as exc:
        en.execute(path, timeout=120)
    # one line naming the notebook, the cell and its error, not the kernel's traceback (issue 27 item 6)
    assert str(exc.value) == ("broken.ipynb, cell 2 (`raise ValueError('cell two is broken')`) raised ValueError: "
                              "cell two is broken")


def test_a_cell_past_the_timeout_is_named_in_one_line(tmp_path):
    path = tmp_path / "slow.ipynb"
    nbformat.write(_notebook("x = 1", "import time; time.sleep(60)"), str(path))
    with pytest.raises(en.NotebookError) as exc:
        en.execute(path, timeout=2)
    assert str(exc.value) == "slow.ipynb, cell 2 (`import time; time.sleep(60)`) ran longer than 2 s (--timeout)"


# -- the real notebooks -----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=NOTEBOOKS, ids=lambda p: p.stem)
def run(request):
    """(path, committed notebook, freshly executed notebook, kernel interpreter): one run per notebook."""
    path = request.param
    committed = nbformat.read(str(path), as_version=4)
    try:
        executed, _, _, executable = en.execute(path)
    except en.NotebookError as exc:
        pytest.fail(str(exc), pytrace=False)
    return path, committed, executed, executable


def test_notebook_runs_top_to_bottom_in_this_interpreter(run):
    path, _, executed, executable = run
    assert Path(executable) == Path(sys.executable), f"{path.name} ran in {executable}, not {sys.executable}"
    errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    pictures = sum(1 for c in executed.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "display_data" and "image/png" in o.get("data", {}))
    assert pictures >= 3, f"{path.name}: {pictures} inline pictures"


def test_committed_outputs_are_fresh(run):
    path, committed, executed, _ = run
    reasons = en.stale_reasons(committed, executed)
    assert not reasons, (f"{path.name}: committed outputs are stale:\n  " + "\n  ".join(reasons)
                         + "\nrefresh them with: python notebooks/execute_notebooks.py " + path.name)
