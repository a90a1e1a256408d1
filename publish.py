"""Publish the results: copy every table of results/ into its block in README.md and docs/*.md.

The tools (leaderboard.py, ood.py, inpaint.py, benchmark.py, compress.py) write their tables only
into their --out folder, never into the pages a reader opens. A maintainer who has re-run a tool
into results/ runs this script to copy each results/NAME.md into the page block between
"<!-- results/NAME: copied by publish.py -->" and "<!-- end results/NAME -->", so that no page
drifts from results/ (a test checks that every block equals its file). The prose beside a table
is written by hand from the same files.

Run:  python publish.py            # copy the tables, name the pages that changed
      python publish.py --check    # only say which pages differ from results/ (exit 1 if any)
"""

import argparse
import sys

from plumbing import files, registry, runs


def main(argv=None):
    parser = runs.Parser(prog="publish.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when a page's copy differs from its results/ file")
    args = parser.parse_args(argv)
    changed = files.publish_pages(registry.ROOT, write=not args.check)
    for page in changed:
        print(f"publish: {page.relative_to(registry.ROOT)} {'differs from' if args.check else 'copied from'} results/")
    if not changed:
        print("publish: every page holds the results/ tables as they are")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
