"""The published script's name for :mod:`baselines.ViT.perturbation_eval`
(same flags; ``--neg`` is the default direction, as it was there).

    python baselines/ViT/pertubation_eval_from_hdf5.py --method transformer_attribution --vis-class top --neg

The order among pixels of equal relevance is the project's default
(``--tie-break random``, seeded); ``--tie-break topk`` runs the published
loop's ``torch.topk`` literally (issue 16).
"""
import sys

from baselines.ViT.perturbation_eval import main

if __name__ == "__main__":
    sys.exit(main())
