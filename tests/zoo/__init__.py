"""Tiny models that reproduce the building blocks of real model zoos (see ``models.py``)."""

from .models import CASES, ZooCase, eager

__all__ = ["CASES", "ZooCase", "eager"]
