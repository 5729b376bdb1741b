#!/usr/bin/env python3
"""Read TensorBoard event files with tensorboard's own reader.

    read_tensorboard.py RUN_DIR/tensorboard

Loads every event file under the directory with
tensorboard.backend.event_processing.event_accumulator.EventAccumulator
(keeping all scalar events, no down-sampling) and prints one JSON object
{tag: [[step, value], ...], ...} for all scalar tags, steps in file order.
Exits 1 if no scalar was found, 2 on a usage error.  Used to check that
oxclip's event files are readable by the real reader.

Environment: python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install tensorboard
"""
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator


def main(argv):
    if len(argv) != 2 or not os.path.isdir(argv[1]):
        print(f"usage: {argv[0]} RUN_DIR/tensorboard", file=sys.stderr)
        return 2
    acc = event_accumulator.EventAccumulator(
        argv[1], size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in sorted(acc.Tags().get(event_accumulator.SCALARS, [])):
        out[tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
    print(json.dumps(out))
    if not any(out.values()):
        print(f"no scalar events under {argv[1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
