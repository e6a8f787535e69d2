"""Profile one (workload, implementation) pair in-process with pyinstrument.

``python -m benchmarks.profile_workload --suite full --workload medium --label ours_default``
prints pyinstrument's text report (setup and verification included, so read the
``run`` subtree: the timed loop is what the table measures).
"""

from __future__ import annotations

import argparse

from . import worker
from .scratch import scratch_dir
from .workloads import suite


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="full")
    parser.add_argument("--workload", required=True)
    parser.add_argument("--label", default="ours_default")
    parser.add_argument("--interval", type=float, default=0.0005)
    args = parser.parse_args(argv)
    from pyinstrument import Profiler

    (wl,) = [w for w in suite(args.suite) if w.name == args.workload]
    impl, options, cap = wl.runs[args.label]
    with scratch_dir("bench-profile-") as tmp:  # removed on any exit, SIGTERM and Ctrl-C included
        max_batches = cap if cap is not None else wl.max_batches
        spec = {"workload": wl.as_dict() | {"runs": {}, "max_batches": max_batches}, "impl": impl,
                "options": options, "dir": tmp + "/t"}
        profiler = Profiler(interval=args.interval)
        profiler.start()
        result = worker.run(spec)
        profiler.stop()
    print(profiler.output_text(unicode=False, color=False, show_all=False))
    print(result)


if __name__ == "__main__":
    main()
