"""The long fuzzing run (issue 17): the targets of tests/test_fuzz.py, for minutes, random seeds.

    python scripts/fuzz.py --minutes 10                  # all targets, round robin
    python scripts/fuzz.py --minutes 2 --targets onnx,config
    python scripts/fuzz.py --replay fuzz-findings/config-1   # rerun one saved finding
    python scripts/fuzz.py --atheris safetensors --minutes 5  # coverage-guided (pip install atheris)

Each finding (an exception that is not a QuantwiseError, a hang, an allocation past the memory
cap; see tests/fuzz_targets.py) is shrunk by hypothesis and saved as a folder: case/ (the files),
traceback.txt and target.txt; --replay reruns it. Prints examples per target; exits 1 on a finding.
A crash that kills the process (a segfault in a native library) leaves its case in
$TMPDIR/fuzz-<target>-*/ and faulthandler's traceback on stderr.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import shutil
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # fuzz_targets, fuzz_seeds, fuzz_strategies


def _signature(exc: BaseException) -> tuple:
    """Where a finding comes from: its type and the innermost frame in quantwise (else the last)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/quantwise/" in f.filename] or frames or [None]
    where = ours[-1]
    return (type(exc).__name__, where.filename.split("src/")[-1] if where else "?", where.lineno if where else 0)


def _save(out: Path, name: str, files: dict, exc_text: str, index: int) -> Path:
    folder = out / f"{name}-{index}"
    shutil.rmtree(folder, ignore_errors=True)
    from fuzz_targets import write_case

    write_case(files, folder / "case")  # as the target saw it (outside.bin beside it)
    (folder / "target.txt").write_text(name + "\n")
    (folder / "traceback.txt").write_text(exc_text)
    return folder


def _read_case(folder: Path) -> dict:
    files = {}
    for path in sorted((folder / "case").rglob("*")):
        rel = str(path.relative_to(folder / "case"))
        if path.is_symlink():
            files[rel] = ("symlink", os.readlink(path))
        elif path.is_file():
            files[rel] = path.read_bytes()
    return files


def replay(folder: Path) -> int:
    from fuzz_targets import TARGETS, run_case

    name = (folder / "target.txt").read_text().strip()
    try:
        run_case(TARGETS[name], _read_case(folder))
    except BaseException:  # noqa: BLE001 - the finding itself, shown in full
        traceback.print_exc()
        return 1
    print(f"{folder}: {name} passes now")
    return 0


def fuzz(names: list[str], minutes: float, out: Path, seed: int) -> int:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from fuzz_targets import TARGETS, run_case

    rng = random.Random(seed)
    counts = {n: 0 for n in names}
    findings: dict[tuple, Path] = {}
    deadline = time.monotonic() + 60 * minutes
    total_weight = sum(TARGETS[n].examples for n in names)
    while time.monotonic() < deadline:
        for name in names:
            target = TARGETS[name]
            # slices in proportion to the short run's counts: slow targets get fewer examples
            chunk = max(5, target.examples // 5)
            budget = 60 * minutes * target.examples / total_weight / 10
            failing: list = []

            def make(target=target, name=name, failing=failing, chunk=chunk):
                @hseed(rng.getrandbits(64))
                @settings(max_examples=chunk, deadline=None, database=None, derandomize=False,
                          suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                          phases=[Phase.generate, Phase.shrink], print_blob=False)
                @given(target.strategy())
                def run(files):
                    counts[name] += 1
                    try:
                        run_case(target, files)
                    except BaseException as exc:  # noqa: BLE001 - run_case lets only findings out
                        failing[:] = [files, exc]
                        raise
                return run

            start = time.monotonic()
            while time.monotonic() - start < budget and time.monotonic() < deadline:
                failing.clear()
                try:
                    make()()
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001
                    files, found = failing if failing else ({}, exc)
                    key = (name,) + _signature(found)
                    text = "".join(traceback.format_exception(found))
                    if key not in findings:
                        findings[key] = _save(out, name, files, text, len(findings) + 1)
                        print(f"FINDING {name}: {key[1:]} -> {findings[key]}\n{text[-1500:]}", flush=True)
            if time.monotonic() >= deadline:
                break
    print(f"\nseed {seed}, {minutes:g} min; examples per target (hypothesis calls, shrinking included):")
    for name in names:
        print(f"  {name:18s} {counts[name]:7d}")
    print(f"  {'total':18s} {sum(counts.values()):7d}")
    print(f"findings: {len(findings)}")
    for key, folder in findings.items():
        print(f"  {key[0]}: {key[1]} at {key[2]}:{key[3]} -> python scripts/fuzz.py --replay {folder}")
    return 1 if findings else 0


def run_atheris(name: str, minutes: float) -> int:
    import atheris

    with atheris.instrument_imports(include=["quantwise"]):
        import quantwise  # noqa: F401 - instrumented for coverage feedback
    from hypothesis import HealthCheck, given, settings

    from fuzz_targets import TARGETS, run_case

    target = TARGETS[name]

    @settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(target.strategy())
    def run(files):
        run_case(target, files)

    # atheris's bytes drive hypothesis's choices: coverage-guided, still structure-aware
    atheris.Setup([sys.argv[0], f"-max_total_time={int(60 * minutes)}", "-rss_limit_mb=8192"],
                  run.hypothesis.fuzz_one_input)
    atheris.Fuzz()
    return 0


def main() -> int:
    from fuzz_targets import TARGETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated; default: all")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--out", type=Path, default=ROOT / "fuzz-findings")
    parser.add_argument("--replay", type=Path, help="rerun one saved finding folder")
    parser.add_argument("--atheris", metavar="TARGET", help="coverage-guided run of one target")
    args = parser.parse_args()
    faulthandler.enable()
    warnings.filterwarnings("ignore", message="Generating overly large repr")
    if args.replay:
        return replay(args.replay)
    if args.atheris:
        return run_atheris(args.atheris, args.minutes)
    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; valid: {', '.join(TARGETS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    return fuzz(names, args.minutes, args.out, seed)


if __name__ == "__main__":
    sys.exit(main())
