"""What every chapter does first and last: set up, find its inputs, and record its verdicts.

A chapter may be executed by the runner (all chapters, in order) or opened on its own in
JupyterLab or Colab. :func:`setup_chapter` makes both work the same way: it validates the
profile named in the parameters cell, says which device the chapter will use, and, when an
earlier chapter's artifacts are missing, executes that chapter first through the runner rather
than failing on a missing file.

It also sets how tables read: a DataFrame whose index is only row numbers (the default
``0..n-1``) is shown without that index column (:func:`show_tables_without_index`); a table with a
meaningful index (named, or labels) keeps it. This is one formatter in the kernel, not an option
passed in every cell.

Each chapter closes with its claims: the paper's evidence, ours, and whether the claim holds
here. :func:`record_verdicts` writes them to ``results/<profile>/metrics/verdicts/<chapter>.json``
and the landing page collects every chapter's file into one table, so no verdict is typed by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from ..config import ROOT_ENV, Profile, find_repo_root, load_profile
from ..io import ResultsPaths, read_json, write_json
from ..load import load_model
from ..methods.verdicts import CONTENT_BINDING, VERDICTS, Competence, Verdict, read_competence
from .runner import chapters_from_toc, run_chapters
from .threads import follow_share, follow_share_in_cells

__all__ = ["CLAIM_NAMES", "ChapterContext", "Verdict", "claim_answers", "claim_verdict", "is_ours", "left_out_note", "scope_note", "load_verdicts", "models_to_study", "record_verdicts",
           "setup_chapter", "show_tables_without_index"]



@dataclass(frozen=True)
class ChapterContext:
    name: str
    profile: Profile
    paths: ResultsPaths
    root: Path
    device: str


def _upstream(root: Path, chapter: str) -> list[str]:

    names = [c.stem for c in chapters_from_toc(root) if c.is_notebook and c.name != _toc_root(root)]
    if chapter not in names:
        return []
    return names[: names.index(chapter)]


def _toc_root(root: Path) -> str:
    import yaml

    return yaml.safe_load((root / "_toc.yml").read_text(encoding="utf-8"))["root"]


def _has_row_numbers_only(df) -> bool:
    import pandas as pd

    idx = df.index
    return isinstance(idx, pd.RangeIndex) and idx.name is None and idx.start == 0 and idx.step == 1


def table_html(df) -> Optional[str]:
    """A DataFrame's notebook HTML, without the index column when it only numbers the rows."""
    import pandas as pd

    if not _has_row_numbers_only(df):
        return df._repr_html_()
    opt = pd.get_option
    if not opt("display.notebook_repr_html"):
        return None
    return df.to_html(index=False, notebook=True, max_rows=opt("display.max_rows"), max_cols=opt("display.max_columns"),
                      show_dimensions=opt("display.show_dimensions"), float_format=opt("display.float_format"))


