"""SIGKILL quantwise's writers at random points and check the previous output survives (issue 17).

    python scripts/crash_safety.py --kills 200 [--seed 17] [--races 4] [--json result.json]

Four writers: quantwise.save, `quantwise quantize --out X --overwrite` (cli.main), the ONNX file
write of `quantwise export` (onnx_export._save under the output lock, on programs exported once)
and a QAT checkpoint (qatjob._save_checkpoint). This process imports torch once and prepares two
versions (A, B) of each output; each kill point forks a grandchild that writes the other version
over the current one; the grandchild reports on a pipe when the write starts and ends, and is
killed after a seeded random delay spread over the measured write time (a tenth of the points
land just after it, while the process runs on). After each kill the output must be A or B byte
for byte and load to the same outputs; leftovers must be names the next writer removes
(fileio: `.NAME.qw-*`). Races: two grandchildren write the same output at once: one wins whole,
a loser fails clearly.
tests/test_crash_safety.py runs this with 50 kills.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import random
import re
import select
import signal
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)  # before any work: the grandchildren are forked from this process

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import quantwise  # noqa: E402
from quantwise import cli, job, qatjob  # noqa: E402
from quantwise.export import onnx_export  # noqa: E402
from quantwise.fileio import output_lock  # noqa: E402
from quantwise.models.digits import digits_data  # noqa: E402
from quantwise.models.registry import load_model  # noqa: E402
from quantwise.qat import prepare_qat  # noqa: E402

BUSY = "another quantwise process is writing"


def snapshot(path: Path) -> dict[str, str] | None:
    """sha256 of every file of a folder (or of one file), None when missing."""
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(out: Path) -> tuple[list[str], list[str]]:
    """(names the next writer removes, any other stray name) beside `out`."""
    cleanable = re.compile(rf"\.?\.{re.escape(out.name)}\.qw-.+")
    names = sorted(p.name for p in out.parent.iterdir() if p.name != out.name)
    return [n for n in names if cleanable.fullmatch(n)], [n for n in names if not cleanable.fullmatch(n)]


class Writer:
    """One output, two versions; write(v) runs in a grandchild, verify() here."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.out = work / self.name / self.leaf
        self.out.parent.mkdir(parents=True)
        self.refs: dict[int, tuple[dict, object]] = {}  # version -> (snapshot, reference outputs)

    def reference(self) -> None:
        for v in (1, 0):  # ends with version 0 in place
            run_child(lambda v=v: self.write(v), wait=True)
            self.refs[v] = (snapshot(self.out), self.outputs(v))

    def verify(self) -> tuple[int | None, str]:
        snap = snapshot(self.out)
        version = next((v for v, (s, _) in self.refs.items() if s == snap), None)
        if version is None:
            return None, f"{self.out} is neither version: {snap}"
        try:
            same = self.same(self.outputs(version), self.refs[version][1])
        except Exception as exc:  # noqa: BLE001 - reported as a failure
            return None, f"{self.out} does not load: {exc!r}"
        return (version, "") if same else (None, f"{self.out} loads to other outputs")

    def same(self, a, b) -> bool:
        return torch.equal(a, b)


class SaveWriter(Writer):
    name, leaf = "save", "digits-q"

    def __init__(self, work, model, x, calib):
        super().__init__(work)
        self.model, self.x = model, x
        self.q = [quantwise.quantize(model, c, calib, progress=False) for c in ("w8a8", "w4a8")]

    def write(self, v):
        hooked(lambda: quantwise.save(self.q[v], self.out, overwrite=True))

    def outputs(self, v):
        with torch.no_grad():
            return quantwise.load(self.out, model=self.model)(self.x)


class CliWriter(SaveWriter):
    name, leaf = "cli", "digits-q"

    def __init__(self, work, model, x, calib):
        Writer.__init__(self, work)
        self.model, self.x = model, x

    def write(self, v):
        real = job.save
        job.save = lambda *a, **k: hooked(lambda: real(*a, **k))  # marks the write, nothing more
        code = cli.main(["quantize", "digits", "--config", ("w8a8", "w4a8")[v], "--out",
                         str(self.out), "--overwrite", "--quiet"])
        os._exit(code)


