"""The mutation pass's tally (`make mutants`): mutmut's statuses for the functions named on the command line.

Reads `mutmut results --all true` on stdin ("    <module>.x_<function>__mutmut_<n>: <status>" per mutant) and
tests/equivalent_mutants.txt (a mutant that cannot change any output, and why, one per line). Prints the number of
mutants, killed (a test failed, or timed out: the mutant loops forever), equivalent and surviving, then every
survivor not listed as equivalent, and every listed one that no longer survives (the list has gone stale). Exits 1
when any survivor is unexplained or any mutant unchecked, so the tally can be trusted at a glance."""
from __future__ import annotations

import collections
import fnmatch
import sys
from pathlib import Path

EQUIVALENT = Path(__file__).with_name("equivalent_mutants.txt")
KILLED = {"killed", "timeout"}  # mutmut's words; a timeout is a mutant that never returns, which the tests caught


def read_equivalent(path: Path) -> dict[str, str]:
    """Mutant name -> why it is equivalent, from lines "<name>  <reason>" ('#' starts a comment line)."""
    reasons = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            if not reason.strip():
                sys.exit(f"{path}:{number}: {name} has no reason: every equivalent mutant says why it is one")
            reasons[name] = reason.strip()
    return reasons


def main(globs: list[str]) -> int:
    statuses = {}
    for line in sys.stdin:
        name, sep, status = line.strip().rpartition(": ")
        if sep and any(fnmatch.fnmatchcase(name, glob) for glob in globs):
            statuses[name] = status
    equivalent = read_equivalent(EQUIVALENT)
    counts = collections.Counter("killed" if s in KILLED else "equivalent" if s == "survived" and n in equivalent
                                 else s for n, s in statuses.items())
    print(f"{len(statuses)} mutants of {len(globs)} function patterns: {counts['killed']} killed "
          f"({sum(s == 'timeout' for s in statuses.values())} of them by a timeout), {counts['equivalent']} "
          f"equivalent ({EQUIVALENT.name}), {counts['survived']} survived")
    unexplained = [n for n, s in statuses.items() if s not in KILLED and not (s == "survived" and n in equivalent)]
    stale = [n for n in equivalent if any(fnmatch.fnmatchcase(n, g) for g in globs) and statuses.get(n) != "survived"]
    for name in unexplained:
        print(f"  {statuses[name]}: {name}")
    if unexplained:
        print(f"for each: `mutmut show <mutant>`, then a test that kills it, or why it is equivalent in {EQUIVALENT}")
    for name in stale:
        print(f"  {name} is listed in {EQUIVALENT.name} but {statuses.get(name, 'not a mutant any more')}: "
              "remove or renumber the line")
    return 1 if unexplained or stale or not statuses else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
