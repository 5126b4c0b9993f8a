"""Nothing lost in pipelines: nested steps, inverses, duplicate names, config parsing.

Nested steps (``sequential``, ``parallel``, ``scope``, version-chain rules) must be
planned, counted, traced, executed and inverted exactly like the same steps at the
top level; an inverse touches only what its step changed; one group never names a
key twice; and every bad config value is one error line naming the file, the field
or flag and the step, found before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import statebridge as sb
from statebridge import ConfigError, NotInvertibleError, PlanError, SourceError
from statebridge.cli import main
from statebridge.trust.coverage import Requirements
from statebridge.readers import DictSource
from statebridge.plugins import installed, reset_plugins


def execute(state: dict[str, torch.Tensor], plan: sb.Plan) -> dict[str, torch.Tensor]:
    """Every group of ``plan`` computed in memory, as the executor would."""
    out: dict[str, torch.Tensor] = {}
    for group in plan.groups:
        out.update(group.compute({k: state[k] for k in group.inputs}))
    assert list(out) == list(plan.outputs)
    return out


STATE = {
    "a": torch.arange(4.0),
    "b": torch.arange(3.0) + 10,
    "m.0.w": torch.arange(6.0).reshape(2, 3),
    "m.0.b": torch.ones(2),
    "m.1.w": torch.arange(6.0).reshape(2, 3) * 2,
    "m.1.b": torch.zeros(2),
}


def written(tmp_path: Path, steps, name: str = "out.safetensors") -> tuple[sb.RunReport, dict[str, torch.Tensor]]:
    """Run ``steps`` from a safetensors copy of STATE (raw copies included) and read the result back."""
    source = tmp_path / "source.safetensors"
    if not source.exists():
        save_file(STATE, source)
    report = sb.run(source, steps, tmp_path / name)
    return report, load_file(tmp_path / name)


# ------------------------------------------------------------------------------------------------
# 1. Nested steps are planned like top-level steps.

DROP_B = {"drop": {"keys": ["b"]}}
NESTED_DROPS = {
    "sequential": ([{"sequential": {"steps": [DROP_B]}}], ["b"]),
    "parallel": ([{"parallel": {"steps": [DROP_B]}}], ["b"]),
    "sequential in parallel": ([{"parallel": {"steps": [{"sequential": {"steps": [DROP_B]}}]}}], ["b"]),
    "rename then drop": ([{"sequential": {"steps": [{"rename": {"mapping": {"b": "bias"}}}, {"drop": {"keys": ["bias"]}}]}}], ["b"]),
    "parallel rename, then drop": ([{"parallel": {"steps": [{"rename": {"mapping": {"b": "bias"}}}]}}, {"drop": {"keys": ["bias"]}}], ["b"]),
    "scope": ([{"scope": {"prefix": "m.0.", "steps": [{"drop": {"keys": ["b"]}}]}}], ["m.0.b"]),
    "scope in sequential": ([{"sequential": {"steps": [{"scope": {"prefix": "m.", "steps": [{"drop": {"keys": ["*.b"]}}]}}]}}], ["m.0.b", "m.1.b"]),
}


@pytest.mark.parametrize("steps, gone", NESTED_DROPS.values(), ids=NESTED_DROPS.keys())
def test_a_nested_drop_drops_and_is_reported(tmp_path, steps, gone):
    flat = sb.plan(DictSource(STATE), [{"drop": {"keys": gone}}])
    plan = sb.plan(DictSource(STATE), steps)
    assert plan.dropped == flat.dropped == gone
    assert plan.counts() == flat.counts()
    assert f"dropped ({len(gone)})" in plan.render()
    report, out = written(tmp_path, steps)
    assert set(out) == set(plan.outputs) == set(STATE) - set(gone)
    assert "bias" not in out
    assert report.stats.tensors_written + report.stats.tensors_copied_raw == len(plan.outputs)


FLAT_AND_NESTED = {
    "rename chain": (
        [{"rename": {"mapping": {"b": "bias"}}}, {"cast": {"pattern": "bias", "dtype": "fp16"}}, {"rename": {"pattern": "m.*.w", "to": "layers.*.weight"}}],
        [{"sequential": {"steps": [{"rename": {"mapping": {"b": "bias"}}}, {"sequential": {"steps": [{"cast": {"pattern": "bias", "dtype": "fp16"}}]}}]}},
         {"scope": {"prefix": "", "steps": [{"rename": {"pattern": "m.*.w", "to": "layers.*.weight"}}]}}],
    ),
    "concat, split, drop": (
        [{"stack": {"inputs": ["m.0.b", "m.1.b"], "output": "bb"}}, {"unstack": {"input": "bb", "outputs": ["x", "y"]}}, {"drop": {"keys": ["y"]}}],
        [{"sequential": {"steps": [{"stack": {"inputs": ["m.0.b", "m.1.b"], "output": "bb"}}, {"parallel": {"steps": [{"unstack": {"input": "bb", "outputs": ["x", "y"]}}]}}]}},
         {"sequential": {"steps": [{"drop": {"keys": ["y"]}}]}}],
    ),
    "joins of joins": (  # lineage ops in the order the top level records them
        [{"rename": {"mapping": {"a": "a2"}}}, {"value_op": {"pattern": "m.0.b", "op": "scale", "args": {"factor": 2}}},
         {"concat": {"inputs": ["a2", "b"], "output": "c"}}, {"concat": {"inputs": ["c", "m.0.b"], "output": "e"}}],
        [{"rename": {"mapping": {"a": "a2"}}}, {"value_op": {"pattern": "m.0.b", "op": "scale", "args": {"factor": 2}}},
         {"sequential": {"steps": [{"concat": {"inputs": ["a2", "b"], "output": "c"}}, {"concat": {"inputs": ["c", "m.0.b"], "output": "e"}}]}}],
    ),
    "scoped work": (
        [{"transpose": {"pattern": "m.*.w"}}, {"value_op": {"pattern": "m.1.b", "op": "fill", "args": {"value": 3}}}, {"rename": {"mapping": {"a": "m.a"}}}],
        [{"scope": {"prefix": "m.", "steps": [{"transpose": {"pattern": "*.w"}}, {"scope": {"prefix": "1.", "steps": [{"value_op": {"pattern": "b", "op": "fill", "args": {"value": 3}}}]}}]}},
         {"parallel": {"steps": [{"rename": {"mapping": {"a": "m.a"}}}]}}],
    ),
}


@pytest.mark.parametrize("flat, nested", FLAT_AND_NESTED.values(), ids=FLAT_AND_NESTED.keys())
def test_nested_steps_plan_count_trace_and_run_like_flat_ones(tmp_path, flat, nested):
    a, b = sb.plan(DictSource(STATE), flat), sb.plan(DictSource(STATE), nested)
    assert b.outputs == a.outputs and list(b.outputs) == list(a.outputs)
    assert b.lineage == a.lineage
    assert (b.mapped, b.unmapped, b.dropped, b.new) == (a.mapped, a.unmapped, a.dropped, a.new)
    assert [(g.inputs, dict(g.outputs)) for g in b.groups] == [(g.inputs, dict(g.outputs)) for g in a.groups]
    expected = execute(STATE, a)
    for key, tensor in execute(STATE, b).items():
        assert torch.equal(tensor, expected[key]), key
    _, out_a = written(tmp_path, flat, "a.safetensors")
    _, out_b = written(tmp_path, nested, "b.safetensors")
    assert out_a.keys() == out_b.keys() == a.outputs.keys()
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_collisions_let_through_inside_a_composite_are_counted():
    steps = [{"sequential": {"steps": [{"rename": {"mapping": {"a": "b"}}}]}}]
    with pytest.raises(sb.CollisionError, match=r"steps\[0\] \(sequential\): steps\[0\] \(rename\): target 'b'"):
        sb.plan(DictSource(STATE), steps)
    plan = sb.plan(DictSource(STATE), steps, on_collision="warn")
    assert plan.overwritten == ["b"] and plan.counts()["overwritten"] == 1
    assert plan.collisions and plan.collisions[0].startswith("steps[0] (sequential): steps[0] (rename)")
    assert torch.equal(execute(STATE, plan)["b"], STATE["a"])


@pytest.mark.parametrize(
    "steps, expected",
    [
        # one step swapping two names that an earlier step made in the same group
        ([sb.Split(input="a", outputs=["p", "q"]), sb.Rename(mapping={"p": "q", "q": "p"})], {"q": [0.0, 1.0], "p": [2.0, 3.0]}),
        ([sb.Sequential([sb.Split(input="a", outputs=["p", "q"])]), sb.Sequential([sb.Rename(mapping={"p": "q", "q": "p"})])],
         {"q": [0.0, 1.0], "p": [2.0, 3.0]}),
        # a kept tensor overwritten (on_collision: warn) by a tensor of its own group
        ([sb.Split(input="a", outputs=["p", "q"]), sb.Rename(mapping={"p": "q"})], {"q": [0.0, 1.0]}),
    ],
)
def test_groups_of_one_step_read_before_any_writes(steps, expected):
    plan = sb.plan(DictSource(STATE), steps, on_collision="warn")
    out = execute(STATE, plan)
    assert {k: out[k].tolist() for k in expected} == expected


VERSIONS = """
source: source.safetensors
target: out.safetensors
versions:
  v1: {{signature: ["m.*.w"]}}
  v2: {{}}
  v3: {{}}
