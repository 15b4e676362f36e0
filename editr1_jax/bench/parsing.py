"""The judge's generated text -> sub-scores, for the answer formats the two benchmarks' prompts ask for.

- GEdit-Bench (VIEScore): a JSON-like object {"score": [a, b], "reasoning": "..."}, each score 0..10; VIEScore's
  delimiter lines (||V^=^V||) may surround it. `parse_viescore`.
- ImgEdit: one line per criterion, "<criterion name>: <1..5>", after a "Brief reasoning: ..." line.
  `parse_imgedit`.

Both tolerate what judges add: code fences, prose around the answer, single quotes, trailing commas, markdown
emphasis, full-width (Chinese) punctuation and digits, Chinese quotes. A wrong count of numbers, a number out of
range or a non-number makes the answer unparseable, with the reason: never a guessed or zero score (VIEScore's
own parser guesses a random score when it gives up; we do not).
"""

import dataclasses
import math
import re
import unicodedata

VIESCORE_DELIMITER = "||V^=^V||"

# NFKC maps full-width ASCII (：，［］｛｝０-９) to ASCII; these it leaves alone.
_PUNCTUATION = str.maketrans({"\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"',
                              "\u00bb": '"', "\u300c": '"', "\u300d": '"', "\u300e": '"', "\u300f": '"',
                              "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u3001": ",",
                              "\u3002": ".", "\u3010": "[", "\u3011": "]", "\u3014": "[", "\u3015": "]",
                              "\u200b": None, "\u200c": None, "\u200d": None, "\ufeff": None})
_FENCE = re.compile(r"```[A-Za-z0-9_+-]*")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


@dataclasses.dataclass(frozen=True)
class Parsed:
  """Parsed sub-scores, or None with the reason the answer is unparseable."""
  scores: tuple[float, ...] | None
  reason: str = ""

  @property
  def ok(self) -> bool:
    return self.scores is not None


def _fail(reason: str) -> Parsed:
  return Parsed(None, reason)


def normalize(text: str) -> str:
  """Full-width forms -> ASCII (NFKC), Chinese quotes and brackets -> ASCII ones, zero-width characters and code
  fences removed."""
  text = unicodedata.normalize("NFKC", text).translate(_PUNCTUATION)
  return _FENCE.sub("", text)


def _numbers(values: list[str], n: int, low: float, high: float) -> Parsed:
  """Strings -> n floats in [low, high], or the reason they are not."""
  scores = []
  for value in values:
    if not _NUMBER.fullmatch(value):
      return _fail(f"non-numeric score {value!r}")
    score = float(value)
    if not math.isfinite(score):
      return _fail(f"non-finite score {value!r}")
    scores.append(score)
  if len(scores) != n:
    return _fail(f"expected {n} scores, found {len(scores)}")
  bad = [s for s in scores if not low <= s <= high]
  if bad:
    return _fail(f"score {bad[0]:g} outside [{low:g}, {high:g}]")
  return Parsed(tuple(scores))


_SCORE_LIST = re.compile(r"""(["']?)\bscores?\b["']?\s*[:=]\s*\[([^\[\]]*)\]""", re.IGNORECASE)
_SCORE_SCALAR = re.compile(r"""["']?\bscores?\b["']?\s*[:=]\s*["']?([^\s,}\]"']+)""", re.IGNORECASE)
_BARE_LIST = re.compile(r"\[([^\[\]]*)\]\s*[.,;]?")


