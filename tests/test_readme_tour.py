"""The README's five-minute tour, run as written, in order, on the demo's checkpoint.

The commands, the config and the Python snippet are taken from README.md itself, so a
change that breaks the tour (or a tour that drifts from the code) fails here.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tour() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## A five-minute tour") : text.index("## Documentation")]


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_the_tour_runs_as_written(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("demo", ROOT / "examples" / "demo" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # type: ignore[union-attr]
    out = tmp_path / "demo-out"
    demo.build_llama(out)
    (out / "keep-me.txt").write_text("a user's file")

    tour = _tour()
    (config,) = _blocks(tour, "yaml")
    assert config.startswith("# demo-out/fuse.yaml\n")
    (out / "fuse.yaml").write_text(config)

    commands = [line[2:].split("#")[0].strip() for block in _blocks(tour, "console") for line in block.splitlines() if line.startswith("$ ")]
    assert commands[0] == "statebridge inspect demo-out/llama" and len(commands) >= 7
    for command in commands:
        if ">" in command:  # statebridge schema > file
            command, target = (part.strip() for part in command.split(">"))
        args = command.split()[1:]
        done = subprocess.run([sys.executable, "-m", "statebridge", *args], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, f"$ {command}\n{done.stderr}"
        if args[:2] == ["plan", "demo-out/fuse.yaml"]:
            assert "concat(dim=0) -> rename:" in done.stdout and "lm_head.weight" in done.stdout
        if "--dry-run" in args:
            assert done.stdout.rstrip().endswith("dry run: nothing was written") and not (out / "fused").exists()

    (snippet,) = _blocks(tour, "python")
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "llama-py").is_dir() and (out / "llama-again").is_dir()
    assert (out / "keep-me.txt").read_text() == "a user's file"
