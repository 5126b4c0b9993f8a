"""Analysis plugin: ``statebridge diff`` at scale, headers only and with ``--content``.

Two sets of cases, each case a fresh process, interleaved round robin (``common.compare``),
``--repeat`` runs each (default 3), medians and ranges:

- **100,000 keys, headers only.** A: ``statebridge.testing.write_many_tensors`` (a
  mixture-of-experts layout of tiny tensors); B: the same bytes under a header with every
  ``model.`` prefix dropped (every key moved).  Cases: ``statebridge diff A B`` (the whole
  command: start-up, both headers, the diff, the folded text); in process, the comparison
  alone (``diff(metas_a, metas_b)``, the headers read before the timer) and the headers read
  plus the comparison (``compare(open A, open B)``).  Target (issue 11): < 2 s.
- **2.5 GB, ``--content``.** A: a llama-style float16 checkpoint of 2.46 GB (``common.LLAMA_2_5G``);
  B: the same bytes under a header with ``model.`` dropped, so every tensor is read and hashed
  on both sides and every pairing confirmed.  Baseline: ``sha256sum A B`` (reading and hashing
  both files is the least any content diff does).  Both files are in the page cache.
  Targets: at most 1.5x ``sha256sum``'s time, peak RSS at most 300 MB.  Coreutils' ``sha256sum``
  (9.1 here) does not use the CPU's SHA instructions, OpenSSL (and so Python's ``hashlib``) does:
  both are measured too, ``hashlib`` being the floor of the plugin's own way of hashing.

    python benchmarks/diff_scale.py [--repeat 3] [--keys 100000] [--only headers|content]
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import CACHE, LLAMA_2_5G, MB, compare, llama_checkpoint, machine, parser, python_case, table  # noqa: E402


#: the floor with the library the plugin hashes with: both files read 8 MB at a time into sha256
HASHLIB = """
import hashlib, sys
for name in sys.argv[1:]:
    digest, buffer = hashlib.sha256(), bytearray(8 << 20)
    with open(name, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(memoryview(buffer)[:n])
    print(digest.hexdigest(), name)
"""


def renamed_copy(source: Path, target: Path) -> None:
    """``source`` (safetensors) under a header with ``model.`` dropped from every key; the data copied as it is."""
    with open(source, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        raw = json.dumps({k.removeprefix("model."): v for k, v in header.items()}, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(target, "wb") as out:
            out.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(f, out, 64 * MB)


def header_cases(a: Path, b: Path) -> list[tuple[str, list[str]]]:
    statebridge = [sys.executable, "-m", "statebridge"]
    return [
        ("`statebridge diff A B` (whole process)", [*statebridge, "diff", str(a), str(b)]),
        ("`diff(metas A, metas B)` (in process; headers read before)", python_case(
            f"""
            import statebridge as sb
            from statebridge_analysis.diff import diff
            ma, mb = sb.open_source({str(a)!r}).metas(), sb.open_source({str(b)!r}).metas()
            """,
            "changes = diff(ma, mb)",
        )),
        ("`compare(open A, open B)` (in process; headers read in it)", python_case(
            """
            import statebridge as sb
            from statebridge_analysis.diff import compare
            """,
            f"report = compare(sb.open_source({str(a)!r}), sb.open_source({str(b)!r}))",
        )),
    ]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--only", choices=("headers", "content"), help="only the header-only or only the content cases")
    args = p.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # the cases run from cached bytecode, as installed code does
    print(machine())
    print(f"load average before: {os.getloadavg()}")
    if args.only != "content":
        header_only(args.keys, args.repeat)
    if args.only == "headers":
        return
    content(args.repeat)


def header_only(keys: int, repeat: int) -> None:
    from statebridge.testing import write_many_tensors

    with tempfile.TemporaryDirectory() as folder:
        a, b = Path(folder) / "a.safetensors", Path(folder) / "b.safetensors"
        count = write_many_tensors(a, keys)
        renamed_copy(a, b)
        results = compare(header_cases(a, b), repeat, lambda: None)
        print(table(f"Header-only diff, {count:,} keys a side", results, {}))
    print(f"load average: {os.getloadavg()}")


def content(repeat: int) -> None:
    a = llama_checkpoint("llama-2.5g", LLAMA_2_5G) / "model.safetensors"
    b = CACHE / "llama-2.5g-renamed.safetensors"
    if not b.exists() or b.stat().st_mtime < a.stat().st_mtime:  # written after A: complete
        renamed_copy(a, b)
    cases = [
        ("`sha256sum A B` (baseline)", ["sha256sum", str(a), str(b)]),
        ("`openssl dgst -sha256 A B` (SHA-NI)", ["openssl", "dgst", "-sha256", str(a), str(b)]),
        ("Python `hashlib.sha256` of A and B, 8 MB reads", [sys.executable, "-c", HASHLIB, str(a), str(b)]),
        ("`statebridge diff A B --content`", [sys.executable, "-m", "statebridge", "diff", str(a), str(b), "--content"]),
    ]
    results = compare(cases, repeat, lambda: None)
    size = (a.stat().st_size + b.stat().st_size) / 1e9
    print(table(f"Content diff, two checkpoints of {a.stat().st_size / 1e9:.2f} GB ({size:.2f} GB read)", results,
                {"vs sha256sum": ("wall", "`sha256sum A B` (baseline)")}))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