def parse_viescore(text: str, n_scores: int = 2, low: float = 0.0, high: float = 10.0) -> Parsed:
  """VIEScore's {"score": [...], "reasoning": ...} -> `n_scores` numbers in [low, high].

  The last quoted "score": [...] key in the text is read (a judge that echoes an example first answers after it;
  an unquoted score = [...] in its reasoning is not the answer), else the last unquoted one; an answer that is
  nothing but a list of numbers is accepted too (as VIEScore does). A scalar "score": 7 is one number, so it
  fails a two-score prompt.
  """
  if not isinstance(text, str):
    return _fail(f"judge output is {type(text).__name__}, not text")
  text = normalize(text).replace(VIESCORE_DELIMITER, "\n")
  if not text.strip():
    return _fail("empty judge output")
  lists = list(_SCORE_LIST.finditer(text))
  if lists:
    body = ([m for m in lists if m.group(1)] or lists)[-1].group(2)
  else:
    bare = _BARE_LIST.fullmatch(text.strip())
    if bare:
      body = bare.group(1)
    else:
      scalar = list(_SCORE_SCALAR.finditer(text))
      if scalar:
        return _numbers([scalar[-1].group(1)], 1, low, high) if n_scores == 1 else _fail(
            f"'score' is not a list of {n_scores} numbers")
      return _fail("no 'score' list found")
  values = [v.strip().strip("'\"").strip() for v in re.split(r"[,\s]+", body)]
  return _numbers([v for v in values if v], n_scores, low, high)


# A "label: number" pair at the start of a (bullet-stripped) line or after {  ,  ;  ; the number may be followed
# by "/5". Labels start with a letter (any script) and hold no colon, brace or quote.
_PAIR = re.compile(r"""(?:^|(?<=[{,;]))\s*["']?(?P<label>[^\W\d_][^:{}\n"']*?)["']?\s*[:=]\s*["']?"""
                   r"""(?P<value>[+-]?\d+(?:\.\d+)?)["']?(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?"""
                   r"""(?=\s*$|\s*[,;}()\[\]!?.\-\u2013\u2014]|\s)""")
_BULLET = re.compile(r"^(?:[-*\u2022>#]+\s*|\d+[.)]\s+(?=[^\W\d_]))")
_EMPHASIS = re.compile(r"\*\*|__|`")
_REASONING = re.compile(r"^[\"']?\s*(?:brief\s+)?(?:reasoning|reason|explanation|rationale|analysis|理由|原因|分析)",
                        re.IGNORECASE)


def _label_key(label: str) -> str:
  label = label.lower().replace("&", " and ")
  return " ".join(re.sub(r"[^\w]+", " ", label).split())


def _pairs(text: str) -> list[tuple[str, str, str | None]]:
  pairs = []
  for line in _EMPHASIS.sub("", text).splitlines():
    line = _BULLET.sub("", line.strip())
    if _REASONING.match(line):
      continue
    for m in _PAIR.finditer(line):
      pairs.append((m.group("label").strip(), m.group("value"), m.group("den")))
  return pairs


def parse_imgedit(text: str, criteria: tuple[str, ...] | None = None, low: float = 1.0, high: float = 5.0) -> Parsed:
  """ImgEdit's "Criterion: n" lines -> one number per criterion, in `criteria` order.

  With `criteria` (the edit type's three names) each is found by its name (exact, else one name containing the
  other; the last line wins); if a name is missing but the answer holds exactly as many scored lines as there
  are criteria, they are taken in order. Without `criteria` exactly three scored lines are required. Lines that
  start with "Reasoning" / "Brief reasoning" are never read as scores. "4/5" reads as 4 (another denominator is
  unparseable).
  """
  n = len(criteria) if criteria else 3
  if not isinstance(text, str):
    return _fail(f"judge output is {type(text).__name__}, not text")
  text = normalize(text)
  if not text.strip():
    return _fail("empty judge output")
  pairs = _pairs(text)
  for label, _, den in pairs:
    if den is not None and float(den) != high:
      return _fail(f"score for {label!r} given out of {den}, expected out of {high:g}")
  chosen = None
  if criteria:
    keys = [_label_key(label) for label, _, _ in pairs]
    picked = []
    for criterion in criteria:
      want = _label_key(criterion)
      exact = [i for i, k in enumerate(keys) if k == want]
      loose = [i for i, k in enumerate(keys) if k and (want in k or k in want)]
      found = exact or loose
      if not found:
        break
      picked.append(found[-1])
    if len(picked) == n and len(set(picked)) == n:
      chosen = [pairs[i][1] for i in picked]
  if chosen is None:
    if len(pairs) != n:
      what = f"scores for {list(criteria)}" if criteria else f"{n} scored lines"
      return _fail(f"expected {what}, found {len(pairs)} scored line(s)")
    chosen = [value for _, value, _ in pairs]
  return _numbers(chosen, n, low, high)
