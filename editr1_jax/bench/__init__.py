"""The GEdit-Bench and ImgEdit (Basic) evaluation protocols as a library, independent of any model.

- `gedit`: the GEdit-Bench release (Parquet or `datasets` Arrow files), VIEScore prompts from the user's copy,
  two judge queries per item (SC, PQ), `judge_item`, `summarize` (per language; overall = mean of the 11
  task-type means of SC, PQ and O = sqrt(SC * PQ)).
- `imgedit`: the ImgEdit Basic release (`singleturn.json` + images), `judge_prompt.json` from the user's copy,
  one judge query per item, `judge_item`, `summarize` (overall = mean of the nine edit-type means).
- `parsing`: the judge's text -> sub-scores (unparseable answers are counted, never scored).
- `aggregate`: summaries, Markdown tables, `compare` of two summaries.
- `base`: `JudgeQuery`, `ItemResult` (+ JSONL `write_results` / `read_results`), `BenchError`.
- `mini` (imported on its own: `from editr1_jax.bench import mini`, `python -m editr1_jax.bench.mini DIR`): a tiny
  benchmark drawn in code, in both release layouts, with prompt files of our own words.
Every folder or file read or written here may be a gs:// URL (`editr1_jax.paths`).
"""

from editr1_jax.bench import aggregate, gedit, imgedit, parsing
from editr1_jax.bench.aggregate import Comparison, Summary, compare, comparison_markdown, to_markdown
from editr1_jax.bench.base import BenchError, ItemResult, JudgeQuery, read_results, write_results

__all__ = ["aggregate", "gedit", "imgedit", "parsing", "Comparison", "Summary", "compare",
           "comparison_markdown", "to_markdown", "BenchError", "ItemResult", "JudgeQuery", "read_results",
           "write_results"]