def show_tables_without_index() -> bool:
    """In an IPython kernel, render DataFrames whose index is the default ``0..n-1`` without it
    (row numbers are noise in a table a reader reads); return whether a kernel was found."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    if ip is None:
        return False
    import pandas as pd

    ip.display_formatter.formatters["text/html"].for_type(pd.DataFrame, table_html)
    return True


def setup_chapter(chapter: str, profile: str | os.PathLike, needs: Iterable[str] = ()) -> ChapterContext:
    """Validate ``profile``, print the device, and make sure chapters in ``needs`` have run.

    ``profile`` is a profile's name (``params/<name>.yaml``, or a file the runner listed in
    ``$ENTITY_TRACKING_PROFILES``) or the path of a profile file anywhere; results go to
    ``results/<its name>/`` either way.

    ``needs`` names earlier chapters (toc stems, e.g. ``["data", "circuit"]``) whose artifacts
    this chapter reads; any of them not yet executed for this profile is executed now, together
    with the chapters before it.
    """
    import torch

    try:  # the torch threads the runner gives this chapter, followed before every cell
        from IPython import get_ipython
    except ImportError:  # plain Python: no cells
        get_ipython = lambda: None  # noqa: E731
    follow_share_in_cells(get_ipython())
    follow_share()
    root = find_repo_root()
    os.environ.setdefault(ROOT_ENV, str(root))
    prof = load_profile(profile, root)
    paths = ResultsPaths.for_profile(prof.name, root)
    show_tables_without_index()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else ""
    print(f"chapter '{chapter}' on profile '{prof.name}': {len(prof.models)} model(s), device {device}{gpu}")
    missing = [n for n in needs if not (paths.root / ".stamps" / f"{n}.json").exists()]
    if missing:

        order = _upstream(root, chapter)
        last_needed = max(order.index(n) for n in missing if n in order) if any(n in order for n in missing) else -1
        todo = order[: last_needed + 1]
        print(f"earlier chapters not yet run for '{prof.name}': {missing}; running {todo} first")
        run_chapters(profile, root, only=todo)
    return ChapterContext(chapter, prof, paths, root, device)


def record_verdicts(ctx: ChapterContext, verdicts: Iterable[Verdict]):
    """Write the chapter's verdicts and return them as a table (pandas) for display."""
    import pandas as pd

    rows = [dict(v.to_json(), chapter=ctx.name) for v in verdicts]
    bad = [r for r in rows if r["holds"] not in VERDICTS]
    if bad:
        raise ValueError(f"verdict 'holds' must be one of {' / '.join(VERDICTS)}, got {bad[0]['holds']!r}")
    write_json(ctx.paths.metrics / "verdicts" / f"{ctx.name}.json", rows)
    return pd.DataFrame(rows)[["claim", "statement", "paper", "ours", "holds", "sample", "rule"]]


def load_verdicts(paths: ResultsPaths) -> list[dict[str, Any]]:
    """Every chapter's verdicts for a profile (empty when none ran)."""
    folder = paths.root / "metrics" / "verdicts"
    out: list[dict[str, Any]] = []
    for f in sorted(folder.glob("*.json")) if folder.exists() else []:
        out.extend(read_json(f))
    return out


#: The paper's three claims, as the landing page states them.
CLAIMS: dict[int, str] = {
    0: "Premise: arithmetic fine-tuning improves the model's entity tracking.",
    1: "Same circuit: the base model's entity-tracking circuit also implements the task in its fine-tuned versions.",
    2: "Same functionality: each circuit group encodes the same information (position, value) in every model.",
    3: "Better positional handling: the fine-tuned models' gain comes from improved handling of positional information.",
    4: "Ours: the book's methods recover the paper's mechanism where it is planted (a model trained to have it, "
       "and two fine-tunes whose answers are known).",
}

#: Claims of ours (not the paper's): their verdict reads over their own rows.
OUR_CLAIMS = frozenset({4})


def verdict_table(results_root: Path, profile: str):
    """One profile's verdicts as an HTML-ready table: every claim, with 'not run' rows for
    claims no chapter has tested yet, and a link to the chapter holding the evidence."""
    import html

    import pandas as pd

    rows = load_verdicts(ResultsPaths(Path(results_root) / profile))
    tested = {r["claim"] for r in rows}
    rows += [
        {"claim": c, "statement": text, "paper": "", "ours": "", "holds": "not run", "chapter": "", "rule": "", "sample": ""}
        for c, text in CLAIMS.items()
        if c not in tested
    ]
    rows.sort(key=lambda r: (r["claim"], r["chapter"]))

    return pd.DataFrame(
        [
            {
                "claim": r["claim"] or "premise",
                "what is tested": html.escape(r["statement"]),
                "the paper": html.escape(r["paper"]),
                "ours": html.escape(r["ours"]),
                "verdict": r["holds"],
                "sample and rule": _sample_and_rule(r),
                "evidence": _chapter_link(r["chapter"]),
            }
            for r in rows
        ]
    )


def _chapter_link(ch: str) -> str:
    import html

    return f'<a href="{html.escape(ch)}.html">{html.escape(ch)}</a>' if ch else ""


