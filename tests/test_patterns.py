import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statebridge import ConfigError
from statebridge.tensors.patterns import KeyPattern, compress_keys, describe_keys


def test_glob_star_stays_within_a_component():
    p = KeyPattern("layers.*.q.weight")
    assert p.match("layers.3.q.weight")
    assert not p.match("layers.3.x.q.weight")
    assert p.expand(p.match("layers.3.q.weight"), "blocks.*.attn.q") == "blocks.3.attn.q"


def test_double_star_crosses_dots():
    p = KeyPattern("model.**")
    assert p.expand(p.match("model.layers.0.w"), "**") == "layers.0.w"


def test_regex_with_captures():
    p = KeyPattern(r"re:model\.layers\.(\d+)\.(.*)")
    assert p.expand(p.match("model.layers.12.mlp.w"), r"h.\1.\2") == "h.12.mlp.w"


def test_regex_typo_is_a_config_error_naming_the_pattern():
    with pytest.raises(ConfigError) as e:
        KeyPattern(r"re:layers\.(\d+").regex
    assert str(e.value).startswith(r"pattern 're:layers\.(\d+' is not a valid regular expression: missing )")


def test_wildcard_count_mismatch():
    p = KeyPattern("a.*.b.*")
    assert p.expand(p.match("a.1.b.2"), "x.*.*") == "x.1.2"
    with pytest.raises(ConfigError, match="1 wildcards but pattern"):
        p.expand(p.match("a.1.b.2"), "x.*")


def test_compress_keys_folds_layer_ranges():
    keys = [f"model.layers.{i}.mlp.up.weight" for i in range(32)] + ["lm_head.weight"]
    assert compress_keys(keys) == ["model.layers.{0..31}.mlp.up.weight", "lm_head.weight"]
    assert compress_keys(["a.1.w", "a.3.w"]) == ["a.{1,3}.w"]
    assert "more patterns" in describe_keys([f"k{i}.{j}" for i in range(20) for j in range(2)], limit=3)


_PART = st.text(alphabet="ab.*", max_size=5)


@settings(max_examples=300, deadline=None)
@given(prefix=_PART.filter(lambda s: "*" not in s), suffix=_PART.filter(lambda s: "*" not in s),
       keys=st.lists(st.text(alphabet="ab.", max_size=8), max_size=12, unique=True), target=st.sampled_from(["**", "x.**", "**.y", "x.*.y"]))
def test_rename_of_one_double_star_renames_as_the_glob_says(prefix, suffix, keys, target):
    """A rename whose pattern has one ``**`` skips the regex (plans of 200,000 keys): same keys, same new names."""
    from statebridge.tensors.meta import TensorMeta
    from statebridge.transforms.rename import Rename

    pattern = KeyPattern(f"{prefix}**{suffix}")
    assert pattern.affixes == (prefix, suffix)
    metas = {k: TensorMeta((1,), "float32") for k in keys}
    expected = [(k, pattern.expand(pattern.match(k), target)) for k in keys if pattern.match(k)]
    step = Rename(pattern=pattern.text, to=target, strict=False)
    assert list(step._globbed(pattern, metas)) == expected