class ExportWriter(Writer):
    name, leaf = "export", "digits.onnx"

    def __init__(self, work, model, x, calib):
        super().__init__(work)
        self.x = x[:4].numpy()
        self.programs = []
        real = onnx_export._save
        onnx_export._save = lambda program, path: (self.programs.append(program), real(program, path))[1]
        try:  # the exporter runs once per version; the kills hit the file write
            for c in ("w8a8", "w4a8"):
                q = quantwise.quantize(model, c, calib, progress=False)
                onnx_export.export_onnx(q, x[:1], work / f"ref-{c}.onnx")
        finally:
            onnx_export._save = real

    def write(self, v):
        with output_lock(self.out):  # as export_onnx holds it around _save
            hooked(lambda: onnx_export._save(self.programs[v], self.out))

    def outputs(self, v):
        onnx.checker.check_model(onnx.load(str(self.out)))
        session = ort.InferenceSession(self.out.read_bytes(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: self.x})[0]

    def same(self, a, b):
        return np.array_equal(a, b)


class QatWriter(Writer):
    name, leaf = "qat", "run/" + qatjob.CHECKPOINT

    def __init__(self, work, model, x, calib):
        super().__init__(work)
        self.model, self.x, self.calib = model, x, calib
        self.states = [self.trained(steps) for steps in (1, 2)]  # epochs 1 and 2

    def fresh(self):
        torch.manual_seed(0)
        qat = prepare_qat(copy.deepcopy(self.model), "w4a4", self.calib, progress=False)
        opt = torch.optim.AdamW(qat.parameters(), lr=1e-4)
        return qat, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))

    def trained(self, steps):
        qat, opt, sched = self.fresh()
        for _ in range(steps):
            loss = qat(self.x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return qat, opt, sched

    def write(self, v):
        qat, opt, sched = self.states[v]
        hooked(lambda: qatjob._save_checkpoint(self.out, qat, opt, sched, v + 1, [0.5] * (v + 1)))

    def outputs(self, v):
        """What --resume reads (qatjob._load_checkpoint): the epoch and the model tensors."""
        assert (self.out / "state.json").is_file()  # --resume's precondition
        qat, opt, sched = self.fresh()
        epoch, _ = qatjob._load_checkpoint(self.out, qat, opt, sched)
        assert epoch == v + 1 and sched.last_epoch == v + 1
        return torch.cat([t.flatten().float() for t in qat.state_dict().values()])


WRITERS = [SaveWriter, CliWriter, ExportWriter, QatWriter]
_signal_fd: int | None = None  # the grandchild's end of the pipe


def hooked(write):
    """Tell the parent the write starts ("s") and ended ("e")."""
    if _signal_fd is not None:
        os.write(_signal_fd, b"s")
    result = write()
    if _signal_fd is not None:
        os.write(_signal_fd, b"e")
    return result


def run_child(action, wait=False, stderr: Path | None = None, gate: int | None = None):
    """Fork a grandchild running `action`; (pid, read end of its pipe). Exit 0 on success,
    3 on OutputPathError saying another process writes, 4 on any other error."""
    global _signal_fd
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT, 0o644) if stderr else devnull, 2)
        _signal_fd, code = w, 0
        try:
            if gate is not None:
                os.read(gate, 1)  # both racers start together
            action()
        except quantwise.QuantwiseError as exc:
            print(f"quantwise: error: {exc}", file=sys.stderr)
            code = 3 if BUSY in str(exc) else 4
        except BaseException as exc:  # noqa: BLE001
            print(repr(exc), file=sys.stderr)
            code = 4
        sys.stderr.flush()
        os._exit(code)
    os.close(w)
    if wait:
        _, status = os.waitpid(pid, 0)
        os.close(r)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"reference write failed ({status})")
        return None
    return pid, r


def measure(writer: Writer, version: int, rounds: int = 5) -> float:
    """Seconds between the grandchild's "s" and "e" marks: the shortest of `rounds` (on a busy
    machine the longer ones are waits; the kill points should land inside the write)."""
    times = []
    for i in range(rounds):
        pid, r = run_child(lambda v=(version + i) % 2: writer.write(v))
        os.read(r, 1)
        start = time.perf_counter()
        os.read(r, 1)
        times.append(time.perf_counter() - start)
        os.waitpid(pid, 0)
        os.close(r)
    return min(times)


