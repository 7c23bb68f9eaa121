"""The published script's name for :mod:`baselines.ViT.perturbation_eval`
(same flags; ``--neg`` is the default direction, as it was there).

    python baselines/ViT/pertubation_eval_from_hdf5.py --method transformer_attribution --vis-class top --neg

The order among pixels of equal relevance is the project's default
(``--tie-break random``, seeded); ``--tie-break topk`` runs the published
loop's ``torch.topk`` literally (issue 16).
"""
import argparse
import sys
from typing import List, Optional

from baselines.ViT import perturbation_eval


def build_parser() -> argparse.ArgumentParser:
    """:func:`baselines.ViT.perturbation_eval.build_parser` (the same flags)."""
    return perturbation_eval.build_parser()


def main(argv: Optional[List[str]] = None) -> int:
    """:func:`baselines.ViT.perturbation_eval.main` (bad input: one line, exit 2)."""
    return perturbation_eval.main(argv)


if __name__ == "__main__":
    sys.exit(main())
