"""Compile the hot path with mypyc into ``.build/mypyc`` (``make compile``; see schemas/compiled.py).

    python deploy/compile.py build | ensure | status

``ensure`` builds only when the sources changed since the last build. Needs the ``[compile]``
extra (mypy), a C compiler and Python's headers; without them the build fails and gradeflow runs
as plain Python.
"""

from __future__ import annotations

import os
import shutil
import sys

from schemas.compiled import BUILD, MODULES, PACKAGES, ROOT, STAMP, source_stamp, status


def build() -> int:
    """Compile :data:`schemas.compiled.MODULES` into ``.build/mypyc`` and stamp the build; 0 on success."""
    from mypyc.build import mypycify
    from setuptools import setup

    stamp = source_stamp()
    shutil.rmtree(BUILD, ignore_errors=True)
    work = BUILD / "work"
    work.mkdir(parents=True)
    here = os.getcwd()
    os.chdir(work)  # mypy's cache and setuptools' leftovers stay in the build
    try:
        extensions = mypycify(["--ignore-missing-imports", *(str(ROOT / m) for m in MODULES)], target_dir="c")
        setup(name="gradeflow-hotpath", ext_modules=extensions,
              script_args=["-q", "build_ext", "--build-lib", str(BUILD), "--build-temp", "o"])
    finally:
        os.chdir(here)
    shutil.rmtree(work, ignore_errors=True)
    built = sorted(p.relative_to(BUILD).as_posix() for p in BUILD.rglob("*.so"))
    missing = [m for m in MODULES if not any(b.startswith(m.rsplit(".", 1)[0] + ".") for b in built)]
    if missing:
        print(f"gradeflow: mypyc built no module for {', '.join(missing)}", file=sys.stderr)
        return 1
    for package in PACKAGES:  # only the compiled modules: a package's own files come from the source
        for init in (BUILD / package).glob("__init__*"):
            init.unlink()
    STAMP.write_text(stamp + "\n")
    print(f"gradeflow: compiled {len(MODULES)} hot-path modules into {BUILD.relative_to(ROOT)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["build"]:
        return build()
    if args == ["ensure"]:
        return 0 if status() == "compiled" else build()
    if args == ["status"]:
        print(status())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
