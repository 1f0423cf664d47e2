"""What the book's exercise checks use to refuse an answer that calls the function it is
compared against (e.g. `pl.count` in an exercise that asks to count MACs by hand)."""
from __future__ import annotations

from typing import Any, Callable, Iterator


def names_used(fn: Callable[..., Any]) -> set[str]:
    """The names the code of `fn` uses: global and attribute names of its code and of every
    function, class or comprehension nested in it, the `__name__` of what a used global refers
    to (so an alias `c = pl.count` is seen as 'count'), and each part of a dotted name."""
    def walk(code: Any) -> Iterator[str]:
        yield from code.co_names
        for c in code.co_consts:
            if hasattr(c, "co_names"):
                yield from walk(c)
    used = set(walk(fn.__code__))
    used |= {str(getattr(fn.__globals__.get(n), "__name__", "")) for n in used}
    return {part for n in used for part in n.split(".")}
