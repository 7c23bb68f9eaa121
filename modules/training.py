"""What the stand-in trainers share: the warm-up + cosine learning rate, the
shuffled batches under a step and time budget, one optimiser step, and the
record and atomic save of a Hugging Face stand-in (``config.json``'s
``"standin"``).

The schedule keeps the arithmetic each trainer used when its shipped model
in ``samples/`` was trained, so that the recorded commands retrain to the
same weights bit for bit.  The trainers differ in the shape (the ViT ones
start the cosine after the warm-up) and in the order of float operations
(DETR; CLIP and translation): forms equal in exact arithmetic still differ
in the last bit of some rates, and so in the weights, so each trainer names
its form with a flag (tests/test_training_schedule.py re-states each
trainer's former formula and compares every rate with ``==``).  All count
the warm-up from 1 (step s gets (s + 1) / warmup), decay to 0 with no
floor and set the rate every optimiser step.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = ["warmup_cosine_lr", "set_lr", "shuffled_batches", "optimizer_step", "track_loss", "eval_due",
           "add_run_args", "parse_run_args", "command_line", "save_standin"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warmup_cosine_lr(step: int, peak: float, warmup: int, total: Optional[int], *, cosine_after_warmup: bool = False,
                     peak_last: bool = False, pi_times_step_first: bool = False,
                     progress: Optional[float] = None) -> float:
    """Learning rate at optimiser step ``step`` (counted from 0): a linear
    warm-up over ``warmup`` steps (step s gets (s + 1) / warmup of the
    peak), then a cosine decay from ``peak`` to 0 at step ``total``.

    ``cosine_after_warmup`` (the ViT trainers): the warm-up alone sets the
    rate, ``peak * (step + 1) / warmup``; from step ``warmup`` on the cosine
    spans the remaining ``total - warmup`` steps, ``peak * 0.5 * (1 + cos)``.
    Otherwise (the Hugging Face trainers) the ramp ``min(1, (step + 1) /
    warmup)`` multiplies a cosine counted from step 0 over ``total`` steps:
    ``peak * ramp * 0.5 * (1 + cos)``, or with ``peak_last`` (DETR)
    ``peak * (ramp * 0.5 * (1 + cos))``.  The cosine's angle is
    ``pi * min(step / total, 1)``, or with ``pi_times_step_first`` (CLIP,
    translation) ``min(pi * step / total, pi)``.  ``progress`` replaces the
    fraction of the decay done (DETR's wall-clock budget, without
    ``--cosine-steps``; ``total`` is then not read).

    The flags change the order of float operations only: the forms are
    equal in exact arithmetic (the ramp forms apart), not in the last bit.
    """
    if cosine_after_warmup:
        if step < warmup:
            return peak * (step + 1) / warmup
        done = (step - warmup) / max(1, total - warmup) if progress is None else progress
        return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if pi_times_step_first and progress is None:
        angle = min(math.pi * step / total, math.pi)
    else:
        angle = math.pi * min(step / total if progress is None else progress, 1.0)
    if peak_last:
        return peak * (ramp * 0.5 * (1 + math.cos(angle)))
    return peak * ramp * 0.5 * (1 + math.cos(angle))


def set_lr(optimizer: Any, lr: float) -> None:
    """Give every parameter group of ``optimizer`` the learning rate ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def shuffled_batches(rng: Any, n: int, batch_size: int, max_steps: int, seconds: float,
                     start: Optional[float] = None) -> Iterator[Any]:
    """Index arrays of ``batch_size`` of ``n`` examples, epoch after epoch
    (each a fresh ``rng.permutation(n)``, its incomplete last batch dropped),
    until ``max_steps`` batches were given or ``seconds`` have passed since
    ``start`` (default: now).  Lazy: each epoch's permutation is drawn when its
    first batch is asked for, so draws the caller makes from ``rng`` per batch
    keep their place in the stream."""
    start = time.time() if start is None else start
    step = 0
    while step < max_steps and time.time() - start < seconds:
        order = rng.permutation(n)
        for s in range(0, n - batch_size + 1, batch_size):
            yield order[s:s + batch_size]
            step += 1
            if step >= max_steps or time.time() - start >= seconds:
                return


