"""How big the ``icl_conml`` package is at one or more git revisions (issue 24's size measure).

For each revision: the number of ``.py`` files under ``icl_conml/``, their lines (``wc -l``), and
their code lines (lines that carry a token other than a comment, a docstring or layout), read from
git objects with ``git show`` so the working tree is not touched.

    python benchmarks/package_size.py 769854f HEAD
"""

from __future__ import annotations

import argparse
import ast
import io
import subprocess
import tokenize

LAYOUT_TOKENS = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def docstring_lines(tree: ast.Module) -> set[int]:
    """Line numbers of the module's, classes' and functions' docstrings."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def code_lines(source: str) -> int:
    """Lines holding code: not blank, not only a comment, not part of a docstring."""
    docs = docstring_lines(ast.parse(source))
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in LAYOUT_TOKENS:
            lines.update(line for line in range(token.start[0], token.end[0] + 1) if line not in docs)
    return len(lines)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def package_size(revision: str) -> tuple[int, int, int]:
    """(files, lines, code lines) of ``icl_conml/*.py`` at ``revision``."""
    names = [
        name
        for name in git("ls-tree", "-r", "--name-only", revision, "icl_conml").split()
        if name.endswith(".py")
    ]
    lines = code = 0
    for name in names:
        source = git("show", f"{revision}:{name}")
        lines += source.count("\n")
        code += code_lines(source)
    return len(names), lines, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="*", default=["HEAD"], help="git revisions (default: HEAD)")
    args = parser.parse_args()
    print("| revision | files | lines | code lines |\n|---|---|---|---|")
    for revision in args.revisions:
        files, lines, code = package_size(revision)
        print(f"| {revision} | {files} | {lines:,} | {code:,} |")


if __name__ == "__main__":
    main()
