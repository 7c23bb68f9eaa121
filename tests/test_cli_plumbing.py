"""modules/cli.py: typed flags, devices, atomic files, one-line errors (issue 15)."""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from modules import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser(**types):
    p = argparse.ArgumentParser(prog="t")
    for name, t in types.items():
        p.add_argument(f"--{name}", type=t)
    return p


@pytest.mark.parametrize("t, good, bad", [
    (cli.positive_int, ["1", "7"], ["0", "-3", "1.5", "x", ""]),
    (cli.non_negative_int, ["0", "3"], ["-1", "nan"]),
    (cli.int_range(2, 4), ["2", "4"], ["1", "5"]),
    (cli.fraction, ["1", "0.25", "1e-9"], ["0", "1.01", "-0.5", "nan", "inf"]),
    (cli.probability, ["0", "1", "0.5"], ["-0.01", "1.5", "nan"]),
    (cli.finite_float, ["-3.5", "0"], ["nan", "inf", "-inf", "x"]),
    (cli.positive_float, ["1e-6"], ["0", "-1"]),
])
def test_typed_flags_accept_and_refuse(t, good, bad, capsys):
    p = _parser(x=t)
    for text in good:
        assert p.parse_args(["--x", text]).x == (int(text) if t in (cli.positive_int, cli.non_negative_int)
                                                 or t.__name__ == "int" else float(text))
    for text in bad:
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--x", text])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "argument --x" in err and "Traceback" not in err


def test_range_messages_name_the_rule(capsys):
    with pytest.raises(SystemExit):
        _parser(x=cli.positive_int).parse_args(["--x", "-2"])
    assert "must be positive, not -2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser(x=cli.fraction).parse_args(["--x", "0"])
    assert "must be in (0.0, 1.0]" in capsys.readouterr().err


def test_existing_paths(tmp_path, capsys):
    f = tmp_path / "f.txt"
    f.write_text("x")
    p = _parser(f=cli.existing_file, d=cli.existing_dir)
    assert p.parse_args(["--f", str(f), "--d", str(tmp_path)]).f == str(f)
    for argv, msg in ((["--f", str(tmp_path)], "not a file"), (["--d", str(f)], "not a directory"),
                      (["--f", str(tmp_path / "no")], "no such file")):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("value, kind, kw, ok", [
    (3, int, dict(minimum=1), True),
    (0, int, dict(minimum=1), False),
    (-8, int, dict(minimum=1), False),
    ("8", int, dict(minimum=1), False),
    (True, int, dict(minimum=0), False),
    (2.0, int, dict(minimum=0), False),
    (0.5, float, dict(minimum=0, maximum=1), True),
    (1, float, dict(minimum=0, maximum=1), True),
    (float("nan"), float, dict(), False),
    (float("inf"), float, dict(), False),
    (0.0, float, dict(minimum=0, min_open=True), False),
    (None, int, dict(), False),
])
def test_check_number(value, kind, kw, ok):
    if ok:
        assert cli.check_number(value, "batch_size", kind, **kw) == value
    else:
        with pytest.raises(cli.CLIError) as e:
            cli.check_number(value, "batch_size", kind, where="p.json", **kw)
        msg = str(e.value)
        assert msg.startswith("p.json: batch_size must be") and "\n" not in msg


def test_resolve_device_one_line_errors():
    assert cli.resolve_device("cpu") == torch.device("cpu")
    bad = ["meta", "nonsense", "cuda:-1x"]
    if not torch.cuda.is_available():
        bad += ["cuda", "cuda:0", "cuda:7"]
    else:
        bad += [f"cuda:{torch.cuda.device_count()}"]
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        bad += ["mps"]
    for name in bad:
        with pytest.raises(cli.CLIError) as e:
            cli.resolve_device(name)
        msg = str(e.value)
        assert "\n" not in msg and "--device" in msg, (name, msg)
    with pytest.raises(cli.CLIError, match="meta holds no data"):
        cli.resolve_device("meta")


def test_set_tf32_policy():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        cli.set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        cli.set_tf32()
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_check_finite():
    x = torch.zeros(2, 3)
    assert cli.check_finite(x, "maps") is x
    assert cli.check_finite(np.ones(4), "maps") is not None
    assert cli.check_finite(torch.arange(3), "ids") is not None  # integers are always finite
    x[1, 2] = float("nan")
    x[0, 0] = float("inf")
    with pytest.raises(cli.NonFiniteError, match=r"logits: 2 of 6 values are NaN or Inf"):
        cli.check_finite(x, "logits")
    with pytest.raises(cli.NonFiniteError, match="1 of 3"):
        cli.check_finite(np.array([0.0, -np.inf, 1.0]), "map")
    with pytest.raises(cli.NonFiniteError):
        cli.check_finite(math.nan, "p")


