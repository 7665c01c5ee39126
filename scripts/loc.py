"""Lines of code per package of gist_core/ and flows/ (what issue 19's targets count).

    python scripts/loc.py
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lines(paths: list[Path]) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths)


def main() -> None:
    groups: dict[str, list[Path]] = {}
    for top in ("gist_core", "flows"):
        for path in sorted((ROOT / top).rglob("*.py")):
            package = path.parent.relative_to(ROOT).as_posix()
            groups.setdefault(package, []).append(path)
    total = 0
    for package, paths in sorted(groups.items()):
        count = lines(paths)
        total += count
        print(f"{package:24} {count:6,}  ({len(paths)} files)")
    print(f"{'gist_core + flows':24} {total:6,}")


if __name__ == "__main__":
    main()
