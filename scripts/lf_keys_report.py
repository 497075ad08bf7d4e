"""How lmf handles every config key of LLaMA-Factory 0.9.5: counts per handling, then the keys refused at any
non-default value ("not implemented"), grouped by the feature they configure.

Usage: python scripts/lf_keys_report.py [--max-refused N]   (exit 1 when more than N keys are refused)
"""

from __future__ import annotations

import argparse
import signal
import collections
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "src"))

from lmf.config.compat import HANDLINGS, lf_key_handling  # noqa: E402
from lmf.config.lf_keys import LF_VERSION  # noqa: E402


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-refused", type=int, default=None)
    args = parser.parse_args(argv)
    handling = lf_key_handling()
    counts = collections.Counter(kind for kind, _ in handling.values())
    print(f"LLaMA-Factory {LF_VERSION}: {len(handling)} keys")
    for kind in HANDLINGS:
        print(f"  {kind:<16} {counts[kind]}")
    by_feature: dict[str, list[str]] = collections.defaultdict(list)
    for key, (kind, why) in handling.items():
        if kind == "not implemented":
            by_feature[why].append(key)
    print(f"\nrefused at any non-default value: {counts['not implemented']} keys")
    for feature, keys in sorted(by_feature.items(), key=lambda item: (-len(item[1]), item[0])):
        print(f"  {len(keys):>3}  {feature[:100]}: {', '.join(keys)}")
    if args.max_refused is not None and counts["not implemented"] > args.max_refused:
        print(f"\n{counts['not implemented']} refused keys, more than --max-refused {args.max_refused}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
