"""modules/training.py: the one warm-up + cosine schedule equals, rate for rate
(float ==), the formula each stand-in trainer wrote before it (re-stated
here as it stood), so the shipped stand-ins retrain to the same weights; the
shuffled batches keep the trainers' draws in the same order; one optimiser
step equals the steps it replaced; the stand-in record keeps the fields the
shipped models carry."""
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modules.cli import CLIError
from modules.training import (command_line, eval_due, optimizer_step, save_standin, set_lr, shuffled_batches,
                              track_loss, warmup_cosine_lr)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(ROOT, "samples")


# --------------------------------------------------------------------------
# The former formulas, as each trainer wrote them (float operations in their order)
# --------------------------------------------------------------------------
def old_vit(step, total, warmup, lr):  # train_synthetic._lr_at (train_scenes imported it)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def old_detr(step, lr, cosine_steps, elapsed_fraction=None, warmup=100):  # train_scenes_detr
    progress = min(step / cosine_steps if cosine_steps else elapsed_fraction, 1.0)
    return lr * (min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress)))


def old_lxmert(step, lr, cosine_steps):  # train_scenes_lxmert (only with --cosine-steps)
    t = min(step / cosine_steps, 1.0)
    return lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * t))


def old_clip_translation(step, lr, steps, warmup=100):  # train_scenes_clip and train_scenes_translation
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


# (peak lr, steps) of the shipped commands (samples/README.md, each config.json) and of the defaults
VIT_RUNS = [(2e-3, 5000, 100),  # samples/synthetic_vit (train_synthetic defaults)
            (1e-3, 3000, 100), (2e-3, 1600, 100), (1.5e-3, 1500, 100),  # synthetic_scenes_vit's three stages
            (5e-4, 3000, 100),  # train_scenes defaults
            (1e-3, 50, 100), (1e-3, 100, 100), (1e-3, 101, 100), (1e-3, 40, 0), (3e-4, 1, 0)]  # edges
DETR_RUNS = [(2.5e-4, 3000), (2.5e-4, 7), (1e-3, 250)]
LXMERT_RUNS = [(5e-4, 5000), (5e-4, 60), (1e-4, 1234)]
CLIP_RUNS = [(5e-4, 1500), (1e-3, 3000), (1e-3, 2), (7e-4, 99)]  # CLIP shipped, translation shipped, tiny


@pytest.mark.parametrize("lr,steps,warmup", VIT_RUNS)
def test_vit_trainers_schedule_is_the_former_one(lr, steps, warmup):
    got = [warmup_cosine_lr(s, lr, warmup, steps, cosine_after_warmup=True) for s in range(steps + 3)]
    assert got == [old_vit(s, steps, warmup, lr) for s in range(steps + 3)]


@pytest.mark.parametrize("lr,steps", DETR_RUNS)
def test_detr_schedule_is_the_former_one(lr, steps):
    got = [warmup_cosine_lr(s, lr, 100, steps, peak_last=True) for s in range(steps + 3)]
    assert got == [old_detr(s, lr, steps) for s in range(steps + 3)]


def test_detr_time_budget_schedule_is_the_former_one():
    """Without --cosine-steps DETR decays over the wall-clock budget: the
    elapsed fraction replaces step / total (and the steps' count is not read)."""
    rng = np.random.default_rng(0)
    for step, frac in zip(range(0, 4000, 7), np.sort(rng.uniform(0, 1.3, 572))):
        frac = float(frac)
        assert warmup_cosine_lr(step, 2.5e-4, 100, None, peak_last=True, progress=frac) == \
            old_detr(step, 2.5e-4, None, frac)


@pytest.mark.parametrize("lr,steps", LXMERT_RUNS)
def test_lxmert_schedule_is_the_former_one(lr, steps):
    got = [warmup_cosine_lr(s, lr, 100, steps) for s in range(steps + 3)]
    assert got == [old_lxmert(s, lr, steps) for s in range(steps + 3)]


@pytest.mark.parametrize("lr,steps", CLIP_RUNS)
def test_clip_and_translation_schedule_is_the_former_one(lr, steps):
    # the trainers stop at --steps, so the former formula was only ever evaluated below it
    got = [warmup_cosine_lr(s, lr, 100, steps, pi_times_step_first=True) for s in range(steps)]
    assert got == [old_clip_translation(s, lr, steps) for s in range(steps)]


