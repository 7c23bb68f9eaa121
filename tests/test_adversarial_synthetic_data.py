"""data/synthetic.py's command line given bad numbers, an unusable --out and Ctrl-C (issue 15)."""
from __future__ import annotations

import os

import pytest

import data.synthetic as S


@pytest.mark.parametrize("flag, value", [("--size", "100000"), ("--size", "8"), ("--seed", "-1"),
                                         ("--n-val", "-5"), ("--n-train", "x")])
def test_bad_numbers_exit_2_before_writing(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        S.main(["--out", str(tmp_path / "o"), flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and flag in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_masks_that_do_not_fit_in_memory_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        S.main(["--out", str(tmp_path / "o"), "--n-val", "1000000", "--size", "1024"])
    assert e.value.code == 2 and "GiB" in capsys.readouterr().err


def test_out_under_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert S.main(["--out", str(blocker / "o"), "--n-val", "2", "--size", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and len(err.strip().splitlines()) == 1


def test_ctrl_c_exits_130_and_leaves_no_manifest(tmp_path, capsys, monkeypatch):
    real = S.generate_sample
    calls = []

    def interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(S, "generate_sample", interrupt)
    assert S.main(["--out", str(tmp_path), "--n-val", "5", "--size", "16", "--formats", "imagefolder"]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert len(err) == 1 and err[0].startswith("interrupted")
    assert not os.path.exists(tmp_path / "val" / "manifest.json")
