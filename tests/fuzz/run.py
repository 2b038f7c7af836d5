"""Drive one fuzz target with atheris: ``python -m tests.fuzz.run TARGET [libFuzzer flags]``.

Install with ``pip install -e '.[fuzz]'`` (``make fuzz`` does). Any exception other than a
``DirediError`` is a crash: libFuzzer writes the input to ``crash-*``; add it to
``tests/fuzz/corpus/TARGET/`` so the default suite replays it forever.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-not-found]

with atheris.instrument_imports():
    from tests.fuzz.harnesses import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.stderr.write(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [flags]\n")
        raise SystemExit(2)
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
