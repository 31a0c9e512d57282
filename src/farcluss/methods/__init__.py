"""Methods: each turns a batch into named losses. Add one by subclassing `Method`."""

from __future__ import annotations

from farcluss.config import Config
from farcluss.methods.base import Batch, LossOutput, Method, Reduce, _identity
from farcluss.methods.farcluss import Farcluss
from farcluss.methods.fixmatch import FixMatch
from farcluss.methods.supervised import Supervised
from farcluss.methods.unimatch import UniMatch

METHODS = {"supervised": Supervised, "fixmatch": FixMatch, "unimatch": UniMatch,
           "farcluss": Farcluss}


def build_method(cfg: Config, num_classes: int, reduce: Reduce = _identity, world_size: int = 1,
                 rank: int = 0) -> Method:
    return METHODS[cfg.method.name](cfg, num_classes, reduce=reduce, world_size=world_size,
                                    rank=rank)


__all__ = ["Batch", "LossOutput", "Method", "METHODS", "build_method"]
