#!/usr/bin/env python3
"""A minimal reimage client: runs `reimage DRIVER`, writes one request, reads the events line
by line, shows progress on stderr, and maps the exit status.

    reimage_client.py [--reimage PATH] [--config PATH] DRIVER < request.json

Exit status: 0 done; 1 failed (see the error: what it leaves is in docs/protocol.md,
"Guarantees"); 2 refused before anything was looked at, nothing changed; 3 the stream ended
without a result or an error (reimage was killed: run `recover`).
"""

import argparse
import json
import subprocess
import sys

# The error codes reimage exits 2 for: refused before any storage was looked at.
NOTHING_CHANGED = 2


def run(reimage, config, driver, request):
    """Runs one request; returns (status, last event or None)."""
    argv = [reimage, "--progress", "never"]
    if config:
        argv += ["--config", config]
    argv += ["--", driver]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(request))
    proc.stdin.close()
    last = None
    for line in proc.stdout:
        event = json.loads(line)
        last = event
        kind = event["event"]
        if kind == "progress":
            total = event["total"] or 1
            print(f"{event['phase']}: {100 * event['done'] // total}% of {event['total']} "
                  f"{event['unit']}", file=sys.stderr)
        elif kind == "warning":
            print(f"warning {event['code']}: {event['message']}", file=sys.stderr)
    return proc.wait(), last


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reimage", default="reimage")
    parser.add_argument("--config")
    parser.add_argument("driver")
    args = parser.parse_args()
    request = json.load(sys.stdin)
    status, last = run(args.reimage, args.config, args.driver, request)
    if last is None or last["event"] not in ("result", "error"):
        print(f"reimage ended without a result (status {status}); run recover", file=sys.stderr)
        return 3
    if last["event"] == "result":
        print(json.dumps(last))
        return 0
    where = "nothing changed" if status == NOTHING_CHANGED else "failed"
    print(f"{where}: {last['code']}: {last['message']}", file=sys.stderr)
    print(json.dumps(last))
    return 2 if status == NOTHING_CHANGED else 1


if __name__ == "__main__":
    sys.exit(main())
