import pytest

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
