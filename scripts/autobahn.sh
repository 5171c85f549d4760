#!/usr/bin/env bash
# The whole Autobahn TestSuite (SPEC §12 "Conformance") against a release
# build of WRS: every fuzzingclient case, all of sections 12 and 13
# (permessage-deflate) included, run by kosoku (PyPI) against an echo
# channel, with compression on at every message size. Writes
# docs/autobahn.md: a table per section, every case that is not OK with
# kosoku's verdict, and how the run was made. Exits non-zero if a case
# failed (after writing the document).
#
# The test crates/wrs/tests/autobahn.rs runs the fast part of the suite
# on every `cargo test`; this is the full run (a few minutes).
#
# Usage: scripts/autobahn.sh [-p PARALLELISM] [-o OUTPUT.md] [CASE...]
#   -p    cases kosoku runs at once (default: the number of CPUs)
#   -o    the document to write (default: docs/autobahn.md)
#   CASE  run only these cases (ids or globs such as 6.4.* ; default: all)
set -euo pipefail
cd "$(dirname "$0")/.."

parallelism=$(nproc)
output=docs/autobahn.md
while getopts "p:o:" opt; do
  case $opt in
    p) parallelism=$OPTARG ;;
    o) output=$OPTARG ;;
    *) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
includes=()
for case_id in "$@"; do
  includes+=(-i "$case_id")
done

have() { command -v "$1" >/dev/null 2>&1; }

if ! have kosoku; then
  echo "== installing kosoku (PyPI) to run the Autobahn TestSuite"
  python3 -m pip install --quiet kosoku
  hash -r
fi

echo "== cargo build --release"
cargo build --release --quiet -p wrs --bin wrs

# Section 9 sends messages of up to 16 MiB; the client queue must hold
# one. A minimum of 0 bytes runs the compressor at every size.
settings=(
  WRS_MAX_MESSAGE_BYTES=16777216
  WRS_CLIENT_QUEUE_BYTES=33554432
  WRS_COMPRESSION=on
  WRS_COMPRESSION_MIN_BYTES=0
)

work=$(mktemp -d)
wrs_pid=
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  if [ -n "$wrs_pid" ]; then
    kill "$wrs_pid" 2>/dev/null || true
    wait "$wrs_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

env WRS_API_PORT=0 WRS_BIND_ADDRESS=127.0.0.1 WRS_LOG_FORMAT=json \
  "${settings[@]}" target/release/wrs >"$work/wrs.log" 2>&1 &
wrs_pid=$!

# The JSON log's "listening" line carries the ephemeral address.
address=
for _ in $(seq 100); do
  address=$(python3 - "$work/wrs.log" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if entry.get("message") == "listening":
        print(entry["address"])
        break
EOF
)
  [ -n "$address" ] && break
  kill -0 "$wrs_pid" 2>/dev/null || { cat "$work/wrs.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$address" ] || { echo "wrs did not report its address" >&2; cat "$work/wrs.log" >&2; exit 1; }

created=$(curl -fsS -X POST "http://$address/channels" \
  -H 'content-type: application/json' -d '{"pattern":"echo"}')
read -r channel token < <(python3 -c \
  'import json, sys; c = json.load(sys.stdin); print(c["data"]["id"], c["token"])' <<<"$created")

echo "== kosoku: ${*:-the whole suite} against ws://$address (echo channel $channel, $parallelism at once)"
started=$(date +%s)
status=0
kosoku "ws://$address/channels/$channel/connect?token=$token" \
  "${includes[@]}" -p "$parallelism" -o "$work/reports" >"$work/kosoku.log" 2>&1 || status=$?
seconds=$(($(date +%s) - started))
tail -n 1 "$work/kosoku.log"

revision=$(git rev-parse --short=12 HEAD)
changed=$(git status --porcelain --untracked-files=no -- crates/wrs/src crates/wrs/Cargo.toml Cargo.toml |
  awk '{print $NF}' | paste -sd, -)
if [ -n "$changed" ]; then
  revision="$revision, with uncommitted changes to $changed"
fi

AB_REVISION=$revision AB_SELECTION="$*" AB_SETTINGS="${settings[*]}" AB_PARALLELISM=$parallelism \
  AB_SECONDS=$seconds AB_LOG="$work/kosoku.log" \
  python3 - "$work/reports" "$output" <<'EOF'
import datetime, glob, json, os, platform, re, shlex, sys
from importlib.metadata import version

reports, output = sys.argv[1], sys.argv[2]
env = os.environ
cases = []
for path in glob.glob(os.path.join(reports, "*.json")):
    if os.path.basename(path) != "index.json":
        with open(path) as f:
            cases.append(json.load(f))
key = lambda case: [int(part) for part in case["id"].split(".")]
cases.sort(key=key)
if not cases:
    sys.exit("kosoku wrote no reports:\n" + open(os.environ["AB_LOG"]).read())

