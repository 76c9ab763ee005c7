#!/usr/bin/env bash
# Many from-scratch runs of benchmarks/clims_cooccurrence.py side by side on a lent GPU machine (16 cores):
# each run trains its own evaluator (--clip-seed) and its CAMs on the GPU (--device cuda), scores on CPU.
# Is CLIMS' gain a property of the setting, or of one evaluator? (issue 16)
#
#   bash scripts/clims_cooccurrence_device.sh OUT SECONDS "FLAGS" NAME:EXTRA... 
#
# NAME:EXTRA runs the benchmark with FLAGS + EXTRA (commas for spaces) into RUNS/NAME (RUNS: $RUNS, default
# /tmp/clims_device); after SECONDS every run still going is stopped. OUT gets two files (a lent machine sends
# back few): results.json, per run each finished seed's scores (mIoU, false activation, per-class IoU), the
# evaluator's training result and, when all seeds finished, the summary's headline numbers; logs.txt, the logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$1 SECONDS_=$2 FLAGS=$3
shift 3
RUNS=${RUNS:-/tmp/clims_device}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
for spec in "$@"; do
  name=${spec%%:*} extra=${spec#*:}
  # shellcheck disable=SC2086
  timeout "$SECONDS_" "${PYTHON:-python3}" benchmarks/clims_cooccurrence.py --out "$RUNS/$name" --threads 2 $FLAGS \
    ${extra//,/ } > "$RUNS/$name.log" 2>&1 &
done
wait
for spec in "$@"; do echo "== ${spec%%:*}"; tail -n 40 "$RUNS/${spec%%:*}.log"; done > "$OUT/logs.txt"
"${PYTHON:-python3}" - "$RUNS" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
runs, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for d in sorted(p for p in runs.iterdir() if p.is_dir()):
    r = {"runs": {}}
    for f in sorted(d.glob("seed*/*/score.json")):
        s = json.loads(f.read_text())
        r["runs"][f"{f.parent.parent.name}/{f.parent.name}"] = {k: s[k] for k in (
            "miou", "bg_false_activation", "ground_activation", "best_threshold", "class_iou", "seconds") if k in s}
    if (d / "summary.json").is_file():
        s = json.loads((d / "summary.json").read_text())
        r["summary"] = {k: s[k] for k in ("clims_minus_cam_miou", "bg_false_activation_cut_pct", "seconds")}
        r["evaluator"] = {k: s["evaluator"][k] for k in ("zero_shot_top1", "fg_over_bg", "right_class_first")}
    ev = d / "evaluator" / "result.json"
    if ev.is_file():
        r["evaluator_train"] = json.loads(ev.read_text())
    res[d.name] = r
(out / "results.json").write_text(json.dumps(res, indent=1))
for n, r in res.items():
    print(n, json.dumps(r.get("summary")), len(r["runs"]), "runs")
EOF
