"""names_used: what the book's exercise checks read from an answer."""
import prunelib as pl
from prunelib.checks import names_used

c = pl.count                      # an alias at the top level, as in a notebook cell


def aliased(m, x):
    return c(m, x)


def test_names_used_sees_calls_nested_code_dotted_names_and_aliases():
    def direct(m, x):
        return pl.count(m, x)

    def nested(m, x):
        return [(lambda: pl.measure.layer_macs(m, x))() for _ in range(1)]

    def by_hand(w):
        return w.shape[0] * w.shape[1]

    assert {"pl", "count"} <= names_used(direct)
    assert {"measure", "layer_macs", "range"} <= names_used(nested)
    assert "count" in names_used(aliased)                  # the alias by its __name__
    assert not names_used(by_hand) & {"count", "layer_macs", "measure"}
