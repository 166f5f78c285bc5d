"""Which fine-tuning recipe survives a domain shift? ``finetune.freeze_bn`` x ``finetune.layer_decay``.

For each demo target (in-domain, inverted + rotated, texture-drawn; all training images) this trains
``full`` fine-tuning from the baseline head under each recipe, with the advisor's own choice turned
off (``baseline.advisor.choose_strategy=false``) so the recipe is exactly the one named, and scores
it against the frozen baseline on the same test split. One seed: read it next to the seeded table in
"Transfer vs fine-tuning evidence".

    .venv/bin/python bench/recipes.py [--workdir .adaptflow] [--epochs 12] [--no-write]

Writes a Markdown table into bench/RESULTS.md under "Fine-tuning recipes under domain shift".
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

HEADING = "## Fine-tuning recipes under domain shift"
RECIPES: tuple[tuple[bool, float], ...] = ((True, 0.5), (False, 0.5), (False, 1.0), (True, 1.0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path(".adaptflow"))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import evidence as ev  # bench/ is on sys.path when this file runs as a script

    from adaptflow.demo import TARGET_TREES

    start = time.perf_counter()
    lines = [
        "| target | domain shift | frozen baseline | "
        + " | ".join(f"full, freeze_bn={f}, layer_decay={d}" for f, d in RECIPES)
        + " |",
        "|---|---|---|" + "---|" * len(RECIPES),
    ]
    for dataset in TARGET_TREES:
        cells, base, shift = [], None, None
        for freeze, decay in RECIPES:
            extra = (
                "baseline.advisor.choose_strategy=false",
                f"finetune.freeze_bn={str(freeze).lower()}",
                f"finetune.layer_decay={decay}",
            )
            rows = {
                r.strategy: r
                for r in ev.run_condition(
                    ev.Condition(dataset, None), args.workdir.resolve(), ("full",), args.epochs, 0, extra
                )
            }
            base, shift, full = rows["baseline"], rows["baseline"].domain_shift, rows["full"]
            cells.append(f"{full.accuracy:.3f} (p {full.p_value_vs_baseline:.2g})")
        assert base is not None
        lines.append(
            f"| {dataset} | {'-' if shift is None else f'{shift:.3f}'} | {base.accuracy:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    command = "python bench/recipes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = (
        "\n".join(
            [
                HEADING,
                "",
                f"- machine: {ev.machine_line()}",
                f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                f"- command: `{command.strip()}`",
                f"- total wall time: {time.perf_counter() - start:.0f} s",
                "- test accuracy of `full` fine-tuning (seed 0, all training images), McNemar p against the frozen "
                "baseline on the same test images; the advisor's choice off",
                "",
                *lines,
            ]
        )
        + "\n"
    )
    print(section)
    if not args.no_write:
        ev.write_results(section, Path(__file__).with_name("RESULTS.md"), HEADING)


if __name__ == "__main__":
    main()
