"""Preparing a pretraining corpus at scale: time and peak memory against corpus size and processes, and the time a run
on the prepared corpus takes to reach its first training step.

    python benchmarks/prepare_corpus.py --sizes 10,100,1000 --procs 1,2 --work-dir /tmp/prep-bench \
        --out benchmarks/results/prepare_corpus.json

1. The corpus of each size (MB of text) is made from WikiText-2's raw test split (../shared/data): its articles
   (a ` = Title = ` row starts one), repeated in a new shuffled order each time, written as WikiText rows (a row a
   line) into text files of at most --file-mb each, under --work-dir (never committed; kept for later runs).
2. `bert-dist prepare --train-file '<dir>/*.txt' --tokenizer T --num-proc P` (the real command, in a subprocess,
   into a fresh --prepared-dir): wall and CPU seconds, and the peak memory of its processes together (the sum of
   their resident sets, sampled every 0.1 s: an upper bound, shared library pages are counted once per process;
   and the sum of their proportional sets, which counts a shared page once).
3. With --first-step: `bert-dist pretrain` with the same corpus flags (so it finds the prepared corpus) on one
   process, --preset tiny: the seconds from its start to the log line of its first training step.

Prints a markdown table and writes --out (JSON). Nothing here asserts a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def articles(data_dir: Path) -> list[list[str]]:
    """WikiText-2 raw test rows, cut into articles at each ` = Title = ` row."""
    from bert_dist.data.corpus import is_title

    rows = [json.loads(line)["text"] for line in (data_dir / "wikitext-2" / "test.jsonl").open(encoding="utf-8")]
    out: list[list[str]] = []
    for row in rows:
        if is_title(row) or not out:
            out.append([])
        out[-1].append(row)
    return out


def make_corpus(data_dir: Path, out: Path, size_mb: float, file_mb: float, seed: int = 0) -> list[Path]:
    """Text files of `size_mb` MB in all under `out` (kept: made once per size)."""
    done = out / "DONE"
    if done.is_file():
        return sorted(out.glob("*.txt"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    arts = [("".join(r if r.endswith("\n") else r + "\n" for r in a)).encode() for a in articles(data_dir)]
    rng = random.Random(seed)
    target, written, part, chunk = int(size_mb * 1e6), 0, 0, []

    def flush() -> None:
        nonlocal part
        (out / f"part-{part:04d}.txt").write_bytes(b"".join(chunk))
        part += 1
        chunk.clear()

    while written < target:
        order = list(range(len(arts)))
        rng.shuffle(order)
        for i in order:
            chunk.append(arts[i])
            written += len(arts[i])
            if written >= target:
                break
            if sum(map(len, chunk)) >= file_mb * 1e6:
                flush()
    flush()
    done.write_text(str(written))
    return sorted(out.glob("*.txt"))


class PeakMemory:
    """The peak, over time, of the summed RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.1):
        import psutil

        self.proc, self.every = psutil.Process(pid), every
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            rss = pss = 0
            try:
                for p in [self.proc, *self.proc.children(recursive=True)]:
                    try:
                        m = p.memory_full_info()
                        rss, pss = rss + m.rss, pss + getattr(m, "pss", m.rss)
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
            except psutil.NoSuchProcess:
                break
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            time.sleep(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], log: Path, watch_for: str | None = None) -> dict:
    """Run `cmd` (output to `log`); wall and CPU seconds (of the process and its children), peak memory, and the
    seconds until a line containing `watch_for` appeared on its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    seen_at = None
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                env=dict(os.environ, COLUMNS="200"))
        peak = PeakMemory(proc.pid)
        for line in proc.stdout:
            fh.write(line)
            if watch_for and seen_at is None and watch_for in line:
                seen_at = time.perf_counter() - t0
        proc.wait()
        peak.stop()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_mb": round(peak.rss / 2**20), "peak_pss_mb": round(peak.pss / 2**20),
            **({"seconds_to_first_step": round(seen_at, 2) if seen_at else None} if watch_for else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100,1000", help="corpus sizes, MB of text (comma-separated)")
    p.add_argument("--procs", default="1,2", help="--num-proc values to time (comma-separated)")
    p.add_argument("--objective", default="mlm-nsp", choices=["mlm-nsp", "mlm"])
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"), help="holds wikitext-2/test.jsonl")
    p.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "models" / "all-MiniLM-L6-v2"))
    p.add_argument("--file-mb", type=float, default=100.0, help="the corpus is written in files of at most this size")
    p.add_argument("--shard-mb", type=float, default=None, help="--shard-mb for preparation (default: bert-dist's)")
    p.add_argument("--first-step", action="store_true", help="also time a run on each prepared corpus to its step 1")
    p.add_argument("--keep", action="store_true", help="keep the prepared corpora (else each is removed after)")
    p.add_argument("--work-dir", default="/tmp/prep-bench")
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    env_note = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        files = make_corpus(Path(args.data_dir), work / f"corpus-{size:g}MB", size, args.file_mb)
        text_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"corpus {size:g} MB: {len(files)} file(s), {text_mb:.1f} MB ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        for procs in (int(x) for x in args.procs.split(",")):
            prepared = work / f"prepared-{size:g}MB-{procs}p"
            shutil.rmtree(prepared, ignore_errors=True)
            flags = ["--train-file", str(files[0].parent / "*.txt"), "--tokenizer", args.tokenizer, "--objective",
                     args.objective, "--prepared-dir", str(prepared),
                     *(["--shard-mb", str(args.shard_mb)] if args.shard_mb else [])]
            cmd = [sys.executable, "-m", "bert_dist.cli", "prepare", *flags, "--num-proc", str(procs)]
            print("+", " ".join(cmd), flush=True)
            row = {"size_mb": size, "text_mb": round(text_mb, 1), "files": len(files), "procs": procs,
                   **run_measured(cmd, work / f"prepare-{size:g}MB-{procs}p.log")}
            manifest = json.loads((prepared / "manifest.json").read_text())
            row.update(units=manifest["units"], examples=manifest["splits"]["train"]["examples"],
                       tokens=manifest["splits"]["train"]["tokens"],
                       disk_mb=round(sum(f.stat().st_size for f in prepared.rglob("*") if f.is_file()) / 1e6),
                       mb_per_s=round(text_mb / row["wall_s"], 2))
            if args.first_step:
                run = [sys.executable, "-m", "bert_dist.run", "--task", "pretrain", *flags, "--preset", "tiny",
                       "--max-steps", "1", "--log-every", "1", "--max-eval-samples", "8", "--output-dir",
                       str(work / "first-step-run"), "--overwrite"]
                print("+", " ".join(run), flush=True)
                first = run_measured(run, work / f"first-step-{size:g}MB-{procs}p.log", watch_for="step=1 ")
                row.update(first_step_s=first["seconds_to_first_step"], first_step_run_wall_s=first["wall_s"],
                           first_step_peak_rss_mb=first["peak_rss_mb"])
            print(json.dumps(row), flush=True)
            rows.append(row)
            if not args.keep:
                shutil.rmtree(prepared, ignore_errors=True)
    results = {"rows": rows, "objective": args.objective, "tokenizer": args.tokenizer, "shard_mb": args.shard_mb,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{platform.platform()}", "load_average_at_end": os.getloadavg(), "env": env_note}
    print_table(rows)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def print_table(rows: list[dict]) -> None:
    print("\n| text | processes | wall s | CPU s | MB/s | peak RSS (sum) | peak PSS (sum) | units | examples | on disk "
          "| first step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        first = f"{r['first_step_s']} s" if r.get("first_step_s") is not None else "-"
        print(f"| {r['text_mb']} MB | {r['procs']} | {r['wall_s']} | {r['cpu_s']} | {r['mb_per_s']} | "
              f"{r['peak_rss_mb']} MB | {r['peak_pss_mb']} MB | {r['units']} | {r['examples']:,} | {r['disk_mb']} MB "
              f"| {first} |")
    by = {(r["size_mb"], r["procs"]): r for r in rows}
    for (size, procs), r in sorted(by.items()):
        if procs != 1 and (size, 1) in by:
            print(f"{size:g} MB: {procs} processes {by[(size, 1)]['wall_s'] / r['wall_s']:.2f}x as fast as 1")
    sizes = sorted({s for s, _ in by})
    for procs in sorted({p for _, p in by}):
        for a, b in zip(sizes, sizes[1:]):
            if (a, procs) in by and (b, procs) in by:
                print(f"{procs} process(es): {b:g} MB took {by[(b, procs)]['wall_s'] / by[(a, procs)]['wall_s']:.2f}x "
                      f"the time of {a:g} MB ({b / a:g}x the text)")


if __name__ == "__main__":
    main()
