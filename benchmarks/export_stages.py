"""Peak RSS of each stage of a `pauserec-export` run.

Runs the export command given after ``--``, samples the resident memory of it and its children every
``--every`` seconds, and attributes each sample to the stage line the export printed last (its progress lines:
``  12.5s export    decode graph ...``). Writes JSON: the whole run's peak (VmHWM of the export process, as
``/usr/bin/time`` reports it) and each stage's sampled peak (a stage shorter than one interval may be missed).

    python benchmarks/export_stages.py --out stages.json -- pauserec-export CKPT --out ENGINE --precision fp16 --stream
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

STAGE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s+(\w+)\s+(.*)$")


def _tree_rss_bytes(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (0 for a process that is gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        sys.exit("usage: export_stages.py [--out FILE] [--every S] -- COMMAND ...")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("export-stages.json"))
    ap.add_argument("--every", type=float, default=0.1, help="seconds between samples")
    args, command = ap.parse_args(argv[:cut]), argv[cut + 1:]

    log = args.out.with_suffix(".log")
    stages: list[dict] = [{"stage": "start", "peak_rss_bytes": 0}]
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(["/usr/bin/time", "-f", "maxrss_kib=%M", *command], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
    with open(log) as reader:
        while proc.poll() is None:
            for line in reader.readlines():
                m = STAGE.match(line)
                if m:
                    stages[-1]["until_s"] = float(m.group(1))
                    stages.append({"stage": f"{m.group(2)}: {m.group(3).strip()[:70]}", "peak_rss_bytes": 0})
            rss = _tree_rss_bytes(proc.pid)
            stages[-1]["peak_rss_bytes"] = max(stages[-1]["peak_rss_bytes"], rss)
            time.sleep(args.every)
    stages[-1]["until_s"] = round(time.monotonic() - start, 1)
    text = log.read_text()
    peak = re.search(r"maxrss_kib=(\d+)", text)
    result = {"command": " ".join(command), "returncode": proc.returncode, "wall_s": stages[-1]["until_s"],
              "peak_rss_bytes": int(peak.group(1)) * 1024 if peak else None, "stages": stages}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for s in stages:
        print(f"{s.get('until_s', 0):8.1f}s {s['peak_rss_bytes'] / 1e9:6.2f} GB  {s['stage']}")
    print(f"peak {result['peak_rss_bytes'] and result['peak_rss_bytes'] / 1e9:.2f} GB (rc {proc.returncode})")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
