"""Environment text renders as written: adversarial observations through every Markdown/HTML renderer."""

from __future__ import annotations

import html
import re

from coevo_lib.analysis import hard_negatives
from coevo_lib.analysis.episode_view import EpisodeColumn, TaskView, Turn, task_view_html
from coevo_lib.analysis.tables import markdown_table
from coevo_lib.escaping import MATHJAX_IGNORE, html_block, html_text, markdown_code, markdown_text, one_line

from conftest import make_episode

ADVERSARIAL = [
    "[B0AAAA] red mug | $38.03 [B0BBBB] blue *mug* | $75.10",  # WebShop-style prices: LaTeX between the dollars
    "<script>alert(1)</script> <b>bold</b> & &amp; a_b_c __d__ ~~gone~~",
    "# not a heading\n- not a list\n1. nor this | a | table | cell",
    "`ticks` ``double`` [link](http://example.com) http://example.com ![img](x.png) \\$ \\ {x} (y) +z! $$x^2$$",
    "\\[x^2\\] \\(y\\) \\begin{equation} @@1@@ [B0AAAA] $3 | $4",  # MathJax's other delimiters, JupyterLab's placeholders
]
ACTION = "click[`buy` $5 *now*]"


def literal_characters(markdown: str) -> list[tuple[str, bool]]:
    """(character, escaped) for each character CommonMark shows: a backslash escapes the next punctuation,
    a numeric entity stands for its character."""
    characters, index = [], 0
    while index < len(markdown):
        entity = re.match(r"&#(\d+);", markdown[index:])
        if entity:
            characters.append((chr(int(entity[1])), True))
            index += len(entity[0])
        elif markdown[index] == "\\" and index + 1 < len(markdown):
            characters.append((markdown[index + 1], True))
            index += 2
        else:
            characters.append((markdown[index], False))
            index += 1
    return characters


def test_markdown_text_escapes_every_special_character_and_round_trips():
    for text in ADVERSARIAL:
        escaped = markdown_text(text)
        shown = literal_characters(escaped)
        assert "".join(c for c, _ in shown) == text
        raw_specials = {c for c, escaped_ in shown if not escaped_ and c in "$*_<>|`[]()#&~\\!:@"}
        assert not raw_specials, (text, raw_specials)
        # JupyterLab reads \\( and \\[ as math delimiters: brackets and parentheses are entities instead
        assert not re.search(r"\\[\[\]()]", escaped), escaped


def test_markdown_code_fences_backticks():
    assert markdown_code("search[red mug]") == "`search[red mug]`"
    assert markdown_code("a ``b`` c") == "```a ``b`` c```"
    assert markdown_code("`x`") == "`` `x` ``"
    assert markdown_code("two\nlines") == "`two lines`"


def test_html_text_and_block():
    for text in ADVERSARIAL:
        escaped = html_text(text)
        assert "<" not in escaped and ">" not in escaped and html.unescape(escaped) == text
    block = html_block(html_text(ADVERSARIAL[0]))
    assert block.startswith(f'<div class="{MATHJAX_IGNORE}">') and "$38.03" in block


def test_one_line():
    assert one_line(" a\n\tb  c ") == "a b c"
    assert one_line("abcdef", 4) == "abc…"


def adversarial_episode():
    turns = [(ACTION, ADVERSARIAL[0]), ("search[x]", ADVERSARIAL[1]), ("click[y]", ADVERSARIAL[2]),
             ("click[z]", ADVERSARIAL[3]), ("click[buy now]", "")]
    return make_episode("adv", "buy a $5 *mug* | cheap", turns, 0.75)


def test_episode_markdown_shows_observations_literally():
    markdown = hard_negatives.episode_markdown(adversarial_episode(), "Hard_negative *title*")
    # MathJax typesets the rendered DOM, where escaped dollars are dollars again: it must skip the block
    assert markdown.startswith(f'<div class="{MATHJAX_IGNORE}">\n\n') and markdown.endswith("\n\n</div>\n")
    for line in markdown.splitlines():
        if not line.startswith(tuple("12345")):
            continue
        code, observation = line.split(" -> ", 1)
        assert not [c for c, escaped in literal_characters(observation) if c == "$" and not escaped]
        assert "<script>" not in observation and "*mug*" not in observation
    assert "``click[`buy` $5 *now*]``" in markdown  # the action is a code span: literal, math-free
    assert "Hard\\_negative \\*title\\*" in markdown
    assert "&#91;B0AAAA&#93; red mug \\| \\$38\\.03" in markdown


def test_triplets_markdown_escapes_the_instruction():
    episode = adversarial_episode()
    row = {"reward": episode.reward, "steps": episode.steps, "actions": episode.actions, "messages": episode.messages}
    markdown = hard_negatives.triplets_markdown([{"seed": 0, "task_id": "t_1", "iteration": 1, "expert": row,
                                                  "eto_failure": row, "hard_negative": row}])
    assert "## Task t\\_1" in markdown and markdown.startswith(f'<div class="{MATHJAX_IGNORE}">')
    quote = next(line for line in markdown.splitlines() if line.startswith("> "))
    assert "\\$5 \\*mug\\* \\| cheap" in quote


def test_task_view_html_escapes_environment_text():
    turns = [Turn(1, ACTION, ADVERSARIAL[1], 0.0, True), Turn(2, "click[x]", ADVERSARIAL[0], 0.75, False)]
    column = EpisodeColumn("target <failure>", {"reward": 0.75, "steps": 2, "end_reason": "done"}, "", turns, 1, 0.5)
    rendered = task_view_html(TaskView("run<1>", "coevo", 1, "t<1>", ADVERSARIAL[0], [column]))
    assert rendered.startswith(f'<div class="{MATHJAX_IGNORE}"')
    assert "<script>" not in rendered and "<b>bold</b>" not in rendered and "<failure>" not in rendered
    assert html_text(ADVERSARIAL[1]) in rendered and html_text(ACTION) in rendered
    assert "leaves the expert path at step 2" in rendered


def test_markdown_table_keeps_pipes_inside_cells():
    import pandas as pd

    table = markdown_table(pd.DataFrame({"run": ["a|b"], "reward": [0.5]}))
    assert table.splitlines()[2] == "| a\\|b | 0.5 |"