def _sample_and_rule(r: dict) -> str:
    """A verdict row's sample and rule, one click away (an HTML ``<details>``)."""
    import html

    sample, rule = r.get("sample", ""), r.get("rule", "")
    if not (sample or rule):
        return ""
    body = "".join(f"<p><b>{k}:</b> {html.escape(v)}</p>" for k, v in (("sample", sample), ("rule", rule)) if v)
    return f"<details><summary>sample and rule</summary>{body}</details>"


#: The claims' short names, as the landing page's compact answer prints them.
CLAIM_NAMES: dict[int, str] = {0: "Premise", 1: "Same circuit", 2: "Same functionality",
                               3: "Better positional handling", 4: "Methods against ground truth (ours)"}


def is_ours(row: dict) -> bool:
    """A verdict row about a positive control or an extension of ours (kept out of the paper's
    claims): its statement says so."""
    st = row.get("statement", "")
    return st.startswith("Ours:") or "(positive control, ours)" in st


def claim_verdict(rows: Iterable[dict], ours: bool = False) -> str:
    """One claim's verdict over its rows about the paper's models (:func:`is_ours` rows apart;
    ``ours``: a claim of ours, :data:`OUR_CLAIMS`, read over its own rows):
    ``holds`` only when every row was tested and holds (a claim about the fine-tunes does not
    hold on the base's row alone), ``does not hold`` when no tested row holds even partly,
    ``not testable`` / ``not run`` when no row was tested, ``partly`` otherwise (mixed rows, or
    rows that hold beside rows that could not be tested)."""
    rows = [r for r in rows if ours or not is_ours(r)]
    tested = [r["holds"] for r in rows if r["holds"] not in ("not testable", "not run")]
    if not tested:
        kinds = {r["holds"] for r in rows}
        return "not testable" if "not testable" in kinds else "not run"
    if all(h == "holds" for h in tested):
        return "holds" if len(tested) == len(rows) else "partly"
    if not any(h in ("holds", "partly") for h in tested):
        return "does not hold"
    return "partly"


def claim_answers(results_root: Path, profile: str):
    """The landing page's compact answer: one line per claim, with its verdict over the paper's
    models (:func:`claim_verdict`), how many of its tests hold, and every test -- its verdict,
    our number, the sample and rule -- one click away. Rows of ours (positive controls,
    extensions) are counted apart, so they never decide one of the paper's claims."""
    import html

    import pandas as pd

    rows = load_verdicts(ResultsPaths(Path(results_root) / profile))
    out = []
    for c, text in CLAIMS.items():
        mine = [r for r in rows if r["claim"] == c]
        paper_rows = [r for r in mine if c in OUR_CLAIMS or not is_ours(r)]
        held = sum(r["holds"] == "holds" for r in paper_rows)
        tests = "".join(
            f"<li><b>{html.escape(r['holds'])}</b>: {html.escape(r['statement'])}: {html.escape(r['ours'])} "
            f"({_chapter_link(r['chapter'])}){_sample_and_rule(r)}</li>" for r in mine)
        ours = 0 if c in OUR_CLAIMS else sum(is_ours(r) for r in mine)
        out.append({
            "claim": CLAIM_NAMES.get(c, str(c)),
            "verdict": claim_verdict(mine, ours=c in OUR_CLAIMS),
            "tests that hold": f"{held} of {len(paper_rows)}" + (f" (+{ours} of ours)" if ours else ""),
            "the tests": f"<details><summary>{html.escape(text)}</summary><ul>{tests}</ul></details>" if mine
                         else html.escape(text),
        })
    return pd.DataFrame(out)


