"""``python -m bench``: every benchmark, one table (Markdown, for BENCHMARKS.md).

    python -m bench                    # inference, continuum, producer, end to end (2,000 spectra)
    python -m bench --quick            # smaller runs, rough figures in about a minute
    python -m bench --sections inference --device cuda

Sections: prepare (each apStar reader side by side, and read + continuum + conv1 per core),
run (the main job at 2 and 100 passes beside plain reading, the predictor's fixed cost and the
reference inference),
inference (the Predictor beside the reference algorithm), continuum (the project beside
astroNN), service (producer rate, end to end through Redis and real workers on SQLite and
PostgreSQL, peak worker RSS). Each row states its conditions.

Not run unless named (it takes minutes): scale (produce, reconcile, status and export as CLI
processes on a catalog and a table of --rows rows, default 1,000,000, on SQLite and PostgreSQL:
seconds and peak RSS against the issue's bounds).

    python -m bench --sections scale --rows 20000
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from collections.abc import Sequence

from bench.table import Row, format_rows

SECTIONS = ("prepare", "run", "inference", "continuum", "service")
OPTIONAL_SECTIONS = ("scale",)  # only when named in --sections


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{datetime.date.today()}; {os.cpu_count()} cores ({cpu}); {gpu}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS + OPTIONAL_SECTIONS,
                        default=list(SECTIONS))
    parser.add_argument("--device", default="auto", help="inference section: auto, cpu, cuda")
    parser.add_argument("--spectra", type=int, default=2000, help="end to end: spectra per run")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=1_000_000, help="scale: catalog and table rows")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    print(f"machine: {machine()}", flush=True)
    if "prepare" in args.sections:
        from bench import bench_prepare

        rows += bench_prepare.run(50 if args.quick else 200, seconds=1.0 if args.quick else 3.0)
        print(format_rows(rows), flush=True)
    if "run" in args.sections:
        from bench import bench_run

        rows += bench_run.run(400 if args.quick else args.spectra, 50 if args.quick else 200)
        print(format_rows(rows), flush=True)
    if "inference" in args.sections:
        from bench import bench_inference

        rows += bench_inference.with_speedup(bench_inference.run(
            device=args.device, min_spectra=64 if args.quick else 256,
            reference_spectra=32 if args.quick else 128, repeat=1 if args.quick else 2))
        print(format_rows(rows), flush=True)
    if "continuum" in args.sections:
        from bench import bench_continuum

        rows += bench_continuum.run(128 if args.quick else 512)
    if "service" in args.sections:
        from bench import bench_service

        rows += bench_service.run(400 if args.quick else args.spectra,
                                  producer_spectra=10_000 if args.quick else 50_000)
    if "scale" in args.sections:
        from bench import bench_scale

        rows += bench_scale.run(args.rows)
    print()
    print(format_rows(rows))


if __name__ == "__main__":
    main()