def test_each_flag_changes_rates_of_the_shipped_runs():
    """The flags are needed: without them the shipped runs' rates differ (in the
    last bit for the float-order flags), so the weights would too."""
    def differ(flags, old, lr, steps):
        return sum(warmup_cosine_lr(s, lr, 100, steps, **flags) != old(s) for s in range(steps))

    assert differ({}, lambda s: old_vit(s, 5000, 100, 2e-3), 2e-3, 5000) > 100  # another shape
    assert differ({}, lambda s: old_detr(s, 2.5e-4, 3000), 2.5e-4, 3000) > 0  # measured: 27 of 3000
    assert differ({}, lambda s: old_clip_translation(s, 1e-3, 3000), 1e-3, 3000) > 0  # 712 of 3000
    assert differ({"peak_last": True}, lambda s: old_lxmert(s, 5e-4, 5000), 5e-4, 5000) > 0  # 31 of 5000


def test_schedule_by_hand():
    """Exact values of the shape, independent of any trainer."""
    assert warmup_cosine_lr(0, 1.0, 4, 10, cosine_after_warmup=True) == 0.25
    assert warmup_cosine_lr(3, 1.0, 4, 10, cosine_after_warmup=True) == 1.0
    assert warmup_cosine_lr(4, 1.0, 4, 10, cosine_after_warmup=True) == 1.0  # the cosine starts at its top
    assert warmup_cosine_lr(7, 1.0, 4, 10, cosine_after_warmup=True) == pytest.approx(0.5, abs=1e-15)  # half-way
    assert warmup_cosine_lr(10, 1.0, 4, 10, cosine_after_warmup=True) == 0.0
    assert warmup_cosine_lr(0, 1.0, 4, 8) == 0.25  # the overlapped ramp: (0 + 1) / 4 of a cosine at 1
    assert warmup_cosine_lr(4, 1.0, 4, 8) == pytest.approx(0.5, abs=1e-15)  # ramp done, cosine half-way
    for flags in ({}, {"peak_last": True}, {"pi_times_step_first": True}):
        assert warmup_cosine_lr(8, 1.0, 4, 8, **flags) == 0.0
        assert warmup_cosine_lr(20, 1.0, 4, 8, **flags) == 0.0  # held at 0 past total


def test_set_lr_sets_every_group():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "weight_decay": 0.1}, {"params": [q], "weight_decay": 0.0}], lr=1.0)
    set_lr(opt, 0.125)
    assert [g["lr"] for g in opt.param_groups] == [0.125, 0.125]


# --------------------------------------------------------------------------
# Batches, one step
# --------------------------------------------------------------------------
def _old_loop(seed, n, batch_size, max_steps):
    """The four Hugging Face trainers' loop, with a per-batch draw of the caller's (DETR's flips, CLIP's phrases)."""
    g = np.random.default_rng(seed)
    step, start, seen = 0, time.time(), []
    while step < max_steps and time.time() - start < 3600:
        order = g.permutation(n)
        for s in range(0, n - batch_size + 1, batch_size):
            idx = order[s:s + batch_size]
            seen.append((idx.tolist(), g.random(len(idx)).tolist()))
            step += 1
            if step >= max_steps or time.time() - start >= 3600:
                break
    return seen


@pytest.mark.parametrize("n,batch_size,max_steps", [(10, 3, 7), (12, 4, 3), (12, 4, 6), (5, 5, 4), (50, 7, 1)])
def test_shuffled_batches_keep_the_former_stream(n, batch_size, max_steps):
    g = np.random.default_rng(3)
    new = [(idx.tolist(), g.random(len(idx)).tolist()) for idx in shuffled_batches(g, n, batch_size, max_steps, 3600)]
    assert new == _old_loop(3, n, batch_size, max_steps)
    assert len(new) == max_steps and all(len(i) == batch_size for i, _ in new)


