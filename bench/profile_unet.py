"""The PyTorch profiler's per-op table of one benchmark task (bench/performance.py's workloads and tasks).

    python bench/profile_unet.py --workload txt2img --task train          # ours
    python bench/profile_unet.py --workload large --task forward --impl diffusers --rows 30

Runs the task twice to warm up, then profiles --calls calls and prints the ops by their own CPU time
(CUDA time too on a GPU). With --out the table is appended to that file under a heading.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from performance import DEFAULT_SPEED_OPTIONS, SPEED_OPTIONS, TASKS, build_pair, make_inputs, workloads  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="txt2img", choices=sorted(workloads()))
    parser.add_argument("--task", default="forward", choices=sorted(TASKS))
    parser.add_argument("--impl", default="ours", choices=("ours", "diffusers"))
    parser.add_argument("--batch", type=int, default=None, help="default: the workload's first batch size")
    parser.add_argument("--ours-options", default=",".join(DEFAULT_SPEED_OPTIONS),
                        help="comma list of " + ", ".join(SPEED_OPTIONS) + " or 'none'")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    workload = workloads()[args.workload]
    batch = args.batch or (workload.sample_batches if args.task == "sample" else workload.batches)[0]
    options = tuple(o for o in args.ours_options.split(",") if o and o != "none")
    pair = build_pair(workload, device, options)
    fn = TASKS[args.task](pair, make_inputs(workload, batch, device))[args.impl]
    for _ in range(2):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.calls):
            fn()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows)
    heading = f"{args.impl}, {args.workload} {args.task}, batch {batch}, {args.calls} calls, options {options or 'none'}"
    print(heading + "\n" + table)
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"### {heading}\n\n```\n{table}```\n\n")


if __name__ == "__main__":
    main()