def test_check_output_dir(tmp_path):
    out = tmp_path / "a" / "b"
    assert cli.check_output_dir(str(out)) == str(out) and out.is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(cli.CLIError, match="not a directory"):
        cli.check_output_dir(str(f))
    with pytest.raises(cli.CLIError, match="is a file, not a directory"):
        cli.check_output_dir(str(f / "sub" / "deeper"))
    assert not (tmp_path / "file").is_dir()
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(cli.CLIError, match="cannot write"):
                cli.check_output_dir(str(ro))
        finally:
            ro.chmod(0o700)


def test_check_output_file(tmp_path):
    assert cli.check_output_file(str(tmp_path / "new" / "x.json"))
    with pytest.raises(cli.CLIError, match="is a directory"):
        cli.check_output_file(str(tmp_path))
    (tmp_path / "f").write_text("")
    with pytest.raises(cli.CLIError):
        cli.check_output_file(str(tmp_path / "f" / "x.json"))


def test_atomic_writes(tmp_path):
    p = tmp_path / "r.json"
    cli.atomic_write_json(str(p), {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]} and p.read_text().endswith("\n")
    cli.atomic_write_text(str(p), "hello")
    assert p.read_text() == "hello"
    cli.atomic_write_bytes(str(p), b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    with pytest.raises(cli.NonFiniteError):
        cli.atomic_write_json(str(p), {"x": float("nan")})
    assert p.read_bytes() == b"\x00\x01"  # the old file is kept
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def _writer(args):
    path, value = args
    for _ in range(50):
        cli.atomic_write_json(path, {"v": value, "pad": "x" * 10000})
    return value


def test_concurrent_atomic_writers_never_corrupt(tmp_path):
    path = str(tmp_path / "shared.json")
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(_writer, [(path, 1), (path, 2)])
    assert json.loads(open(path).read())["v"] in (1, 2)
    assert os.listdir(tmp_path) == ["shared.json"]


def test_atomic_directory(tmp_path):
    final = tmp_path / "clf"
    with cli.atomic_directory(str(final)) as tmp:
        open(os.path.join(tmp, "model"), "w").write("m1")
        assert not final.exists()
    assert (final / "model").read_text() == "m1"
    with pytest.raises(RuntimeError):
        with cli.atomic_directory(str(final)) as tmp:
            open(os.path.join(tmp, "model"), "w").write("m2")
            raise RuntimeError("killed mid-way")
    assert (final / "model").read_text() == "m1"  # the complete old one stays
    with cli.atomic_directory(str(final)) as tmp:
        open(os.path.join(tmp, "model"), "w").write("m3")
        open(os.path.join(tmp, "tokenizer"), "w").write("t3")
    assert sorted(os.listdir(final)) == ["model", "tokenizer"]
    assert os.listdir(tmp_path) == ["clf"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    final = tmp_path / "clf"
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(proc.stdout)
    stale = tmp_path / f".clf.{dead}.abc.tmp"
    stale.mkdir()
    live = tmp_path / f".clf.{os.getpid()}.abc.tmp"
    live.mkdir()
    assert cli.remove_stale_temporaries(str(final)) == 1
    assert not stale.exists() and live.exists()


def test_file_lock(tmp_path):
    lock = str(tmp_path / "x.lock")
    with cli.file_lock(lock, what="results folder"):
        code = ("import sys; sys.path.insert(0, %r)\nfrom modules import cli\n"
                "try:\n    with cli.file_lock(%r, what='results folder'): print('got')\n"
                "except cli.CLIError as e: print('refused', e)") % (ROOT, lock)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
        assert out.startswith("refused results folder is in use")
    with cli.file_lock(lock):
        pass  # released


def test_run_main_exit_codes(capsys):
    def ok(argv):
        return None

    def bad(argv):
        raise cli.CLIError("--batch-size must be positive")

    def interrupted(argv):
        raise KeyboardInterrupt

    def missing(argv):
        open("/nonexistent/dir/file")

    def bug(argv):
        raise ZeroDivisionError("bug")

    assert cli.run_main(ok, []) == 0
    assert cli.run_main(bad, []) == 2
    assert capsys.readouterr().err == "error: --batch-size must be positive\n"
    assert cli.run_main(interrupted, []) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and "\n" not in err
    assert cli.run_main(missing, []) == 2
    assert capsys.readouterr().err == "error: /nonexistent/dir/file: No such file or directory\n"
    with pytest.raises(ZeroDivisionError):
        cli.run_main(bug, [])  # bugs keep their traceback


def test_run_main_knows_the_project_errors(capsys):
    from BERT_rationale_benchmark.utils import ERASERFormatError
    from data.imagenet_seg import SegmentationDataError
    from modules.checkpoints import CheckpointError
    for cls in (CheckpointError, ERASERFormatError, SegmentationDataError):
        def fn(argv, cls=cls):
            raise cls("bad thing\nsecond line")
        assert cli.run_main(fn, None) == 2
        assert capsys.readouterr().err == "error: bad thing\n"

    class Mine(Exception):
        pass
    cli.register_input_error(Mine)

    @cli.cli_entry
    def main(argv):
        raise Mine("mine")
    assert main([]) == 2 and capsys.readouterr().err == "error: mine\n"


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` RGB pixels, with one empty IDAT."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_open_image_refuses_bombs_and_garbage(tmp_path):
    from PIL import Image
    good = tmp_path / "a.png"
    Image.new("RGB", (8, 6), (1, 2, 3)).save(good)
    assert cli.open_image(str(good)).size == (8, 6)
    big = tmp_path / "big.png"
    big.write_bytes(_png_header(20000, 20000))  # a 400-megapixel decompression bomb: the header is enough
    with pytest.raises(cli.CLIError, match="exceeds|too large"):
        cli.open_image(str(big))
    mid = tmp_path / "mid.png"
    mid.write_bytes(_png_header(10000, 10000))  # 100 MP: Pillow only warns below twice its limit
    with pytest.raises(cli.CLIError, match="exceeds|too large"):
        cli.open_image(str(mid))
    with pytest.raises(cli.CLIError, match="exceeds"):
        cli.open_image(str(good), max_pixels=10)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(cli.CLIError, match="not an image"):
        cli.open_image(str(junk))
    trunc = tmp_path / "t.png"
    trunc.write_bytes(good.read_bytes()[:40])
    with pytest.raises(cli.CLIError):
        cli.open_image(str(trunc))
    with pytest.raises(cli.CLIError, match="not found"):
        cli.open_image(str(tmp_path / "none.png"))


def test_common_flags(capsys):
    p = argparse.ArgumentParser(prog="t", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cli.add_device_arg(p, default="cpu")
    cli.add_threads_arg(p)
    cli.add_seed_arg(p)
    a = p.parse_args(["--threads", "2"])
    assert a.device == "cpu" and a.threads == 2 and a.seed == 0
    for argv in (["--threads", "100000"], ["--threads", "0"], ["--seed", "-1"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    assert "must be in 1.." in capsys.readouterr().err


class _CtrlCAtStart(torch.utils.data.Dataset):
    """Each item sends Ctrl-C (SIGINT) to the process loading it: a worker
    that gets Ctrl-C as the user presses it in the first second."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        import signal
        os.kill(os.getpid(), signal.SIGINT)
        return torch.tensor([i])


def test_dataloader_workers_started_in_the_block_leave_ctrl_c_to_the_main_process():
    """Workers forked inside workers_ignore_sigint() keep loading through
    Ctrl-C (without it, each one's KeyboardInterrupt ends it and the loader
    fails: the tracebacks and the stuck run of issue 27 item 6)."""
    import signal
    before = signal.getsignal(signal.SIGINT)
    loader = torch.utils.data.DataLoader(_CtrlCAtStart(), batch_size=1, num_workers=1)
    with cli.workers_ignore_sigint():
        batches = iter(loader)
    assert signal.getsignal(signal.SIGINT) is before  # the main process handles Ctrl-C again
    assert [int(b) for b in batches] == [0, 1, 2]


def test_ctrl_c_while_the_workers_start_is_raised_after_they_started():
    import signal
    # Python's own Ctrl-C handler for this test: a process started in the background by a shell
    # without job control (nohup cmd &, some CI runners) starts with SIGINT ignored, and then
    # nothing raises KeyboardInterrupt (run_main returned 0 there)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with cli.workers_ignore_sigint():
                signal.raise_signal(signal.SIGINT)  # deferred, not lost
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert cli.run_main(lambda a: signal.raise_signal(signal.SIGINT)) == cli.EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, before)


def test_resume_results_replaces_only_with_overwrite(tmp_path, capsys):
    path = str(tmp_path / "results.json")
    cli.atomic_write_json(path, {"identity": "a", "records": {"x": 1}})
    assert cli.resume_results(path, "a", {"identity": "a", "records": {}}) == {"identity": "a", "records": {"x": 1}}
    with pytest.raises(cli.CLIError, match="--overwrite"):
        cli.resume_results(path, "b", {"identity": "b", "records": {}})
    assert cli.resume_results(path, "b", {"identity": "b"}, overwrite=True) == {"identity": "b"}
    assert json.load(open(path)) == {"identity": "a", "records": {"x": 1}}  # replaced by the caller's next write


def test_ctrl_c_while_a_script_imports_is_one_line():
    """Ctrl-C before main() (torch still importing) ends the script with one
    line and exit 130; run_main hands Ctrl-C back to KeyboardInterrupt."""
    code = ("from modules.cli import quiet_ctrl_c_while_importing; quiet_ctrl_c_while_importing()\n"
            "import os, signal, time; os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == cli.EXIT_INTERRUPTED and p.stderr.strip() == "interrupted while starting; nothing was done"
    import signal
    before = signal.getsignal(signal.SIGINT)
    try:
        cli.quiet_ctrl_c_while_importing()
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        assert cli.run_main(lambda a: 0 if signal.getsignal(signal.SIGINT) is signal.default_int_handler else 5) == 0
    finally:
        signal.signal(signal.SIGINT, before)
