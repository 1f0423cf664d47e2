"""prunelib: regularization-based structured pruning of CNNs, compact and tested.

    import prunelib as pl
    groups = pl.channel_groups(model, example_inputs)
    small = pl.remove_channels(model, groups, keep={i: idx, ...})
    macs, params = pl.count(model, example_inputs)

Set PRUNELIB_THREADS=N to fix torch's intra-op threads at import (useful on shared CPUs, where
more threads than free cores can make each step many times slower).
"""
import os as _os

import torch as _torch

if _os.environ.get("PRUNELIB_THREADS"):
    try:
        _n = int(_os.environ["PRUNELIB_THREADS"])
    except ValueError:
        _n = 0
    if _n < 1:
        raise ValueError(f"PRUNELIB_THREADS={_os.environ['PRUNELIB_THREADS']!r}: give a "
                         "positive integer (or unset it to keep torch's default)")
    _torch.set_num_threads(_n)

from .graph import (ChannelGroup, FrozenOp, GroupList, Member, UnsupportedOpError,
                    channel_groups, register_op)
from .export import for_inference
from .measure import count, hooked, latency
from .surgery import (Branch, load_pruned, remove_branches, remove_channels, residual_branches,
                      save_pruned)
from . import methods  # noqa: E402  (registers every method)

__version__ = "0.1.0"
__all__ = ["ChannelGroup", "GroupList", "FrozenOp", "Member", "UnsupportedOpError",
           "channel_groups", "register_op",
           "count", "hooked", "latency", "for_inference", "remove_channels", "save_pruned",
           "load_pruned", "methods",
           "Branch", "residual_branches", "remove_branches"]