rules:
  - {{from: v1, to: v2, steps: [{first}]}}
  - {{from: v2, to: v3, steps: [{second}]}}
"""


@pytest.mark.parametrize(
    "first, second, gone",
    [
        ("{drop: {keys: [b]}}", "{identity: {keys: [a]}}", {"b"}),
        ("{rename: {mapping: {b: bias}}}", "{drop: {keys: [bias]}}", {"b"}),
        ("{scope: {prefix: m., steps: [{drop: {keys: ['*.b']}}]}}", "{rename: {pattern: 'm.**', to: 'n.**'}}", {"m.0.b", "m.1.b"}),
    ],
)
def test_drops_inside_version_chain_rules_happen(tmp_path, capsys, first, second, gone):
    save_file(STATE, tmp_path / "source.safetensors")
    (tmp_path / "c.yaml").write_text(VERSIONS.format(first=first, second=second))
    plan = sb.plan(tmp_path / "source.safetensors", sb.load_config(tmp_path / "c.yaml", to="v3").pipeline())
    assert set(plan.dropped) == gone
    assert main(["run", str(tmp_path / "c.yaml"), "--to", "v3", "--no-progress"]) == 0
    out = load_file(tmp_path / "out.safetensors")
    assert len(out) == len(STATE) - len(gone) and not set(out) & (gone | {"bias"})


def test_nested_pipelines_invert_like_flat_ones():
    state = {"w": torch.randn(2, 3).half(), "m.0.w": torch.randn(4, 2), "m.0.b": torch.randn(4), "n": torch.arange(3)}
    nested = sb.Pipeline(
        [
            sb.Sequential([sb.Cast(pattern="w", dtype="float32"), sb.Rename(mapping={"w": "v"})]),
            sb.Scope(prefix="m.", steps=[sb.Parallel([sb.Transpose(pattern="*.w"), sb.Rename(mapping={"0.b": "0.bias"})])]),
        ]
    )
    forward = execute(state, sb.plan(DictSource(state), nested))
    back = execute(forward, sb.plan(DictSource(forward), nested.inverse(DictSource(state).metas())))
    assert back.keys() == state.keys()
    assert all(back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(NotInvertibleError, match=r"steps\[0\] \(sequential\): steps\[1\] \(drop\)"):
        sb.Pipeline([sb.Sequential([sb.Identity(keys=["n"]), sb.Drop(keys=["n"])])]).inverse(DictSource(state).metas())


# ------------------------------------------------------------------------------------------------
# 2. Inverses touch only what the forward step changed.


@pytest.mark.parametrize(
    "state, steps",
    [
        # float32 1 + 2**-20 was float32 before the cast: it must not come back as float16 1.0
        ({"h": torch.tensor([0.5, 3.0], dtype=torch.float16), "f": torch.tensor([1 + 2**-20])}, [sb.Cast(dtype="float32")]),
        # int64 2**40 was int64 before: it must not come back as an int32 (0)
        ({"i": torch.tensor([7], dtype=torch.int32), "j": torch.tensor([2**40])}, [sb.Cast(dtype="int64", integers=True)]),
        # two dtypes cast into one: each comes back to its own
        ({"h": torch.tensor([0.5], dtype=torch.float16), "g": torch.tensor([1.5], dtype=torch.bfloat16), "d": torch.tensor([1 / 3], dtype=torch.float64)}, [sb.Cast(dtype="float64")]),
        # integers: true with floats only changed: integer tensors stay out of the inverse
        ({"h": torch.tensor([0.25], dtype=torch.float16), "ids": torch.tensor([2**40])}, [sb.Cast(dtype="float32", integers=True, pattern="h")]),
        # nested, with a rename in between
        ({"h": torch.tensor([0.5], dtype=torch.float16), "f": torch.tensor([1 + 2**-20])}, [sb.Scope(prefix="", steps=[sb.Cast(dtype="float32"), sb.Rename(mapping={"h": "x.h"})])]),
    ],
)
def test_cast_inverse_restores_exactly_what_it_cast(state, steps):
    pipeline = sb.Pipeline(steps)
    forward = execute(state, sb.plan(DictSource(state), pipeline))
    inverse = pipeline.inverse(DictSource(state).metas())
    back = execute(forward, sb.plan(DictSource(forward), inverse))
    assert back.keys() == state.keys()
    for key in state:
        assert back[key].dtype == state[key].dtype and torch.equal(back[key], state[key]), (key, back[key], state[key])


class Shout(sb.Transform):
    """Upper-cases one key; its inverse lower-cases every key (a plugin's bug)."""

    name = "shout"

    class Params(sb.Params):
        key: str

    def plan(self, metas):
        return [sb.Group.rename(self.params.key, self.params.key.upper(), metas[self.params.key])]

    def inverse(self, metas):
        return sb.Rename(pattern="re:^(.*)$", to=r"\1_", strict=False)


def test_an_inverse_that_touches_more_than_its_step_changed_is_refused():
    stacked = {"l.0.a": torch.ones(2), "l.0.b": torch.ones(2), "l.1.ab": torch.ones(2, 2)}
    with pytest.raises(NotInvertibleError, match=r"steps\[0\] \(stack\): its inverse \(unstack\) would also change l\.1\.ab"):
        sb.Pipeline([sb.Stack(inputs=["l.*.a", "l.*.b"], output="l.*.ab")]).inverse(DictSource(stacked).metas())
    with pytest.raises(NotInvertibleError, match=r"steps\[0\] \(shout\): its inverse \(rename\) would also change"):
        sb.Pipeline([Shout(key="a")]).inverse(DictSource(STATE).metas())
    with pytest.raises(NotInvertibleError, match=r"parallel\[0\] \(shout\)"):
        sb.Parallel([Shout(key="a")]).inverse(DictSource(STATE).metas())


# ------------------------------------------------------------------------------------------------
# 3. One group never names a key twice.


@pytest.mark.parametrize(
    "step, what",
    [
        (sb.Split(input="a", outputs=["x", "x"]), "the outputs of 'a' name 'x' twice"),
        (sb.Split(input="a", outputs=["x", "y", "x", "z"], sizes=[1, 1, 1, 1]), "name 'x' twice"),
        (sb.Chunk(input="a", outputs=["x", "x"]), "name 'x' twice"),
        (sb.Unstack(input="m.0.w", outputs=["r", "r"]), "the outputs of 'm.0.w' name 'r' twice"),
        (sb.Unstack(input="m.*.w", outputs=["m.*.r", "m.*.r"]), "the outputs of 'm.0.w' name 'm.0.r' twice"),
        (sb.Split(input="m.*.b", outputs=["s.*", "s.*"]), "name 's.0' twice"),
        (sb.Concat(inputs=["a", "a"], output="c"), "the inputs of 'c' name 'a' twice"),
        (sb.Stack(inputs=["m.*.b", "m.*.b"], output="m.*.bb"), "the inputs of 'm.0.bb' name 'm.0.b' twice"),
    ],
)
def test_a_group_naming_a_key_twice_is_refused(step, what):
    with pytest.raises(PlanError, match=what):
        sb.plan(DictSource(STATE), [step])
    with pytest.raises(PlanError, match=what):
        sb.plan(DictSource(STATE), [sb.Sequential([sb.Scope(prefix="", steps=[step])])])


# ------------------------------------------------------------------------------------------------
# 4. A pattern that matches nothing says what it may have meant, in every transform that takes one.


@pytest.mark.parametrize(
    "step, hint",
    [
        (sb.Rename(pattern="mm.*.w", to="x.*"), "did you mean 'm.*.w'"),
        (sb.Rename(pattern="n.**", to="x.**"), "keys look like a, b, m.0.w"),
        (sb.Identity(keys=["m.*.bb"]), "did you mean 'm.*.b'"),
        (sb.Drop(keys=["m.*"]), "'*' matches within one name component: did you mean 'm.**'"),
        (sb.Cast(pattern="mm.*.w", dtype="fp16", strict=True), "did you mean 'm.*.w'"),
        (sb.Transpose(pattern="m.*.ww"), "did you mean 'm.*.w'"),
        (sb.Permute(pattern="m.*.wt", dims=[1, 0]), "did you mean 'm.*.w'"),
        (sb.Reshape(pattern="m.*.w_", shape=[-1]), "did you mean 'm.*.w'"),
        (sb.ValueOp(pattern="m.*.bb", op="zero"), "did you mean 'm.*.b'"),
        (sb.Concat(inputs=["m.*.ww", "m.*.b"], output="m.*.c"), "did you mean 'm.*.w'"),
        (sb.Stack(inputs=["m.*.bb", "m.*.w"], output="m.*.c"), "did you mean 'm.*.b'"),
        (sb.Split(input="m.*.bb", outputs=["x.*", "y.*"]), "did you mean 'm.*.b'"),
        (sb.Unstack(input="m.*.ww", outputs=["x.*", "y.*"]), "did you mean 'm.*.w'"),
        (sb.Rename(pattern=r"re:^model\.", to=""), "keys look like"),
        (sb.Scope(prefix="m.O.", steps=[]), "did you mean 'm.0.'"),
    ],
)
def test_a_pattern_matching_nothing_hints_at_what_was_meant(step, hint):
    with pytest.raises(PlanError) as e:
        sb.plan(DictSource(STATE), [step])
    assert hint in str(e.value)


# ------------------------------------------------------------------------------------------------
# 5. Config values: wrong types and sizes are found when the config is read, one line each.


def config(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    save_file(STATE, tmp_path / "source.safetensors")
    path = tmp_path / name
    path.write_text("source: source.safetensors\ntarget: out.safetensors\n" + text) if isinstance(text, str) else path.write_bytes(text)
    return path


def refused(path: Path, *fragments: str, capsys=None) -> str:
    """Loading ``path`` is a ConfigError whose one line starts with the file and holds ``fragments``."""
    with pytest.raises(ConfigError) as e:
        sb.load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message and "http" not in message, message
    for fragment in fragments:
        assert fragment in message.removeprefix(f"{path}: "), message
    return message


@pytest.mark.parametrize(
    "args, value",
    [("{factor: '2'}", 2.0), ("{factor: 1e-3}", 0.001), ("{factor: 2}", 2.0), ("{factor: '-0.5'}", -0.5)],
)
def test_value_op_numbers_are_read_as_numbers(tmp_path, args, value):
    path = config(tmp_path, f"steps:\n  - value_op: {{pattern: a, op: scale, args: {args}}}\n")
    step = sb.load_config(path).pipeline().steps[0]
    assert step.params.args == {"factor": value} and isinstance(step.params.args["factor"], float)
    assert main(["run", str(path), "--no-progress"]) == 0
    assert torch.equal(load_file(tmp_path / "out.safetensors")["a"], STATE["a"] * value)


@pytest.mark.parametrize(
    "step, fragments",
    [
        ("value_op: {pattern: a, op: scale, args: {factor: abc}}", ["steps[0]: value_op", "args.factor: Input should be a valid number"]),
        ("value_op: {pattern: a, op: scale, args: {factor: yes}}", ["args.factor: True is a boolean, not a number"]),
        ("value_op: {pattern: a, op: add, args: {value: [1]}}", ["op 'add' takes value", "args.value"]),
        ("value_op: {pattern: a, op: clamp, args: {max: {}}}", ["args.max: Input should be a valid number"]),
        ("value_op: {pattern: a, op: fill, args: {}}", ["args.value: Field required"]),
        ("value_op: {pattern: a, op: zero, args: {value: 1}}", ["op 'zero' takes no arguments", "args.value: Extra inputs"]),
        ("value_op: {pattern: a, op: scale, args: 2}", ["value_op.args: Input should be a valid dictionary"]),
        ("value_op: {pattern: a, op: [scale], args: {factor: 2}}", ["value_op.op: Input should be 'scale', 'add'"]),
        ("value_op: {pattern: a, op: fill, args: }", ["op 'fill' takes value: args.value: Field required"]),
    ],
)
def test_value_op_args_are_checked_by_the_ops_own_schema(tmp_path, step, fragments):
    refused(config(tmp_path, f"steps:\n  - rename: {{mapping: {{b: bb}}}}\n  - {step}\n"), *[f.replace("steps[0]", "steps[1]") for f in fragments])


def test_a_yaml_alias_bomb_is_refused_without_expanding_it(tmp_path):
    lines = ['steps:\n  - value_op:\n      pattern: a\n      op: scale\n      args:\n        l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n']
    lines += [f"        l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 7)]  # 9**7 values expanded
    refused(config(tmp_path, "".join(lines)), "once its YAML aliases are expanded")
    refused(config(tmp_path, "steps: &s [{sequential: {steps: *s}}]\n"), "refers to a list or mapping that contains it")
    ok = config(tmp_path, "steps:\n  - &d {drop: {keys: [a]}}\n  - {sequential: {steps: [{identity: {keys: [b]}}]}}\nrequire: &r {coverage: 0.1}\n")
    assert sb.load_config(ok).require.coverage == 0.1  # ordinary anchors are fine


@pytest.mark.parametrize("name, text", [
    ("c.yaml", "steps: " + "[" * 3000 + "]" * 3000 + "\n"),
    ("c.json", '{"source": "s", "steps": ' + "[" * 3000 + "]" * 3000 + "}"),
    ("c.toml", 'source = "s"\nsteps = ' + "[" * 3000 + "]" * 3000 + "\n"),
    ("c.yaml", "steps: " + "[" * 150 + "]" * 150 + "\n"),  # readable, but deeper than any config needs
    ("c.yaml", "steps:\n" + "".join("  " * i + "- sequential:\n" + "  " * i + "    steps:\n" for i in range(0, 120, 2))),
])
def test_deeply_nested_configs_are_refused(tmp_path, name, text):
    path = config(tmp_path, text, name) if name == "c.yaml" else tmp_path / name
    if name != "c.yaml":
        path.write_text(text)
    refused(path, "100 levels")


@pytest.mark.parametrize("data", [b"source: caf\xe9.safetensors\n", b"\xff\xfesource: x\n", "source: x\n".encode("utf-16")])
def test_a_config_that_is_not_utf8_is_refused(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    refused(path, "must be UTF-8 text", "byte 0" if data[0] == 0xFF else "byte")


@pytest.mark.parametrize(
    "name, text, fragments",
    [
        ("c.yaml", "source: a\nsteps: [\n", ["not valid yaml: while parsing a flow node", "(line 3, column 1)"]),
        ("c.yaml", "source: a\n  target: b: c\n", ["not valid yaml: mapping values are not allowed here (line 2, column 9)"]),
        ("c.json", '{"source": "a",}', ["not valid json: "]),
        ("c.toml", 'source = "a"\nsource = "b"\n', ["not valid toml: "]),
        ("c.yaml", "source: a\nworkers: " + "9" * 5000 + "\n", ["not valid yaml: ", "digits"]),
        ("c.json", '{"source": "a", "workers": ' + "9" * 5000 + "}", ["not valid json: ", "digits"]),
        ("c.toml", 'source = "a"\nworkers = ' + "9" * 5000 + "\n", ["not valid toml: ", "digits"]),
    ],
)
def test_unreadable_config_text_is_one_line(tmp_path, capsys, name, text, fragments):
    path = tmp_path / name
    path.write_text(text)
    refused(path, *fragments)
    assert main(["plan", str(path)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_utf8_config_with_a_byte_order_mark_is_read(tmp_path):
    path = config(tmp_path, "")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert sb.load_config(path).source == str(tmp_path / "source.safetensors")


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("shard_size: 0\n", ["shard_size: size 0 is less than one byte"]),
        ("shard_size: -5\n", ["shard_size: size -5 is less than one byte"]),
        ("shard_size: '0MB'\n", ["shard_size: size '0MB' is less than one byte"]),
        ("shard_size: true\n", ["shard_size: cannot read size True"]),
        ("max_memory: 0\n", ["max_memory: size 0 is less than one byte"]),
        ("workers: 0\n", ["workers: Input should be greater than or equal to 1"]),
        ("require: {coverage: abc}\n", ["require.coverage: Input should be a valid number"]),
    ],
)
def test_sizes_and_numbers_are_checked_when_the_config_is_read(tmp_path, text, fragments):
    refused(config(tmp_path, text), *fragments)


def test_zero_shard_size_on_the_command_line_is_refused(tmp_path, capsys):
    path = config(tmp_path, "")
    assert main(["run", str(path), "--shard-size", "0", "--target", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"statebridge: error: {path}: shard_size: size '0' is less than one byte; leave the option out for its default"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text", ["coverage=abc", "coverage=2", "no_missing=maybe", "covrage=1"])
def test_require_flag_errors_are_one_line_without_a_url(tmp_path, capsys, text):
    with pytest.raises(ConfigError) as e:
        Requirements.parse(text)
    message = str(e.value)
    assert message.startswith(f"--require {text!r}: {text.split('=')[0]}: ") and "http" not in message and "\n" not in message
    assert main(["plan", str(config(tmp_path, "")), "--require", text]) == 2
    assert capsys.readouterr().err == f"statebridge: error: {message}\n"


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("target: ~nosuchuser/out.safetensors\n", ["target: cannot expand '~nosuchuser/out.safetensors'"]),
        ("expect: ~nosuchuser/ref.safetensors\n", ["expect: cannot expand"]),
        ('expect: "ref\\0.safetensors"\n', ["expect: a path cannot contain a NUL byte"]),
        ('target: "out\\0.safetensors"\n', ["target: a path cannot contain a NUL byte"]),
        ("steps:\n  - adapt_shapes: {strategy: pad, like: ~nosuchuser/like.safetensors}\n", ["steps[0]: adapt_shapes.like: cannot expand"]),
        ('steps:\n  - sequential: {steps: [{adapt_shapes: {strategy: pad, like: "l\\0.safetensors"}}]}\n', ["steps[0]: sequential.steps", "like: a path cannot contain a NUL byte"]),
    ],
)
def test_unusable_paths_are_refused_naming_the_field(tmp_path, text, fragments):
    refused(config(tmp_path, text), *fragments)


def test_unusable_source_path_in_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"source": "~nosuchuser/s.safetensors", "target": "o.safetensors"}))
    refused(path, "source: cannot expand '~nosuchuser/s.safetensors'")
    path.write_text(json.dumps({"source": "s\u0000.safetensors", "target": "o.safetensors"}))
    refused(path, "source: a path cannot contain a NUL byte")


def test_a_missing_adapt_shapes_like_file_is_one_line_naming_step_and_file(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    path = config(tmp_path, "steps:\n  - adapt_shapes: {strategy: pad, like: missing.safetensors}\n", "sub/c.yaml")
    path.write_text(path.read_text().replace("source: ", "source: ../"))
    with pytest.raises(SourceError) as e:
        sb.plan(sb.load_config(path).source, sb.load_config(path).pipeline())
    assert str(e.value).startswith(f"steps[0] (adapt_shapes): {tmp_path / 'sub' / 'missing.safetensors'}: ")
    assert e.value.path == str(tmp_path / "sub" / "missing.safetensors")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("statebridge: error: steps[0] (adapt_shapes): ") and "missing.safetensors" in err[0]


def test_within_keeps_the_error_type_and_its_attributes():
    error = SourceError("/x/y.safetensors", "truncated").within("steps[2] (adapt_shapes)")
    assert type(error) is SourceError and error.path == "/x/y.safetensors"
    assert str(error) == "steps[2] (adapt_shapes): /x/y.safetensors: truncated"


# ------------------------------------------------------------------------------------------------
# 6. Relative paths resolve against the config's folder, however the field is annotated.


class PathProbe(sb.Transform):
    """A transform with path fields declared every way (they are only recorded, never opened)."""

    name = "path_probe"

    class Params(sb.Params):
        one: sb.PathParam | None = None
        many: list[sb.PathParam] = []
        named: dict[str, sb.PathParam] | None = None
        either: int | sb.PathParam = 0
        label: str = ""

    def plan(self, metas):
        return []


class _ProbePlugin:
    """PathProbe, registered in this process as a plugin would register it."""

    @sb.hookimpl
    def register_transforms(self, register):
        register(PathProbe)


@pytest.fixture
def path_probe():
    reset_plugins()
    installed().add(_ProbePlugin(), "path_probe")
    yield
    reset_plugins()


def test_relative_paths_resolve_against_the_config_folder_however_annotated(tmp_path, monkeypatch, path_probe):
    (tmp_path / "sub").mkdir()
    save_file({"a": torch.ones(6)}, tmp_path / "sub" / "like.safetensors")
    path = config(
        tmp_path,
        "steps:\n  - adapt_shapes: {strategy: pad, like: like.safetensors}\n"
        "  - path_probe: {one: o.bin, many: [m1.bin, /abs/m2.bin], named: {x: n.bin}, either: e.bin, label: not/a/path}\n"
        "  - scope: {prefix: '', steps: [{path_probe: {one: ../up.bin, either: 3}}]}\n",
        "sub/c.yaml",
    )
    path.write_text(path.read_text().replace("source: ", "source: ../"))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    steps = sb.load_config(path).pipeline().steps
    sub = tmp_path / "sub"
    assert steps[0].params.like == str(sub / "like.safetensors")
    probe = steps[1].params
    assert (probe.one, probe.many, probe.named, probe.either, probe.label) == (
        str(sub / "o.bin"), [str(sub / "m1.bin"), "/abs/m2.bin"], {"x": str(sub / "n.bin")}, str(sub / "e.bin"), "not/a/path"
    )
    assert steps[2].steps[0].params.one == str(tmp_path / "up.bin") and steps[2].steps[0].params.either == 3
    plan = sb.plan(sb.load_config(path).source, sb.load_config(path).pipeline())
    assert plan.outputs["a"].shape == (6,)  # padded to the shape in sub/like.safetensors


def test_a_nested_path_error_names_the_nested_step(tmp_path):
    path = config(tmp_path, "steps:\n  - sequential: {steps: [{drop: {keys: [a]}}, {adapt_shapes: {strategy: pad, like: ~nosuchuser/l}}]}\n")
    refused(path, "steps[0]: sequential.steps[1]: adapt_shapes.like: cannot expand '~nosuchuser/l'")


def test_many_problems_in_one_field_are_counted_not_listed(tmp_path):
    message = refused(config(tmp_path, "versions: {" + ", ".join(f"v{i}: {i}" for i in range(200)) + "}\n"))
    assert message.count("versions.v") == 5 and message.endswith("and 195 more problems") and "\n" not in message
    message = refused(config(tmp_path, "metadata: {" + ", ".join(f"k{i}: {{x: {i}}}" for i in range(200)) + "}\n"))
    assert "metadata 'k0': the value {'x': 0} is a dict" in message and "\n" not in message