def optimizer_step(optimizer: Any, loss: Any, params: Any, max_norm: float, step: int,
                   lr: Optional[float] = None) -> None:
    """One update: refuse a non-finite ``loss`` (:class:`~modules.cli.CLIError`
    naming ``step``; nothing is saved), set ``lr`` (None: keep the current
    rate), then zero the gradients, backpropagate, clip ``params`` to
    ``max_norm`` and step."""
    import torch

    from modules.cli import CLIError

    if not torch.isfinite(loss):
        raise CLIError(f"the loss became {float(loss.detach())} at step {step}; nothing saved")
    if lr is not None:
        set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    optimizer.step()


def track_loss(history: List, running: Optional[float], value: float, step: int, bar: Any = None) -> float:
    """The loss's moving average (0.98 of the last, 0.02 of ``value``; the
    first value itself), appended to ``history`` as ``[step, rounded]`` every
    20 steps and shown on the progress ``bar``; returns it (the ViT trainers)."""
    running = value if running is None else 0.98 * running + 0.02 * value
    if step % 20 == 0:
        history.append([step, round(running, 4)])
    if bar is not None:
        bar.set_postfix(loss=f"{running:.3f}")
    return running


def eval_due(step: int, every: int, steps: int) -> bool:
    """True after step ``step`` (counted from 0) when a validation is due:
    every ``every`` steps (0: never), not after the last one (validated anyway)."""
    return bool(every) and (step + 1) % every == 0 and step + 1 < steps


def add_run_args(parser: Any, *, minutes: float, batch_size: int, lr: float, eval_every: int) -> None:
    """The flags every Hugging Face stand-in trainer takes, with its defaults:
    ``--seed`` (data and training), ``--minutes`` (wall-clock cap),
    ``--batch-size``, ``--lr``, ``--eval-every``, ``--threads`` (1 by default:
    a recorded run is reproducible only at the same count) and ``--device``
    (the CPU by default)."""
    from modules.cli import add_device_arg, int_range, positive_float, positive_int

    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--minutes", type=positive_float, default=minutes,
                        help="training time budget (wall clock): it stops there")
    parser.add_argument("--batch-size", type=positive_int, default=batch_size)
    parser.add_argument("--lr", type=positive_float, default=lr, help="(peak) learning rate (AdamW)")
    parser.add_argument("--eval-every", type=positive_int, default=eval_every, help="steps between validation passes")
    parser.add_argument("--threads", type=int_range(1, 64), default=1,
                        help="torch CPU threads (determinism needs the same)")
    add_device_arg(parser, default="cpu")


def parse_run_args(parser: Any, argv: Optional[Sequence[str]]) -> Tuple[Any, Any]:
    """``(args, device)``: ``argv`` parsed, the ``--device`` resolved and the
    folder ``--out-dir`` is written into checked for writing, before any work
    (:class:`~modules.cli.CLIError` otherwise)."""
    from modules.cli import check_output_dir, resolve_device

    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    check_output_dir(os.path.dirname(os.path.abspath(args.out_dir)) or ".", flag="--out-dir")
    return args, device


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command that ran ``script`` (a path, e.g. ``__file__``) with
    ``argv`` (default: this process's arguments), with the script named from
    the repository root: ``python baselines/ViT/train_scenes.py --steps 10``."""
    rel = os.path.relpath(os.path.abspath(script), _ROOT).replace(os.sep, "/")
    return f"python {rel} " + " ".join(sys.argv[1:] if argv is None else argv)


def save_standin(out_dir: str, model: Any, *companions: Any, what: str, script: str,
                 argv: Optional[Sequence[str]], seed: int, steps: int, start: float, threads: int,
                 history: List[Dict], **fields: Any) -> str:
    """Record how ``model`` was made in ``model.config.standin`` and write it
    with its ``companions`` (tokenizer, processor: anything with
    ``save_pretrained``) into ``out_dir`` at once (:func:`modules.cli.atomic_directory`:
    a kill leaves the previous folder or none, never a mixture).

    The record: ``what`` the model is, the ``command`` (:func:`command_line`),
    ``data_seed``, ``steps`` done, ``minutes`` since ``start``, ``threads``,
    the trainer's own ``fields`` (data sizes and versions, validation scores)
    and its ``history``."""
    from modules.cli import atomic_directory

    model.config.standin = {"what": what, "command": command_line(script, argv), "data_seed": seed, "steps": steps,
                            "minutes": round((time.time() - start) / 60, 2), "threads": threads, **fields,
                            "history": history}
    with atomic_directory(out_dir) as tmp:
        for obj in (model, *companions):
            obj.save_pretrained(tmp)
    print(f"wrote {out_dir}")
    return out_dir