def test_shuffled_batches_stop_at_the_time_budget():
    g = np.random.default_rng(0)
    assert list(shuffled_batches(g, 10, 2, 100, 60, start=time.time() - 61)) == []
    assert g.random() == np.random.default_rng(0).random()  # nothing was drawn
    gen = shuffled_batches(np.random.default_rng(0), 10, 2, 100, 0.2)
    next(gen)
    time.sleep(0.25)
    assert list(gen) == []  # checked after every batch, as the trainers did


def _tiny(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def test_optimizer_step_is_the_steps_it_replaced():
    x, y = torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 2
    a, b = _tiny(), _tiny()
    oa, ob = torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    for step in range(5):
        lr = warmup_cosine_lr(step, 1e-2, 2, 5)
        loss = torch.nn.functional.cross_entropy(a(x), y)
        optimizer_step(oa, loss, a.parameters(), 0.1, step, lr=lr)
        loss = torch.nn.functional.cross_entropy(b(x), y)  # the trainers' former lines
        for group in ob.param_groups:
            group["lr"] = lr
        ob.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
        ob.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert oa.param_groups[0]["lr"] == lr
    optimizer_step(oa, torch.nn.functional.cross_entropy(a(x), y), a.parameters(), 0.1, 5)
    assert oa.param_groups[0]["lr"] == lr  # lr=None: the rate is kept (LXMERT without --cosine-steps)


def test_optimizer_step_refuses_a_non_finite_loss_before_touching_the_model():
    m = _tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in m.parameters()]
    loss = m(torch.full((1, 4), float("nan"))).sum()
    with pytest.raises(CLIError, match=r"^the loss became nan at step 7; nothing saved$"):
        optimizer_step(opt, loss, m.parameters(), 1.0, 7, lr=0.5)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert opt.param_groups[0]["lr"] == 1e-2


# --------------------------------------------------------------------------
# The record and the save
# --------------------------------------------------------------------------
def test_command_line_names_the_script_from_the_repository_root():
    script = os.path.join(ROOT, "baselines", "ViT", "train_scenes.py")
    assert command_line(script, ["--init", "none", "--steps", "3"]) == \
        "python baselines/ViT/train_scenes.py --init none --steps 3"
    assert command_line(script, []) == "python baselines/ViT/train_scenes.py "  # as the trainers wrote it
    assert command_line(script) == "python baselines/ViT/train_scenes.py " + " ".join(sys.argv[1:])


class _Saved:
    """A stand-in for a Hugging Face model or tokenizer: save_pretrained writes its name (and the config)."""

    def __init__(self, name, config=None):
        self.name, self.config = name, config

    def save_pretrained(self, folder):
        with open(os.path.join(folder, f"{self.name}.txt"), "w") as fh:
            fh.write(self.name)
        if self.config is not None:
            with open(os.path.join(folder, "config.json"), "w") as fh:
                json.dump(vars(self.config), fh)


