"""Peak memory of reading a small slice of a big JSON lines file: the streaming reader against the whole-file reader.

Writes a ~N MB .jsonl file of Alpaca-style rows, then in a fresh subprocess per measurement calls
`load_instruction_rows(path, start=..., rows=20)` -- what the app's data preview does -- with the current
`crma.ablation.data` ("after") and with `crma/ablation/data.py` as it was before the data layer streamed ("before",
read from git). Prints the peak RSS during the call (Linux VmHWM, reset just before it through /proc/self/clear_refs),
its growth over the RSS before the call, and the call's wall time, as medians over interleaved runs. (A .json file is
parsed whole by design: uploads are capped at 64 MB.)

    python benchmarks/bench_data_slice.py [--mb 500] [--rows 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

WORKER = r"""
import importlib.util, json, sys, time
impl, path, start, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if impl == "after":
    from crma.ablation.data import load_instruction_rows
else:
    spec = importlib.util.spec_from_file_location("data_before", impl)
    module = sys.modules["data_before"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    load_instruction_rows = module.load_instruction_rows

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS, so the peak below is the call's own
before = status_kb("VmRSS")
t0 = time.perf_counter()
got = load_instruction_rows(path, start=start, rows=rows)
seconds = time.perf_counter() - t0
assert len(got) == rows
peak = status_kb("VmHWM")
print(json.dumps({"rss_before_mb": before / 1024, "peak_mb": peak / 1024, "growth_mb": (peak - before) / 1024,
                  "seconds": seconds}))
"""


def write_file(folder: Path, megabytes: int) -> tuple[Path, int]:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)]

    def row(i: int) -> dict[str, str]:
        text = " ".join(rng.choice(words) for _ in range(60))
        return {"instruction": f"Row {i}: rewrite this.", "input": text, "output": text[::-1]}

    target = megabytes * 2**20
    path = folder / "big.jsonl"
    n = 0
    with path.open("w", encoding="utf-8") as f:
        while f.tell() < target:
            f.write(json.dumps(row(n)) + "\n")
            n += 1
    return path, n


def before_module(folder: Path) -> Path:
    # The commit that turned crma/ablation/data.py into a package; its parent still has the whole-file reader.
    deleted_in = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%H", "--diff-filter=D", "--", "crma/ablation/data.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{deleted_in}^:crma/ablation/data.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = folder / "before" / "crma" / "ablation" / "data.py"  # the module finds its assets two folders up
    path.parent.mkdir(parents=True)
    path.write_text(source, encoding="utf-8")
    return path


def measure(impl: str, path: Path, start: int, rows: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, impl, str(path), str(start), str(rows)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, n_rows = write_file(folder, args.mb)
        impls = {"before": str(before_module(folder)), "after": "after"}
        size_mb = path.stat().st_size / 2**20
        for label, start in (("first rows", 0), ("last rows", n_rows - args.rows)):
            results: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
                for name, impl in impls.items():
                    results[name].append(measure(impl, path, start, args.rows))
            for name in ("before", "after"):
                growth = statistics.median(r["growth_mb"] for r in results[name])
                peak = statistics.median(r["peak_mb"] for r in results[name])
                seconds = statistics.median(r["seconds"] for r in results[name])
                print(
                    f"jsonl {size_mb:6.0f} MB, {n_rows} rows, {args.rows} {label} (start {start}): "
                    f"{name:6s} peak RSS {peak:7.0f} MB (+{growth:7.1f} MB during the call), {seconds:6.2f} s"
                )


if __name__ == "__main__":
    main()