def kill_points(writer: Writer, count: int, rng: random.Random) -> dict:
    version, _ = writer.verify()
    duration = measure(writer, 1 - version)
    version, _ = writer.verify()
    result = {"kills": count, "write_s": round(duration, 4), "mid_write": 0, "staging_seen": 0,
              "intact": 0, "new_version_in_place": 0, "failures": [], "stray": set()}
    for _ in range(count):
        target = 1 - version
        pid, r = run_child(lambda t=target: writer.write(t))
        os.read(r, 1)
        # 90% inside the write, 10% just after it, while the process runs on
        delay = rng.uniform(0, duration) if rng.random() < 0.9 else rng.uniform(duration, 1.5 * duration)
        time.sleep(delay)
        ended = bool(select.select([r], [], [], 0)[0])
        staging = [n for n in os.listdir(writer.out.parent)
                   if n.startswith(f".{writer.out.name}.") and not n.endswith(".qw-lock")]
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        result["mid_write"] += not ended
        result["staging_seen"] += bool(staging) and not ended
        got, why = writer.verify()
        if got is None:
            result["failures"].append(f"delay {delay:.4f}s: {why}")
            break
        result["intact"] += 1
        result["new_version_in_place"] += got == target
        result["stray"].update(leftovers(writer.out)[1])
        version = got
    run_child(lambda: writer.write(1 - version), wait=True)  # the next run cleans up
    result["after_next_write"] = sum(leftovers(writer.out), [])
    result["stray"] = sorted(result["stray"])
    return result


def races(writer: Writer, rounds: int, work: Path) -> dict:
    """Two grandchildren released together onto the same output."""
    result = {"rounds": rounds, "one_failed_clearly": 0, "both_succeeded": 0, "failures": []}
    for i in range(rounds):
        gate_r, gate_w = os.pipe()
        logs = [work / f"race-{writer.name}-{i}-{v}.err" for v in (0, 1)]
        kids = [run_child(lambda v=v: writer.write(v), stderr=logs[v], gate=gate_r) for v in (0, 1)]
        os.write(gate_w, b"gg")
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid, _ in kids]
        for fd in (gate_r, gate_w, *(r for _, r in kids)):
            os.close(fd)
        texts = [p.read_text() for p in logs]
        got, why = writer.verify()
        if got is None:
            result["failures"].append(why)
        elif sorted(codes) == [0, 0]:
            result["both_succeeded"] += 1  # one after the other: the last one is in place, whole
        elif 0 in codes and all(c == 0 or (BUSY in t) for c, t in zip(codes, texts)) and codes[got] == 0:
            result["one_failed_clearly"] += 1
        else:
            result["failures"].append(f"exit codes {codes}, version {got} in place: {texts}")
    return result


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def run(kills: int, seed: int, race_rounds: int, work: Path) -> dict:
    started = time.perf_counter()
    rng = random.Random(seed)
    model, _ = load_model("digits")
    x, _ = digits_data("test")
    x = x[:64]
    calib = [x[:32]]
    report = {"command": " ".join(["python", "scripts/crash_safety.py", "--kills", str(kills), "--seed",
                                   str(seed), "--races", str(race_rounds)]),
              "date": datetime.date.today().isoformat(), "cpu": cpu_name(), "seed": seed, "writers": {}}
    for i, cls in enumerate(WRITERS):
        writer = cls(work, model, x, calib)
        writer.reference()
        count = kills // len(WRITERS) + (i < kills % len(WRITERS))
        entry = kill_points(writer, count, rng)
        entry["races"] = races(writer, race_rounds, work)
        report["writers"][writer.name] = entry
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--races", type=int, default=2, help="race rounds per writer")
    parser.add_argument("--work", type=Path, help="a folder for the outputs (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        report = run(args.kills, args.seed, args.races, work)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    ok = all(not w["failures"] and not w["races"]["failures"] and w["intact"] == w["kills"]
             for w in report["writers"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