def scope_note(results_root: Path, profile: str) -> str:
    """What a build shows and what it cannot, in two sentences made of its own numbers: the base
    model's accuracy against chance (``competence.json``) and how much of it survives every context
    head mean-ablated (``binding.json``, chapter 2b), and the positive control's gain by queried box
    (``binding_gain_by_box.json``), where those chapters ran. Nothing here is typed in: a number
    missing from the results is left out, not guessed."""
    paths = ResultsPaths(Path(results_root) / profile)
    m = paths.root / "metrics"
    comp = read_json(m / "competence.json") if (m / "competence.json").exists() else {}
    binding = read_json(m / "binding.json") if (m / "binding.json").exists() else {}
    by_box = read_json(m / "binding_gain_by_box.json") if (m / "binding_gain_by_box.json").exists() else {}
    if not comp:
        return f"No chapter of profile `{profile}` has measured its models yet."
    base = by_box.get("base") or next(iter(comp))
    c = comp.get(base) or next(iter(comp.values()))
    a = c["accuracy"]

    def est(e, spec=".2f"):
        return f"{e['value']:{spec}} [{e['low']:{spec}}, {e['high']:{spec}}]"

    first = (f"This build's base model `{base}` answers {est(a)} of the evaluation prompts (chance {c['chance']:.2f}; "
             f"the paper's Llama-7B 0.66)")
    ret = binding.get(base, {}).get("retention_context_ablated")
    if ret:
        cut = CONTENT_BINDING.value
        kind = ("so it binds objects to boxes by content, not by position as the paper finds in Llama-7B"
                if ret["high"] < cut else "so much of its binding survives without the context's content, "
                "as a positional binding would" if ret["low"] >= cut else
                "so part of its binding survives without the context's content: neither reading is settled")
        first += f", and keeps {est(ret)} of that accuracy with every context head mean-ablated, {kind}"
    first += ": every chapter measures this model, and where it lacks the paper's mechanism the methods report that."
    second = ("It cannot say whether arithmetic fine-tuning enhances the paper's positional mechanism in Llama-7B: "
              "that needs the `paper` profile on a GPU.")
    for ft, g in by_box.get("finetuned", {}).items():
        if not g.get("control"):
            continue
        seen, unseen = g["seen"], g["unseen"]
        second = (f"Its positive control (ours), `{ft}`, gains {est(g['gain'], '+.2f')} in accuracy: "
                  f"{est(unseen, '+.2f')} on the boxes {g['unseen_boxes']} its base never saw in training and "
                  f"{est(seen, '+.2f')} on the boxes it saw; " + second[0].lower() + second[1:])
    return f"{first} {second}"


def iter_models(ctx: ChapterContext, names: Optional[Iterable[str]] = None):
    """Yield ``(name, LoadedModel)`` for the profile's models (or ``names``), one at a time: each
    is released before the next loads, so a GPU holds one 7B model at a time."""
    import gc

    import torch


    wanted = list(names) if names is not None else [m.name for m in ctx.profile.models]
    for name in wanted:
        lm = load_model(ctx.profile.model(name), ctx.paths, verbose=False)
        try:
            yield name, lm
        finally:
            del lm
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def models_to_study(ctx: ChapterContext, which: Optional[str] = None) -> tuple[list[str], list[Competence]]:
    """The profile's models a chapter analyses, in profile order, and the :class:`Competence` of
    those it leaves out. ``which`` (default: the profile's ``study``) ``"competent"``: the models
    that do the task by the circuit chapter's rule (``metrics/competence.json``), since how a model
    does a task it does not do cannot be studied; ``"all"``: every model, none left out."""
    which = which or ctx.profile.study
    names = [m.name for m in ctx.profile.models]
    if which == "all":
        return names, []
    if which != "competent":
        raise ValueError(f"which must be 'competent' or 'all', not {which!r}")
    comps = read_competence(ctx.paths.metrics / "competence.json")
    missing = [n for n in names if n not in comps]
    if missing:
        raise ValueError(f"{ctx.paths.metrics / 'competence.json'} has no competence for {missing}: rerun the circuit chapter")
    return [n for n in names if comps[n].ok], [comps[n] for n in names if not comps[n].ok]


def left_out_note(left_out: Iterable[Competence]) -> str:
    """The Markdown line a chapter shows for the models :func:`models_to_study` left out ("" if none)."""
    left_out = list(left_out)
    if not left_out:
        return ""
    return ("Left out of this chapter's analysis, as they do not do the task (the profile's `study: competent`): "
            + "; ".join(c.reason.removeprefix("not testable: ") for c in left_out) + ".")
