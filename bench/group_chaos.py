"""A consumer group under chaos, repeated: how many runs lose records, and the duplicates per kill.

    .venv/bin/python bench/group_chaos.py --runs 20                       # issue 17's run
    .venv/bin/python bench/group_chaos.py --runs 5 --mode rolling         # SIGTERM restarts
    .venv/bin/python bench/group_chaos.py --runs 3 --engine kafka --kill-every 15 --kills 12 \
        --records 200000 --rate 1000                                      # >= 3 minutes each

Each run: three `vaewatch worker` processes (MLP bundle B of bench/worker_throughput.py,
batch-framed scores, scoring in a child process) share a 6-partition input topic on a fresh
broker (--engine: the embedded Tansu, or Apache Kafka); real Fashion-MNIST test images are
produced at --rate; every --kill-every seconds a ready member is SIGKILLed and restarted at
once (tests/streams/group_chaos.py does the run and the accounting). The table gives per run:
lost records (committed past without an output), records not reached by the end of the run (at
or past the committed offsets: the group did not drain its backlog in time), duplicates (and
those no kill explains), kills, assignments, the longest any record waited for its score, and
the maximum lag. It exits non-zero when a run lost or did not reach a record, or produced an
unexplained duplicate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from worker_throughput import fashion_images, make_bundle  # noqa: E402

from streams.brokers.local import ENGINES, create_broker  # noqa: E402
from tests.streams.group_chaos import run_chaos  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--mode", choices=["kill", "rolling"], default="kill")
    parser.add_argument("--records", type=int, default=30_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--kill-every", type=float, default=5.0)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--scoring", choices=["process", "inline"], default="process")
    parser.add_argument("--engine", choices=ENGINES, default="tansu", help="the broker")
    parser.add_argument(
        "--guarantee",
        choices=["at_least_once", "exactly_once"],
        default="at_least_once",
        help="stream.processing_guarantee (exactly_once: any duplicate fails the run)",
    )
    args = parser.parse_args()

    images = fashion_images()
    worker_args = [
        "--set",
        'stream.scores_format="batch"',
        "--set",
        f'stream.cpu_scoring="{args.scoring}"',
    ]
    print(
        f"{args.runs} runs, mode {args.mode}: {args.records} records at {args.rate:.0f} rec/s, "
        f"3 workers, 6 partitions, a {'kill' if args.mode == 'kill' else 'SIGTERM restart'} "
        f"every {args.kill_every:.0f} s, scoring {args.scoring}, broker {args.engine}, "
        f"{args.guarantee}"
    )
    print("| run | lost | not reached | duplicates (unexplained) | per kill | kills "
          "| assignments | longest wait s | max lag | s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        bundle = make_bundle("mlp", Path(scratch) / "bundle", images)
        for run in range(1, args.runs + 1):
            logs = Path(scratch) / f"run{run}"
            logs.mkdir()
            with create_broker(args.engine, log_path=logs / "broker.log") as broker:
                report = run_chaos(
                    broker=broker,
                    model=bundle,
                    log_dir=logs,
                    images=images,
                    mode=args.mode,
                    records=args.records,
                    rate=args.rate,
                    kill_every_s=args.kill_every,
                    kills=args.kills,
                    worker_args=worker_args,
                    seed=run,
                    exactly_once=args.guarantee == "exactly_once",
                )
            failed += not report.passed
            print(
                f"| {run} | {len(report.lost)} | {len(report.unfinished)} | {report.duplicates} "
                f"({len(report.unexplained_duplicates)}) | {report.duplicates_per_kill} "
                f"| {report.kills} | {report.rebalances} | {report.longest_wait_s:.1f} "
                f"| {report.max_lag} | {report.seconds:.0f} |",
                flush=True,
            )
            for what, keys in (("lost", report.lost), ("not reached", report.unfinished)):
                if keys:
                    print(f"    {what} (partition, offset): {keys[:12]}", flush=True)
    print(
        f"{args.runs - failed} of {args.runs} runs passed (nothing lost, every record reached, "
        "no unexplained duplicate)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
