"""Class-specificity metrics for relevance maps of pictures with two classes.

For a picture holding an object of class A and one of class B, with maps
``M_A`` (explaining A) and ``M_B`` (explaining B) at the picture's
resolution and the objects' regions ``R_A`` and ``R_B`` (masks, or filled
boxes):

* **pointing game**: the map for a class points to that class's object
  when every pixel where the map attains its maximum lies inside the
  object's region (:func:`pointing_hits`; a flat map points nowhere unless
  the region covers the whole picture);
* **positive mass**: ``sum over R of max(M, 0)`` (:func:`positive_mass`);
* **class sensitivity**: ``mass(M_A, R_A) > mass(M_A, R_B)`` and
  ``mass(M_B, R_B) > mass(M_B, R_A)`` (:func:`class_sensitive`).  A method
  whose map ignores the class (``M_A == M_B``) can never satisfy both, so
  it scores 0 by construction;
* **own-object share**: ``mass(M, R_own) / (mass(M, R_own) + mass(M,
  R_other))``, 0.5 when both are 0 (:func:`own_share`).

Every function takes a batch: maps (B, H, W), regions (B, H, W) bool.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["positive_mass", "pointing_hits", "class_sensitive", "own_share"]


def _check(maps: Tensor, regions: Tensor) -> None:
    if maps.dim() != 3 or maps.shape != regions.shape:
        raise ValueError(f"maps and regions must both be (B, H, W), got {tuple(maps.shape)} and {tuple(regions.shape)}")


def positive_mass(maps: Tensor, regions: Tensor) -> Tensor:
    """(B,) sum of the positive part of each map over its region."""
    _check(maps, regions)
    return (maps.clamp(min=0) * regions.to(maps.dtype)).flatten(1).sum(dim=1)


def pointing_hits(maps: Tensor, regions: Tensor) -> Tensor:
    """(B,) bool: every pixel where the map attains its maximum lies in the region."""
    _check(maps, regions)
    flat, reg = maps.flatten(1), regions.flatten(1).bool()
    at_max = flat == flat.max(dim=1, keepdim=True).values
    return ~(at_max & ~reg).any(dim=1)


def class_sensitive(maps_a: Tensor, maps_b: Tensor, regions_a: Tensor, regions_b: Tensor) -> Tensor:
    """(B,) bool: the map for A puts more positive relevance on A's region
    than on B's, and the map for B more on B's than on A's."""
    return ((positive_mass(maps_a, regions_a) > positive_mass(maps_a, regions_b))
            & (positive_mass(maps_b, regions_b) > positive_mass(maps_b, regions_a)))


def own_share(maps: Tensor, own: Tensor, other: Tensor) -> Tensor:
    """(B,) share of the positive relevance on the two regions that lies on
    ``own``; 0.5 where the map has no positive relevance on either."""
    a, b = positive_mass(maps, own), positive_mass(maps, other)
    total = a + b
    return torch.where(total > 0, a / total.clamp(min=torch.finfo(total.dtype).tiny), torch.full_like(total, 0.5))
