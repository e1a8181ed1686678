"""Paper tables and plots, regenerated from result files: `python -m tokenprune.tables experiment=NAME`.

A pure function of the result files (`tokenprune.results`) and two specs that live in the repository:
the experiment's `experiment.table` / `experiment.plot` (configs/experiment/NAME.yaml) and the papers'
published numbers (`published.yaml` beside this file). Nothing is re-run or downloaded. Output:
`<paths.outputs>/tables/NAME.md` and `.tex`, `<paths.outputs>/plots/NAME/<column>.png` and `.pdf`.

Table spec (`experiment.table`):

    title: text
    published: <paper>/<table>          # optional: default source of the paper's numbers (published.yaml)
    where: {key: value, ...}            # every cell: a result matches when each key equals the value
                                        #   (a list: any of them). Keys model/reducer/benchmark/train are the
                                        #   result's `choices`; any other key is a dotted path into its resolved
                                        #   `config` (reducer.keep); a path the config lacks reads as null.
    columns:                            # one per benchmark metric (ours, paper, delta)
      - id: vqav2                       # also the key of the paper's value in published.yaml
        label: VQAv2
        metric: bench/vqav2_val/exact_match
        scale: 100                      # ours x scale (lmms-eval's fractions -> the papers' %)
        digits: 1
        best: max                       # max | min | null: which value is bold
        relative_to: {key: value}       # optional: 100 x ours / the result matching the cell with these keys
        mean_of: [ids]                  # instead of metric: the mean of other columns of the row
        note: text
    rows:                               # or `group_by: "{reducer} ({reducer.keep})"`: a row per label
      - label: + PruMerge
        section: LLaVA-1.5-7B           # optional: starts a block of rows
        where: {...}                    # merged over the table's
        cells: {<column id>: {...}}     # optional: extra keys for one column's cell
        paper: prumerge_7b              # a row of `published`, or <paper>/<table>/<row>
        note: text
    efficiency: true                    # append Tokens, Prefill FLOPs and FLOPs ratio (the results' efficiency block)

Each cell takes the newest matching result (by `run.finished`) that has the metric; when several match, a
note says so. Plot spec (`experiment.plot`): `series` (a label template over the same keys, default
"{reducer}"), `where` (default: the table's), `columns` (default: every metric column). Publish spec
(`experiment.publish`, used with `publish=true`): where the table and plots are shown in the repository
(tokenprune.tables.publish).
"""

from tokenprune.tables.build import Table, build_table, load_published, matches, value_at
from tokenprune.tables.render import render_latex, render_markdown

__all__ = [
    "Table",
    "build_table",
    "load_published",
    "matches",
    "render_latex",
    "render_markdown",
    "value_at",
]
