"""prunelib: regularization-based structured pruning of CNNs, compact and tested.

    import prunelib as pl
    groups = pl.channel_groups(model, example_inputs)
    small = pl.remove_channels(model, groups, keep={i: idx, ...})
    macs, params = pl.count(model, example_inputs)
"""
from .graph import ChannelGroup, Member, UnsupportedOpError, channel_groups, register_op
from .measure import count, latency
from .surgery import load_pruned, remove_channels, save_pruned
from . import methods  # noqa: E402  (registers every method)

__version__ = "0.1.0"
__all__ = ["ChannelGroup", "Member", "UnsupportedOpError", "channel_groups", "register_op",
           "count", "latency", "remove_channels", "save_pruned", "load_pruned", "methods"]
