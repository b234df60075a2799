"""Rewrite the explicit library and resource file lists in the top-level CMakeLists.txt.

Why explicit lists and not a glob: a glob installs whatever lies in the source tree (stray
scratch files, caches) and CMake does not notice added files without a re-configure. The
static test ``Testing/test_module_static.py`` fails when the lists and the tree disagree; run
``python tools/update_cmake_lists.py`` after adding or removing a library file.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CMAKE = REPO / "CMakeLists.txt"
#: (CMake variable, files relative to the repository root) kept in sync with the tree.
LISTS = {
    "COVIDCTDX_LIB_SCRIPTS": lambda: sorted(p for p in (REPO / "CovidCTDxLib").rglob("*.py") if "__pycache__" not in p.parts),
    "COVIDCTDX_LIB_RESOURCES": lambda: sorted(
        p for folder in ("Resources/Terminology", "Resources/SampleData", "Resources/weights")
        for p in (REPO / folder).iterdir() if p.is_file()
    ),
}

log = logging.getLogger(__name__)


def cmake_block(variable: str, files) -> str:
    lines = "\n".join(f"  {p.relative_to(REPO).as_posix()}" for p in files)
    return f"set({variable}\n{lines}\n  )"


def main() -> None:
    text = CMAKE.read_text()
    for variable, files in LISTS.items():
        pattern = re.compile(rf"set\({variable}\n(?:  [^\n)][^\n]*\n)*  \)")
        if not pattern.search(text):
            raise SystemExit(f"{CMAKE}: no set({variable} ...) block to update")
        text = pattern.sub(lambda _m, v=variable, f=files: cmake_block(v, f()), text)
    CMAKE.write_text(text)
    log.info("updated %s", CMAKE)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
