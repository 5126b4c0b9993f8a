"""The example grows 4 -> 6 blocks and 1x -> 2x width, trains with EWC and saves a .tprog that reads back whole."""

from __future__ import annotations

import pytest

import runpy
from pathlib import Path

from statebridge_progressive import tprog
from statebridge_progressive.ewc import EWC

EXAMPLE = Path(__file__).parents[3] / "examples/progressive/grow_and_train.py"


@pytest.mark.slow  # trains two models and takes a Fisher: about 40 s
def test_example_grows_trains_and_saves(tmp_path: Path, capsys) -> None:
    runpy.run_path(str(EXAMPLE), run_name="example")["main"](tmp_path)
    printed = capsys.readouterr().out
    difference = float(printed.split("max |logit difference| to the small model ")[1].split()[0])
    assert difference <= 1e-4
    trained = tprog.read(tmp_path / "trained.tprog")
    meta = trained.meta
    assert [h.method for h in meta.expansion_history] == ["grow_depth(llama_pro)", "grow_width"]
    assert (meta.current_size.num_layers, meta.current_size.hidden_size) == (6, 128)
    assert meta.training_progress.steps == 40 and meta.ewc_config.stored and meta.ewc_config.fisher == "true"
    assert EWC.from_checkpoint(trained).lam == 1e4
    assert trained.part("training/optimizer") and trained.part("training/rng")