def test_save_standin_records_and_replaces_the_folder_at_once(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("from an earlier run")
    model = _Saved("model", SimpleNamespace(kind="tiny"))
    start = time.time() - 90
    save_standin(str(out), model, _Saved("tokenizer"), what="a test", script=os.path.join(ROOT, "x", "t.py"),
                 argv=["--steps", "2"], seed=5, steps=2, start=start, threads=1, history=[{"step": 2}],
                 val_score=0.5)
    assert sorted(os.listdir(out)) == ["config.json", "model.txt", "tokenizer.txt"]  # nothing of the old folder
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary left beside it
    record = json.loads((out / "config.json").read_text())["standin"]
    assert record == {"what": "a test", "command": "python x/t.py --steps 2", "data_seed": 5, "steps": 2,
                      "minutes": record["minutes"], "threads": 1, "val_score": 0.5, "history": [{"step": 2}]}
    assert 1.5 <= record["minutes"] <= 2.0
    assert capsys.readouterr().out == f"wrote {out}\n"

    class Broken(_Saved):
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_standin(str(out), _Saved("model", SimpleNamespace()), Broken("tokenizer"), what="b", script="t.py",
                     argv=[], seed=0, steps=0, start=start, threads=1, history=[])
    assert sorted(os.listdir(out)) == ["config.json", "model.txt", "tokenizer.txt"]  # the previous model kept
    assert json.loads((out / "config.json").read_text())["standin"]["what"] == "a test"


TRAINERS = {  # module, shipped folder, a two-step run's flags
    "translation": ("baselines.generation.train_scenes_translation", "synthetic_translation_bart",
                    ["--train-pairs", "16", "--val-pairs", "2", "--steps", "2", "--batch-size", "8",
                     "--d-model", "16"]),
    "lxmert": ("baselines.LXMERT.train_scenes_lxmert", "synthetic_scenes_lxmert",
               ["--train-scenes", "6", "--val-scenes", "2", "--max-steps", "2", "--cosine-steps", "2", "--batch-size",
                "4", "--hidden", "16"]),
    "detr": ("baselines.DETR.train_scenes_detr", "synthetic_scenes_detr",
             ["--train-scenes", "8", "--val-scenes", "2", "--cosine-steps", "2", "--batch-size", "4", "--queries", "3",
              "--d-model", "16", "--size", "64"]),
    "clip": ("baselines.CLIP.train_scenes_clip", "synthetic_scenes_clip",
             ["--train-scenes", "8", "--val-scenes", "2", "--steps", "2", "--batch-size", "4", "--init-vision",
              os.path.join(SAMPLES, "synthetic_scenes_vit")]),
}


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_trainer_records_the_shipped_fields(name, tmp_path):
    """A two-step run of each Hugging Face trainer writes the fields of its
    shipped stand-in's record, the command as run, and a history entry of the
    shipped entries' fields at every validation."""
    import importlib

    module, folder, flags = TRAINERS[name]
    out = tmp_path / "model"
    argv = ["--out-dir", str(out), *flags, "--eval-every", "1"]
    assert importlib.import_module(module).main(argv) == 0
    record = json.loads((out / "config.json").read_text())["standin"]
    with open(os.path.join(SAMPLES, folder, "config.json")) as fh:
        shipped = json.load(fh)["standin"]
    assert set(record) == set(shipped)
    assert record["command"] == f"python {module.replace('.', '/')}.py " + " ".join(argv)
    assert record["steps"] == 2 and [h["step"] for h in record["history"]] == [1, 2]
    assert set(record["history"][0]) == set(shipped["history"][0])
    assert record["threads"] == 1 and record["data_seed"] == 0 and record["minutes"] >= 0


def test_track_loss_and_eval_due_are_the_vit_trainers_former_lines():
    values = [float(v) for v in np.random.default_rng(1).uniform(0.1, 3.0, 75)]
    history, old_history, running, old = [], [], None, None

    class Bar:
        def set_postfix(self, **kw):
            self.shown = kw

    bar = Bar()
    for step, value in enumerate(values):
        running = track_loss(history, running, value, step, bar)
        old = value if old is None else 0.98 * old + 0.02 * value
        if step % 20 == 0:
            old_history.append([step, round(old, 4)])
        assert running == old and bar.shown == {"loss": f"{old:.3f}"}
    assert history == old_history and [s for s, _ in history] == [0, 20, 40, 60]
    for every, steps in [(0, 10), (1, 5), (3, 10), (5, 10), (500, 5000)]:
        assert [eval_due(s, every, steps) for s in range(steps)] == \
            [bool(every and (s + 1) % every == 0 and s + 1 < steps) for s in range(steps)]
    assert [s for s in range(10) if eval_due(s, 3, 10)] == [2, 5, 8]


def test_run_args_defaults_and_refusals(tmp_path):
    import argparse

    from modules.training import add_run_args, parse_run_args

    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", required=True)
    add_run_args(p, minutes=15.0, batch_size=64, lr=1e-3, eval_every=500)
    args, device = parse_run_args(p, ["--out-dir", str(tmp_path / "m")])
    assert (args.seed, args.minutes, args.batch_size, args.lr, args.eval_every, args.threads) == \
        (0, 15.0, 64, 1e-3, 500, 1) and device == torch.device("cpu")
    assert not (tmp_path / "m").exists()  # the folder appears only when the model is saved
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CLIError, match="--out-dir"):
        parse_run_args(p, ["--out-dir", str(blocker / "m")])
    with pytest.raises(CLIError):
        parse_run_args(p, ["--out-dir", str(tmp_path / "m"), "--device", "meta"])