TITLES = {
    "1": "Framing", "2": "Pings/Pongs", "3": "Reserved Bits", "4": "Opcodes",
    "5": "Fragmentation", "6": "UTF-8 Handling", "7": "Close Handling",
    "9": "Limits/Performance", "10": "Miscellaneous",
    "12": "WebSocket Compression (different payloads)",
    "13": "WebSocket Compression (different parameters)",
}
# Why WRS gets a verdict other than OK in these cases (see also
# crates/wrs/tests/autobahn.rs, which allows exactly these).
REASONS = [
    ("Invalid UTF-8 in the middle of one frame that arrives in chops: WRS "
     "checks a frame's payload once the frame is complete and closes with "
     "1007 then, not at the offending chop (failing fast is optional, RFC "
     "6455 8.1); invalid UTF-8 in a middle fragment (6.4.1-6.4.2) fails at "
     "that fragment.",
     ["6.4.3", "6.4.4"]),
    ("A 256 KiB message, a close and a ping back to back: WRS answers the "
     "close before the echo is written; the RFC leaves this open.",
     ["7.1.6"]),
    ("Close codes 5000 and 65535, undefined by the RFC: WRS answers 1002.",
     ["7.13.1", "7.13.2"]),
]
NOTES = {case_id: number for number, (_, ids) in enumerate(REASONS, 1)
         for case_id in ids}
PASSING = {"OK", "NON-STRICT", "INFORMATIONAL"}

def failed(case):
    return (case["behavior"] not in PASSING
            or case["behaviorClose"] not in ("OK", "INFORMATIONAL"))

def cell(text):
    return " ".join(str(text).split()).replace("|", "\\|")

sections = {}
for case in cases:
    sections.setdefault(case["id"].split(".")[0], []).append(case)

command_args = " ".join(
    [f"-i {shlex.quote(c)}" for c in env["AB_SELECTION"].split()]
    + [f"-p {env['AB_PARALLELISM']}"])
lines = [
    "# Autobahn TestSuite results",
    "",
    "Generated by `scripts/autobahn.sh`; do not edit by hand. The",
    "[Autobahn TestSuite](https://github.com/crossbario/autobahn-testsuite)",
    "(fuzzingclient cases, run by [kosoku](https://pypi.org/project/kosoku/))",
    "against an `echo` channel of a release build, with permessage-deflate",
    "on at every message size. NON-STRICT and INFORMATIONAL are passing",
    "verdicts; the cases that get them are listed below with the reason.",
    "`crates/wrs/tests/autobahn.rs` runs sections 1–7, 9, 10 and the first",
    "four cases of every subsection of 12 and 13 on every `cargo test`.",
    "",
    "## Run",
    "",
    "| | |",
    "|---|---|",
    f"| Date | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} |",
    f"| WRS revision | `{env['AB_REVISION']}` (release build) |",
    f"| Cases | {len(cases)}: {env['AB_SELECTION'] or 'the whole suite'} |",
    f"| kosoku | {version('kosoku')} (Python {platform.python_version()}) |",
    f"| Settings | `{env['AB_SETTINGS']}` |",
    f"| Command | `kosoku \"ws://127.0.0.1:PORT/channels/ID/connect?token=TOKEN\" {command_args} -o REPORTS` |",
    f"| Machine | {os.cpu_count()} CPUs, {platform.system()} {platform.machine()} |",
    f"| Duration | {env['AB_SECONDS']} s |",
    "",
    "## Results per section",
    "",
    "| Section | | Cases | OK | NON-STRICT | INFORMATIONAL | Failed | Case time (s) |",
    "|---|---|--:|--:|--:|--:|--:|--:|",
]
totals = [0] * 5
for section, group in sorted(sections.items(), key=lambda s: int(s[0])):
    row = [
        len(group),
        sum(c["behavior"] == "OK" and not failed(c) for c in group),
        sum(c["behavior"] == "NON-STRICT" and not failed(c) for c in group),
        sum(c["behavior"] == "INFORMATIONAL" and not failed(c) for c in group),
        sum(failed(c) for c in group),
    ]
    totals = [t + r for t, r in zip(totals, row)]
    seconds = sum(c["duration"] for c in group) / 1000
    lines.append(f"| {section} | {TITLES.get(section, '')} | "
                 + " | ".join(map(str, row)) + f" | {seconds:.1f} |")
lines.append("| **all** | | " + " | ".join(f"**{t}**" for t in totals) + " | |")

lines += ["", "## Cases that are not OK", ""]
not_ok = [c for c in cases if c["behavior"] != "OK" or c["behaviorClose"] != "OK"]
if not_ok:
    lines += [
        "| Case | Behavior | Close | Close codes (WRS / kosoku) | kosoku's result | Why |",
        "|---|---|---|---|---|---|",
    ]
    for c in not_ok:
        codes = f"{c.get('remoteCloseCode')} / {c.get('localCloseCode')}"
        lines.append(
            f"| {c['id']} | {c['behavior']} | {c['behaviorClose']} | {codes} | "
            f"{cell(c['result'])} | {NOTES.get(c['id'], '')} |")
    lines.append("")
    lines += [f"{number}. {text}" for number, (text, _) in enumerate(REASONS, 1)]
else:
    lines.append("None.")

slowest = sorted(cases, key=lambda c: -c["duration"])[:5]
lines += ["", "## Slowest cases", ""]
lines += [f"- {c['id']}: {c['duration'] / 1000:.1f} s — "
          + cell(re.sub("<[^>]*>", "", c["description"])).split(". ")[0].rstrip(".")
          + "."
          for c in slowest]

os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
with open(output, "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"wrote {output}: {len(cases)} cases, {totals[4]} failed")
EOF

if [ "$status" -ne 0 ]; then
  echo "kosoku reported failures (exit $status):" >&2
  cat "$work/kosoku.log" >&2
fi
exit "$status"
